"""`plait data prepare --chat`: JSONL conversations -> tokens and an SFT loss mask, both Megatron
indexed datasets.

Each JSONL line holds a conversation under ``--field`` (default "messages"): a list of
{"role": ..., "content": ...} turns. It is rendered with the Hugging Face tokenizer's own chat
template (``apply_chat_template``), followed by the tokenizer's EOS as every document is. The loss
mask (`PREFIX_loss_mask.bin/.idx`, uint8, the same document lengths) is 1 on the tokens of the
assistant turns and 0 elsewhere (system and user turns, the template's role headers, the EOS
separator). An assistant turn is found in the rendered text by rendering prefixes: the
conversation up to the turn with the generation prompt, then up to and including the turn; the
characters between are what the assistant says (with the template's end-of-turn token, so the
model learns to stop), and a token counts when it starts there (the fast tokenizer's offsets; the
text is tokenized once, as apply_chat_template(tokenize=True) does). A template whose renderings
are not prefixes of one another (one that rewrites earlier turns) is refused rather than guessed
at.
"""
from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from plait.ir.errors import PlaitError
from plait.ir.indexed import LOSS_MASK_SUFFIX, IndexedWriter

CHAT_FIELD = "messages"
ROLES = ("system", "user", "assistant", "tool")


class ChatRenderer:
    """A HF tokenizer with a chat template: conversation -> (token ids, assistant mask)."""

    def __init__(self, name: str):
        from .data_prepare import HFTokenizer

        if name in ("byte", "bytes"):
            raise PlaitError("--chat needs a Hugging Face tokenizer with a chat template",
                             hint="pass --tokenizer NAME_OR_PATH")
        self.base = HFTokenizer(name)
        self.tok = self.base.hf
        if not getattr(self.tok, "chat_template", None):
            raise PlaitError(f"tokenizer {name!r} has no chat template",
                             hint="use a chat / instruct model's tokenizer")
        if not getattr(self.tok, "is_fast", False):
            raise PlaitError(f"tokenizer {name!r} is not a fast (Rust) tokenizer: the loss mask "
                             "needs its token offsets", hint="save it with tokenizer.json")
        self.name, self.vocab, self.eos = self.base.name, self.base.vocab, self.base.eos

    def _text(self, messages: list[dict], prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    def assistant_spans(self, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
        """Character spans of the assistant turns in the rendered ``text``."""
        spans = []
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            before = self._text(messages[:i], prompt=True) if i else ""
            through = self._text(messages[:i + 1], prompt=False)
            if not (text.startswith(through) and through.startswith(before)):
                raise PlaitError(f"{where}: the chat template of {self.name!r} does not render "
                                 f"turn {i + 1} as an extension of the turns before it",
                                 hint="the loss mask needs a prefix-stable chat template")
            spans.append((len(before), len(through)))
        return spans

    def render(self, messages: list[dict], where: str) -> tuple[np.ndarray, np.ndarray]:
        """The conversation's tokens (as apply_chat_template(tokenize=True) gives them) + EOS,
        and 1 for each token that starts inside an assistant turn."""
        text = self._text(messages, prompt=False)
        spans = self.assistant_spans(messages, text, where)
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        starts = np.asarray([a for a, _ in enc["offset_mapping"]], dtype=np.int64)
        mask = np.zeros(len(starts) + 1, dtype=np.uint8)  # + the EOS separator (never counted)
        for a, b in spans:
            mask[:-1] |= ((starts >= a) & (starts < b)).astype(np.uint8)
        return np.asarray(list(enc["input_ids"]) + [self.eos], dtype=np.int64), mask


def conversations(path: Path, field: str) -> Iterator[tuple[Optional[list[dict]], int, str]]:
    """(messages or None for a blank line, bytes consumed, "file:line") per JSONL line."""
    from .data_prepare import jsonl_records

    for where, record, size in jsonl_records(path):
        if record is None:
            yield None, size, where
            continue
        messages = record.get(field) if isinstance(record, dict) else None
        yield _checked(messages, field, where), size, where


def _checked(messages, field: str, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise PlaitError(f"{where}: no conversation under {field!r} (a list of "
                         '{"role": ..., "content": ...} turns)', hint="name the field with --field")
    for i, turn in enumerate(messages, 1):
        if not (isinstance(turn, dict) and turn.get("role") in ROLES
                and isinstance(turn.get("content"), str)):
            raise PlaitError(f"{where}: turn {i} is not {{\"role\": {' | '.join(ROLES)}, "
                             f"\"content\": \"...\"}}: {str(turn)[:80]}")
    if not any(t["role"] == "assistant" for t in messages):
        raise PlaitError(f"{where}: the conversation has no assistant turn (nothing to learn)")
    return messages


_WORKER: Optional[ChatRenderer] = None


def _init_worker(name: str) -> None:
    global _WORKER
    _WORKER = ChatRenderer(name)


def _render_batch(batch: list[tuple[list[dict], str]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens, masks, lengths) of a batch of conversations: three arrays between processes."""
    pairs = [_WORKER.render(messages, where) for messages, where in batch]
    return (np.concatenate([ids for ids, _ in pairs]), np.concatenate([m for _, m in pairs]),
            np.fromiter((len(ids) for ids, _ in pairs), np.int64, len(pairs)))


def _batches(paths: list[Path], field: str, progress) -> Iterator[list[tuple[list[dict], str]]]:
    from .data_prepare import BATCH_DOCS

    batch = []
    for path in paths:
        for messages, size, where in conversations(path, field):
            progress(size)
            if messages is not None:
                batch.append((messages, where))
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


def _rendered(paths, renderer: ChatRenderer, field: str, workers: int, progress):
    batches = _batches(paths, field, progress)
    if workers <= 1:
        global _WORKER
        _WORKER = renderer
        yield from map(_render_batch, batches)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(renderer.name,)) as pool:
        yield from pool.imap(_render_batch, batches, chunksize=1)  # imap keeps the order


def write_chat(paths: list[Path], prefix: Path, renderer: ChatRenderer, dtype, field: str,
               progress, workers: int = 1) -> np.ndarray:
    """Tokens to PREFIX.bin/.idx and the loss mask to PREFIX_loss_mask.bin/.idx, streamed
    (rendered in ``workers`` processes); returns the document lengths."""
    tokens = IndexedWriter(prefix, dtype)
    masks = IndexedWriter(Path(str(prefix) + LOSS_MASK_SUFFIX), np.uint8)
    for ids, mask, lengths in _rendered(paths, renderer, field, workers, progress):
        tokens.add_documents(ids, lengths)
        masks.add_documents(mask, lengths)
    tokens.close()
    masks.close()
    return np.frombuffer(tokens.lengths, dtype=np.int32) if tokens.lengths else np.zeros(0, np.int32)
