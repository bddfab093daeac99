"""Megatron-LM's indexed dataset format (`PREFIX.bin` + `PREFIX.idx`), read and written with numpy.

Corpora preprocessed for Megatron-LM / NeMo are sources as they are, and `plait data prepare`
writes the same format. Layout of the `.idx` file (all little-endian):

    9 bytes   b"MMIDIDX\\x00\\x00"
    u64       version (1)
    u8        dtype code of the tokens in `.bin`
    u64       sequence count S
    u64       document count D (entries of document_indices, one more than the documents)
    i32[S]    sequence lengths (tokens)
    i64[S]    sequence pointers (byte offsets into `.bin`)
    i64[D]    document indices (0, then the sequence index after each document's last sequence)
    (i8[S]    sequence modes, multimodal datasets only; plait reads text datasets)

The `.bin` file is the sequences' tokens back to back. Only numpy touches these files (memory
maps and fixed-size headers): nothing read from them can execute code. Lives in ir so that spec
resolution can size sources (epoch caps) without importing the runtime.
"""
from __future__ import annotations

import struct
from array import array
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from plait.ir.errors import PlaitError

HEADER = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron-LM's DType enum: code -> numpy dtype
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64,
                                6: np.float64, 7: np.float32, 8: np.uint16}
CODE_OF = {np.dtype(t): c for c, t in DTYPE_CODES.items()}
_FIXED = len(HEADER) + 8 + 1 + 8 + 8  # bytes before the arrays


LOSS_MASK_SUFFIX = "_loss_mask"  # PREFIX_loss_mask.bin/.idx: an SFT dataset's per-token loss mask


def _is_loss_mask(idx: Path) -> bool:
    """A companion loss mask (X_loss_mask.idx beside X.idx), not a dataset of its own."""
    stem = idx.stem
    return stem.endswith(LOSS_MASK_SUFFIX) and \
        idx.with_name(stem[:-len(LOSS_MASK_SUFFIX)] + ".idx").is_file()


def prefix_of(path: str | Path) -> Optional[Path]:
    """The `.bin`/`.idx` prefix a user path names: `X` (X.idx exists), `X.idx` / `X.bin`, or a
    directory holding exactly one `.idx` with its `.bin`. None when it names none."""
    p = Path(path)
    if p.suffix in (".idx", ".bin") and p.with_suffix(".idx").is_file():
        return p.with_suffix("")
    if Path(str(p) + ".idx").is_file():
        return p
    if p.is_dir():
        found = [f for f in sorted(p.glob("*.idx")) if not _is_loss_mask(f)]
        if len(found) == 1:
            return found[0].with_suffix("")
        if len(found) > 1:
            raise PlaitError(f"{p} holds {len(found)} indexed datasets "
                             f"({', '.join(f.stem for f in found[:4])}...)",
                             hint="name one prefix, e.g. " + str(found[0].with_suffix("")))
    return None


class IndexedDataset:
    """A Megatron indexed dataset, memory-mapped. ``tokens`` is the whole `.bin` as one flat array
    (documents back to back, as written: plait's prepare puts EOS at each document's end)."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        idx, bin_ = Path(str(prefix) + ".idx"), Path(str(prefix) + ".bin")
        for f in (idx, bin_):
            if not f.is_file():
                raise PlaitError(f"indexed dataset {prefix}: {f.name} is missing",
                                 hint="a Megatron dataset is a PREFIX.bin and PREFIX.idx pair")
        self.dtype, sequences, documents = _read_header(idx)
        self.sequence_lengths = np.memmap(idx, np.int32, "r", _FIXED, (sequences,))
        self.sequence_pointers = np.memmap(idx, np.int64, "r", _FIXED + 4 * sequences, (sequences,))
        self.document_indices = np.memmap(idx, np.int64, "r", _FIXED + 12 * sequences, (documents,))
        self.tokens = np.memmap(bin_, self.dtype, "r") if bin_.stat().st_size else \
            np.zeros(0, self.dtype)
        self._check(idx)

    def _check(self, idx: Path) -> None:
        """The index and the data agree (a truncated copy fails here, not mid-training)."""
        n = len(self.sequence_lengths)
        end = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * self.dtype.itemsize \
            if n else 0
        if end > self.tokens.nbytes:
            raise PlaitError(f"{idx} indexes {end:,} bytes but {self.prefix}.bin holds "
                             f"{self.tokens.nbytes:,}", hint="the .bin file is truncated")
        if len(self.document_indices) == 0 or int(self.document_indices[-1]) != n:
            raise PlaitError(f"{idx}: document indices do not end at the sequence count {n}")

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def document_starts(self) -> np.ndarray:
        """Token offset of each document's first token, ascending (int64, in memory)."""
        ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return ends[np.asarray(self.document_indices[:-1])]

    def document_lengths(self) -> np.ndarray:
        """Tokens per document (a document may span several sequences in Megatron datasets)."""
        ends = np.concatenate([[0], np.cumsum(self.sequence_lengths, dtype=np.int64)])
        return np.diff(ends[np.asarray(self.document_indices)])


def _read_header(idx: Path) -> tuple[np.dtype, int, int]:
    with open(idx, "rb") as f:
        head = f.read(_FIXED)
    if len(head) < _FIXED or head[:len(HEADER)] != HEADER:
        raise PlaitError(f"{idx} is not a Megatron index file (no MMIDIDX header)")
    version, code, sequences, documents = struct.unpack("<QBQQ", head[len(HEADER):])
    if version != VERSION:
        raise PlaitError(f"{idx}: index version {version}; plait reads version {VERSION}")
    if code not in DTYPE_CODES:
        raise PlaitError(f"{idx}: unknown dtype code {code}")
    expected = _FIXED + 12 * sequences + 8 * documents
    if idx.stat().st_size < expected:
        raise PlaitError(f"{idx} is truncated: {idx.stat().st_size:,} bytes, the header promises "
                         f"{expected:,}")
    return np.dtype(DTYPE_CODES[code]), sequences, documents


class IndexedWriter:
    """Streams documents into `PREFIX.bin`; `close()` writes `PREFIX.idx`. One sequence per document
    (Megatron's layout when documents are not split into sentences)."""

    def __init__(self, prefix: str | Path, dtype: type):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise ValueError(f"dtype {self.dtype} has no Megatron code")
        self._bin = open(str(prefix) + ".bin", "wb")
        self.lengths = array("i")  # int32 per document, 4 bytes each (not a Python int each)

    def add_document(self, ids: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._bin.write(arr.tobytes())
        self.lengths.append(len(arr))

    def add_documents(self, ids: np.ndarray, lengths: Sequence[int]) -> None:
        """Several documents at once: their tokens back to back and each one's length."""
        self._bin.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.lengths.frombytes(np.asarray(lengths, dtype=np.int32).tobytes())

    def close(self) -> None:
        self._bin.close()
        lengths = np.frombuffer(self.lengths, dtype=np.int32) if self.lengths else \
            np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        with open(str(self.prefix) + ".idx", "wb") as f:
            f.write(HEADER + struct.pack("<QBQQ", VERSION, CODE_OF[self.dtype], len(lengths),
                                         len(documents)))
            for arr in (lengths, pointers, documents):
                f.write(arr.tobytes())
