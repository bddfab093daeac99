"""Token datasets: `plait data prepare` writes one, jobs read it memory-mapped.

A dataset is a directory with `tokens.bin` (a flat array of token ids, uint16 or uint32) and
`meta.json`. Training samples are non-overlapping windows of seq_len + 1 tokens (inputs and the
next-token labels). Step t's global batch is a fixed slice of a seeded permutation of all windows
(a new permutation each epoch), and data-parallel rank d reads the d-th contiguous share of it, so
the union over DP is exactly the global batch a single device would see: the basis of the parity
tests. The byte-level tokenizer is the default; a Hugging Face tokenizer is used when named.
"""
from __future__ import annotations

import json
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Protocol

import numpy as np
import torch

from plait.ir.errors import PlaitError
from plait.ir.outputs import check_output_dir, claim_output_dir

META = "meta.json"
TOKENS = "tokens.bin"
DOC_SEPARATOR = "\n\n"


class Tokenizer(Protocol):
    name: str
    vocab: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, no unknowns, nothing to download."""

    name, vocab = "byte", 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer by name or local path (offline machines need a local path)."""

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
            self._tok = AutoTokenizer.from_pretrained(name)
        except Exception as err:  # missing package, unknown name, no network
            raise PlaitError(f"cannot load tokenizer {name!r}: {err}",
                             hint="use the byte tokenizer (default) or a local tokenizer path")
        self.name, self.vocab = name, len(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def bundled_corpus() -> Path:
    """The small English corpus shipped in the package (plait/data/corpus.txt)."""
    return Path(str(resources.files("plait") / "data" / "corpus.txt"))


def get_tokenizer(name: str = "byte") -> Tokenizer:
    return ByteTokenizer() if name in ("byte", "bytes", None) else HFTokenizer(name)


DATASET_KIND = "dataset"


def read_text_file(path: Path) -> str:
    """A text file's contents; binary, non-UTF-8 and empty files are errors naming the file (a
    replacement character per bad byte would train on noise)."""
    if not path.exists():
        raise PlaitError(f"no such text file: {path}")
    if not path.is_file():
        raise PlaitError(f"{path} is not a regular file", hint="pass text files")
    data = path.read_bytes()
    if b"\0" in data:
        raise PlaitError(f"{path} is a binary file (a NUL byte at offset {data.index(0)}), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlaitError(f"{path} is not UTF-8 text (byte {e.start} is invalid)",
                         hint="convert it first, e.g. `iconv -t UTF-8`") from None
    if not text.strip():
        raise PlaitError(f"{path} holds no text" + (" (it is empty)" if not data else ""))
    return text


def prepare(files: Iterable[str | Path], out_dir: str | Path, tokenizer: str = "byte") -> dict:
    """Tokenize text files into a memory-mappable dataset directory; returns its metadata. The
    output directory and every input are checked before anything is written."""
    paths = [Path(f) for f in files]
    if not paths:
        raise PlaitError("no input files to prepare")
    out = check_output_dir(out_dir, DATASET_KIND)
    texts = [read_text_file(path) for path in paths]
    tok = get_tokenizer(tokenizer)
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode(text + DOC_SEPARATOR))
    dtype = np.uint16 if tok.vocab <= 2**16 else np.uint32
    claim_output_dir(out, DATASET_KIND)
    np.asarray(ids, dtype=dtype).tofile(out / TOKENS)
    meta = {"tokenizer": tok.name, "vocab": tok.vocab, "dtype": np.dtype(dtype).name,
            "num_tokens": len(ids), "files": [str(p) for p in paths]}
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta


@dataclass(frozen=True)
class Batch:
    tokens: torch.Tensor  # [n, seq] int64
    labels: torch.Tensor  # [n, seq] int64


class TokenSource(Protocol):
    vocab: int

    def window(self, index: int, length: int) -> np.ndarray: ...

    def num_windows(self, length: int) -> int: ...


class MemmapTokens:
    """A prepared dataset read through np.memmap (pages come in as windows are touched)."""

    def __init__(self, path: str | Path):
        root = Path(path)
        if not (root / META).is_file() or not (root / TOKENS).is_file():
            raise PlaitError(f"no dataset at {root} (expected {META} and {TOKENS})",
                             hint="build one with `plait data prepare FILES -o DIR`")
        try:
            self.meta = json.loads((root / META).read_text())
            self.vocab, dtype = int(self.meta["vocab"]), np.dtype(self.meta["dtype"])
        except (ValueError, KeyError, TypeError) as e:
            raise PlaitError(f"{root / META} is not a dataset's metadata ({type(e).__name__}: {e})",
                             hint="rebuild it with `plait data prepare FILES -o DIR`") from None
        if (root / TOKENS).stat().st_size < dtype.itemsize:  # np.memmap cannot map empty files
            raise PlaitError(f"dataset {root} is empty ({root / TOKENS} holds no tokens)")
        self.tokens = np.memmap(root / TOKENS, dtype=dtype, mode="r")

    def num_windows(self, length: int) -> int:
        return (len(self.tokens) - 1) // (length - 1)

    def window(self, index: int, length: int) -> np.ndarray:
        start = index * (length - 1)
        return np.asarray(self.tokens[start:start + length], dtype=np.int64)


class SyntheticTokens:
    """Seeded uniform random tokens: an option for benchmarks, never the default."""

    def __init__(self, vocab: int, seed: int = 0, windows: int = 1 << 16):
        self.vocab, self.seed, self.windows = vocab, seed, windows

    def num_windows(self, length: int) -> int:
        return self.windows

    def window(self, index: int, length: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, index))
        return rng.integers(0, self.vocab, size=length, dtype=np.int64)


class BatchLoader:
    """Deterministic global batches, sharded over data-parallel ranks."""

    def __init__(self, source: TokenSource, seq_len: int, global_batch: int, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, device: torch.device = torch.device("cpu")):
        if global_batch % dp_size:
            raise PlaitError(f"global batch {global_batch} is not divisible by dp = {dp_size}")
        self.source, self.seq_len, self.global_batch = source, seq_len, global_batch
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.device = torch.device(device)  # where batches are delivered (the mesh's device)
        self.windows = source.num_windows(seq_len + 1)
        if self.windows < global_batch:
            raise PlaitError(f"the dataset holds {self.windows} windows of {seq_len + 1} tokens, "
                             f"fewer than one global batch of {global_batch}")

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng((self.seed, epoch)).permutation(self.windows)

    def global_indices(self, step: int) -> np.ndarray:
        per_epoch = self.windows // self.global_batch  # drop the ragged tail of each epoch
        epoch, within = divmod(step, per_epoch)
        start = within * self.global_batch
        return self._order(epoch)[start:start + self.global_batch]

    def local_batch(self, step: int) -> Batch:
        """This DP rank's share of step `step`'s global batch."""
        share = self.global_batch // self.dp_size
        idx = self.global_indices(step)[self.dp_rank * share:(self.dp_rank + 1) * share]
        rows = np.stack([self.source.window(int(i), self.seq_len + 1) for i in idx])
        data = torch.from_numpy(rows)
        if self.device.type == "cuda":  # one pinned host-to-device copy per step
            data = data.pin_memory().to(self.device, non_blocking=True)
        return Batch(tokens=data[:, :-1].contiguous(), labels=data[:, 1:].contiguous())


def open_source(path: Optional[str], vocab: int, synthetic: bool = False,
                seed: int = 0) -> TokenSource:
    if synthetic:
        return SyntheticTokens(vocab, seed)
    if path is None:
        raise PlaitError("the job names no dataset", hint="set data = \"DIR\" (from `plait data "
                         "prepare`) or use synthetic data")
    source = MemmapTokens(path)
    if source.vocab > vocab:
        raise PlaitError(f"dataset {path} uses a vocabulary of {source.vocab} tokens, more than "
                         f"the model's {vocab}")
    return source
