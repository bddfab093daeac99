"""The files of one checkpoint step: per-rank safetensors of chunks, and a JSON index of them.

    rank-00003.safetensors   the chunks rank 3 owns, keyed "<tensor>#<n>" (no pickle: safetensors
                             holds a JSON header and raw bytes, so reading executes nothing)
    index.json               tensor -> global shape, dtype and its chunks (file, key, offset, size)

A tensor several ranks hold (DP replicas, TP-replicated weights, the tied embedding's two copies)
is written once, by the lowest rank holding that chunk. Reading copies from every saved chunk the
overlap with the chunk wanted, so any layout reads what any other wrote.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from plait.ir.errors import PlaitError

from .ckpt_chunks import Chunk, overlap

INDEX = "index.json"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


def chunk_key(name: str, n: int) -> str:
    return f"{name}#{n}"


def records(rank: int, owned: list[tuple[str, Chunk]]) -> list[dict]:
    """The index entries of the chunks ``rank`` writes, in the order `write` stores them."""
    return [{"name": name, "file": rank_file(rank), "key": chunk_key(name, n),
             "offset": list(c.offset), "size": list(c.size)}
            for n, (name, c) in enumerate(owned)]


def views(owned: list[tuple[str, Chunk, torch.Tensor]]) -> list[torch.Tensor]:
    """The owned chunks as they are, copied only when strided or when they share storage with
    another (ZeRO-1's gathered moments, segmented TP pieces): safetensors stores each once."""
    out, seen = [], set()
    for _, c, t in owned:
        piece = t[c.local_index()].detach().contiguous()
        storage = piece.untyped_storage().data_ptr()
        out.append(piece.clone() if storage in seen else piece)
        seen.add(storage)
    return out


def snapshot(owned: list[tuple[str, Chunk, torch.Tensor]]) -> list[torch.Tensor]:
    """Contiguous CPU copies of the owned chunks: what `write` may store later (async saving)
    while training changes the live tensors."""
    return [t[c.local_index()].detach().to("cpu", copy=True).contiguous() for _, c, t in owned]


def write(directory: Path, rank: int, recs: list[dict], data: list[torch.Tensor]) -> tuple[int, str]:
    """Write this rank's file; returns its size and SHA-256 (for the manifest)."""
    from safetensors.torch import save_file

    path = directory / rank_file(rank)
    save_file({r["key"]: t for r, t in zip(recs, data)}, str(path))
    return path.stat().st_size, sha256(path)


def sha256(path: Path, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_index(directory: Path, shapes: dict[str, tuple[list[int], str]],
                all_records: list[dict]) -> None:
    tensors = {name: {"shape": shape, "dtype": dtype, "chunks": []}
               for name, (shape, dtype) in shapes.items()}
    for r in all_records:
        tensors[r["name"]]["chunks"].append({k: r[k] for k in ("file", "key", "offset", "size")})
    (directory / INDEX).write_text(json.dumps({"tensors": tensors}, indent=0) + "\n")


class Reader:
    """Reads regions of global tensors from a step directory's chunks (files opened lazily)."""

    def __init__(self, directory: Path):
        self.directory = directory
        path = directory / INDEX
        try:
            self.tensors = json.loads(path.read_text())["tensors"]
        except (OSError, ValueError, KeyError) as e:
            raise PlaitError(f"checkpoint {directory}: cannot read {INDEX} ({e})") from None
        self._open: dict = {}

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> Optional[list[int]]:
        return self.tensors[name]["shape"] if name in self.tensors else None

    def _file(self, name: str):
        from safetensors import safe_open

        if name not in self._open:
            self._open[name] = safe_open(str(self.directory / name), framework="pt")
        return self._open[name]

    def fill(self, name: str, target: torch.Tensor, wanted: list[Chunk]) -> None:
        """Copy into ``target`` (a rank's local tensor) every chunk of ``wanted`` from the saved
        chunks of global tensor ``name``; PlaitError when the checkpoint does not cover one."""
        if name not in self.tensors:
            raise PlaitError(f"checkpoint {self.directory} holds no tensor {name!r}")
        saved = self.tensors[name]["chunks"]
        for c in wanted:
            covered = 0
            for s in saved:
                box = overlap(c, s["offset"], s["size"])
                if box is None:
                    continue
                lo, hi = box
                src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, s["offset"]))
                dst = tuple(slice(a - g + l, b - g + l) for a, b, g, l in zip(lo, hi, c.offset, c.local))
                piece = self._file(s["file"]).get_slice(s["key"])[src] if src \
                    else self._file(s["file"]).get_tensor(s["key"])
                with torch.no_grad():
                    target[dst].copy_(piece)
                covered += _volume(lo, hi)
            if covered != _volume(c.offset, [o + n for o, n in zip(c.offset, c.size)]):
                raise PlaitError(f"checkpoint {self.directory}: the saved chunks of {name!r} do not "
                                 f"cover offset {list(c.offset)} size {list(c.size)}")


def _volume(lo, hi) -> int:
    v = 1
    for a, b in zip(lo, hi):
        v *= b - a
    return v
