"""`plait data prepare`: text or JSONL files -> a Megatron indexed dataset, streamed.

Inputs are read line by line (never a whole file in memory), split into documents (JSONL: one
per line, the text under `--field`; text files: paragraphs separated by blank lines), tokenized
(optionally in worker processes), each followed by the tokenizer's EOS, and appended to
`DIR/text_document.bin`; `DIR/text_document.idx` and `DIR/meta.json` (tokenizer, vocab, EOS) are
written last. A failure part-way removes what was written, so a dataset directory is complete or
absent.
"""
from __future__ import annotations

import json
import multiprocessing
import shutil
from importlib import resources
from itertools import islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol

import numpy as np

from plait.ir.errors import PlaitError
from plait.ir.indexed import IndexedWriter
from plait.ir.outputs import MARKER, check_output_dir, claim_output_dir

META = "meta.json"
PREFIX = "text_document"  # Megatron's preprocess_data.py names its outputs <prefix>_text_document
DATASET_KIND = "dataset"
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
BATCH_DOCS = 256  # documents per task handed to a worker


class Tokenizer(Protocol):
    name: str
    vocab: int
    eos: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to download. EOS is byte 0 (NUL), which text
    never holds: inputs with a NUL byte are refused as binary."""

    name, vocab, eos = "byte", 256, 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 < i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer by name or local path (offline machines need a local path)."""

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
            self.hf = AutoTokenizer.from_pretrained(name)  # the transformers tokenizer itself
        except Exception as err:  # missing package, unknown name, no network
            raise PlaitError(f"cannot load tokenizer {name!r}: {err}",
                             hint="use the byte tokenizer (default) or a local tokenizer path")
        if self.hf.eos_token_id is None:
            raise PlaitError(f"tokenizer {name!r} has no EOS token to separate documents")
        self.name, self.vocab, self.eos = name, len(self.hf), int(self.hf.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many documents in one call (the Rust tokenizer's batch path, not one call each)."""
        backend = getattr(self.hf, "backend_tokenizer", None)  # fast tokenizers: skip the
        if backend is not None:  # Python-side BatchEncoding (about 1.6x faster measured)
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.hf(texts, add_special_tokens=False)["input_ids"]


def get_tokenizer(name: str = "byte") -> Tokenizer:
    return ByteTokenizer() if name in ("byte", "bytes", None) else HFTokenizer(name)


def bundled_corpus() -> Path:
    """The small English corpus shipped in the package (plait/data/corpus.txt)."""
    return Path(str(resources.files("plait") / "data" / "corpus.txt"))


# ---- reading inputs: documents, streamed -----------------------------------------------------

def check_input(path: Path) -> None:
    """Cheap checks of every input before anything is written (the rest is found while streaming)."""
    if not path.exists():
        raise PlaitError(f"no such input file: {path}")
    if not path.is_file():
        raise PlaitError(f"{path} is not a regular file", hint="pass text or JSONL files")
    if path.stat().st_size == 0:
        raise PlaitError(f"{path} holds no text (it is empty)")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\0" in head:
        raise PlaitError(f"{path} is a binary file (a NUL byte at offset {head.index(0)}), not text")


def _lines(path: Path) -> Iterator[tuple[int, str, int]]:
    """(line number, line, bytes) of a UTF-8 file; binary or non-UTF-8 content is an error naming
    the line (a replacement character per bad byte would train on noise)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if b"\0" in raw:
                raise PlaitError(f"{path}:{number}: a NUL byte: this is a binary file, not text")
            try:
                yield number, raw.decode("utf-8"), len(raw)
            except UnicodeDecodeError as e:
                raise PlaitError(f"{path}:{number}: not UTF-8 text (byte {e.start} of the line)",
                                 hint="convert it first, e.g. `iconv -t UTF-8`") from None


def jsonl_records(path: Path) -> Iterator[tuple[str, object, int]]:
    """(file:line, the line's JSON value or None for a blank line, bytes read) per line of a JSONL
    file; a line that is not JSON is a located error."""
    for number, line, size in _lines(path):
        where = f"{path}:{number}"
        if not line.strip():
            yield where, None, size
            continue
        try:
            yield where, json.loads(line), size
        except ValueError as e:
            raise PlaitError(f"{where}: not a JSON object: {e}") from None


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, int]]:
    for where, record, size in jsonl_records(path):
        if record is None:
            yield "", size
            continue
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            keys = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
            raise PlaitError(f"{where}: no text field {field!r} (found: {keys})",
                             hint="name the field with --field")
        yield text, size


def _text_documents(path: Path) -> Iterator[tuple[str, int]]:
    """Paragraphs (runs of non-blank lines) are documents."""
    lines: list[str] = []
    pending = 0
    for _, line, size in _lines(path):
        pending += size
        if line.strip():
            lines.append(line)
        elif lines:
            yield "".join(lines).rstrip("\n"), pending
            lines, pending = [], 0
    if lines:
        yield "".join(lines).rstrip("\n"), pending


def documents(path: Path, field: str) -> Iterator[tuple[str, int]]:
    """(text, input bytes consumed) per document; empty texts only advance the byte count."""
    return _jsonl_documents(path, field) if path.suffix in JSONL_SUFFIXES else _text_documents(path)


# ---- tokenizing, optionally in worker processes ---------------------------------------------

_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(name: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = get_tokenizer(name)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """A batch of documents as one token array (each document followed by EOS) and its document
    lengths: one array each way between processes, not one per document."""
    tok = _WORKER_TOKENIZER
    if isinstance(tok, ByteTokenizer):  # the bytes are the ids: no Python list per character
        docs = [np.frombuffer(t.encode("utf-8") + bytes([tok.eos]), dtype=np.uint8) for t in texts]
    else:
        docs = [np.asarray(ids + [tok.eos], dtype=np.int64) for ids in tok.encode_batch(texts)]
    return np.concatenate(docs), np.fromiter(map(len, docs), np.int64, len(docs))


def _batches(docs: Iterable[tuple[str, int]], progress) -> Iterator[list[str]]:
    it = iter(docs)
    while True:
        chunk = list(islice(it, BATCH_DOCS))
        if not chunk:
            return
        progress(sum(size for _, size in chunk))
        texts = [text for text, _ in chunk if text]
        if texts:
            yield texts


def _encoded(docs, tokenizer: str, workers: int, progress) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    batches = _batches(docs, progress)
    if workers <= 1:
        _init_worker(tokenizer)
        yield from map(_encode_batch, batches)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_encode_batch, batches, chunksize=1)  # imap keeps document order


# ---- the command's body ------------------------------------------------------------------------

def _check_output(out_dir: str | Path) -> Path:
    out = check_output_dir(out_dir, DATASET_KIND)
    if out.is_dir() and any(p.name != MARKER for p in out.iterdir()):
        raise PlaitError(f"{out} already holds a dataset; plait does not overwrite one",
                         hint="remove it first or name a new directory")
    return out


def prepare(files: Iterable[str | Path], out_dir: str | Path, tokenizer: str = "byte",
            field: str = "text", workers: int = 1, show_progress: bool = False,
            chat: bool = False) -> dict:
    """Tokenize text / JSONL files into a Megatron indexed dataset directory; returns its metadata.
    The output path and every input are checked before anything is written. ``chat``: JSONL
    conversations rendered with the tokenizer's chat template, with an SFT loss mask beside the
    tokens (runtime/data_chat.py)."""
    from .data_chat import ChatRenderer

    paths = [Path(f) for f in files]
    if not paths:
        raise PlaitError("no input files to prepare")
    out = _check_output(out_dir)
    for path in paths:
        check_input(path)
        if chat and path.suffix not in JSONL_SUFFIXES:
            raise PlaitError(f"{path}: --chat reads JSONL conversations (.jsonl), not text")
    tok = ChatRenderer(tokenizer) if chat else get_tokenizer(tokenizer)
    # Megatron's choice (DType.optimal_dtype): uint16 below 65500 ids, else int32 (it has no uint32)
    dtype = np.uint16 if tok.vocab < 65500 else np.int32
    created = not out.exists()
    claim_output_dir(out, DATASET_KIND)
    try:
        meta = _write(paths, out, tok, dtype, field, workers, show_progress, chat)
    except BaseException:
        for f in out.iterdir():  # what this call wrote, in a directory it claimed empty
            f.unlink() if f.is_file() else shutil.rmtree(f)
        if created:
            out.rmdir()
        raise
    return meta


def _write_text(paths, prefix: Path, tok: Tokenizer, dtype, field: str, workers: int,
                progress) -> np.ndarray:
    writer = IndexedWriter(prefix, dtype)
    docs = (doc for path in paths for doc in documents(path, field))
    for ids, lengths in _encoded(docs, tok.name, workers, progress):
        writer.add_documents(ids, lengths)
    writer.close()
    return np.frombuffer(writer.lengths, dtype=np.int32) if writer.lengths else np.zeros(0, np.int32)


def _write(paths, out: Path, tok: Tokenizer, dtype, field: str, workers: int, show: bool,
           chat: bool) -> dict:
    from rich.progress import Progress

    from .data_chat import LOSS_MASK_SUFFIX, write_chat

    total = sum(p.stat().st_size for p in paths)
    with Progress(transient=True, disable=not show) as bar:
        task = bar.add_task("rendering chats" if chat else "tokenizing", total=total)
        advance = lambda n: bar.advance(task, n)  # noqa: E731
        lengths = write_chat(paths, out / PREFIX, tok, dtype, field, advance, workers) if chat else \
            _write_text(paths, out / PREFIX, tok, dtype, field, workers, advance)
    if not len(lengths):
        raise PlaitError("the inputs hold no documents (only blank lines)"
                         + (f" under the field {field!r}" if any(p.suffix in JSONL_SUFFIXES
                                                                   for p in paths) else ""))
    meta = {"format": "megatron-indexed", "prefix": PREFIX, "tokenizer": tok.name,
            "vocab": tok.vocab, "eos": tok.eos, "dtype": np.dtype(dtype).name,
            "num_tokens": int(np.sum(lengths, dtype=np.int64)), "documents": len(lengths),
            "files": [str(p) for p in paths]}
    if chat:
        meta.update(objective="sft", loss_mask=PREFIX + LOSS_MASK_SUFFIX)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
