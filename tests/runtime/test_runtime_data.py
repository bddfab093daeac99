"""Token datasets: prepare, memory-mapped reads, deterministic shuffling and DP sharding."""
import json

import numpy as np
import pytest
import torch

from plait.cli import main
from plait.ir.errors import PlaitError
from plait.runtime.data import (BatchLoader, MemmapTokens, SyntheticTokens, bundled_corpus,
                                open_source, prepare)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "corpus"
    prepare([bundled_corpus()], out)
    return out


def test_bundled_corpus_is_a_few_hundred_kb_of_english():
    text = bundled_corpus().read_text()
    assert 200_000 < len(text.encode()) < 1_000_000
    assert text.count(" the ") > 1000


def test_prepare_writes_bytes_as_tokens(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("héllo")
    meta = prepare([src], tmp_path / "ds")
    assert meta["vocab"] == 256 and meta["dtype"] == "uint16"
    tokens = MemmapTokens(tmp_path / "ds").tokens
    assert bytes(tokens.tolist()).decode() == "héllo\0"  # EOS (byte 0) ends each document
    assert json.loads((tmp_path / "ds" / "meta.json").read_text())["num_tokens"] == len(tokens)


def test_labels_are_the_next_tokens(corpus):
    batch = BatchLoader(open_source(str(corpus), 256), 32, 4, seed=3).local_batch(0)
    assert batch.tokens.shape == batch.labels.shape == (4, 32)
    assert torch.equal(batch.tokens[:, 1:], batch.labels[:, :-1])


def test_dp_shards_partition_the_global_batch(corpus):
    source = open_source(str(corpus), 256)
    whole = BatchLoader(source, 32, 8, seed=3).local_batch(5).tokens
    parts = [BatchLoader(source, 32, 8, seed=3, dp_rank=r, dp_size=4).local_batch(5).tokens
             for r in range(4)]
    assert torch.equal(torch.cat(parts), whole)


def test_order_is_seeded_and_changes_with_the_epoch(corpus):
    loader = BatchLoader(open_source(str(corpus), 256), 64, 16, seed=1)
    again = BatchLoader(open_source(str(corpus), 256), 64, 16, seed=1)
    assert np.array_equal(loader.global_indices(3), again.global_indices(3))
    per_epoch = loader.windows // 16
    first, second = loader._order(0), loader._order(1)
    assert not np.array_equal(first, second) and sorted(first) == sorted(second)
    assert np.array_equal(loader.global_indices(per_epoch), second[:16])


def test_synthetic_tokens_are_an_option_and_deterministic():
    a = BatchLoader(SyntheticTokens(256, seed=4), 16, 2).local_batch(0).tokens
    b = BatchLoader(SyntheticTokens(256, seed=4), 16, 2).local_batch(0).tokens
    assert torch.equal(a, b) and int(a.max()) < 256


def test_missing_dataset_names_its_path(tmp_path):
    with pytest.raises(PlaitError, match=str(tmp_path / "nope")):
        open_source(str(tmp_path / "nope"), 256)


def test_vocabulary_larger_than_the_model_is_refused(corpus):
    with pytest.raises(PlaitError, match="vocabulary of 256 tokens, more than the model's 100"):
        open_source(str(corpus), 100)


def test_cli_prepare_and_missing_file(tmp_path, capsys):
    assert main(["data", "prepare", "bundled", "-o", str(tmp_path / "ds")]) == 0
    assert "tokens in 2,841 documents (byte tokenizer" in capsys.readouterr().out
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "Traceback" not in err


# ---- Megatron indexed format -------------------------------------------------------------------

def _parse_idx(path):
    """The .idx layout decoded by hand with struct (independent of plait.ir.indexed)."""
    import struct
    raw = path.read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, seqs, docs = struct.unpack("<QBQQ", raw[9:34])
    lengths = np.frombuffer(raw, np.int32, seqs, 34)
    pointers = np.frombuffer(raw, np.int64, seqs, 34 + 4 * seqs)
    doc_idx = np.frombuffer(raw, np.int64, docs, 34 + 12 * seqs)
    assert len(raw) == 34 + 12 * seqs + 8 * docs
    return version, code, lengths, pointers, doc_idx


def test_prepare_writes_megatron_layout_with_eos_between_documents(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("one two\nthree\n\n\nfour\n\nfive")
    meta = prepare([src], tmp_path / "ds")
    version, code, lengths, pointers, doc_idx = _parse_idx(tmp_path / "ds" / "text_document.idx")
    assert (version, code) == (1, 8)  # uint16 is Megatron's dtype code 8
    assert lengths.tolist() == [len("one two\nthree") + 1, len("four") + 1, len("five") + 1]
    assert pointers.tolist() == [0, 2 * lengths[0], 2 * (lengths[0] + lengths[1])]
    assert doc_idx.tolist() == [0, 1, 2, 3]
    tokens = np.fromfile(tmp_path / "ds" / "text_document.bin", np.uint16)
    assert bytes(tokens.tolist()) == b"one two\nthree\0four\0five\0"
    assert meta["documents"] == 3 and meta["num_tokens"] == len(tokens) and meta["eos"] == 0


def test_jsonl_field_and_its_errors(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "hi", "id": 1}\n\n{"text": "yo"}\n')
    prepare([src], tmp_path / "ds")
    assert bytes(MemmapTokens(tmp_path / "ds").tokens.tolist()) == b"hi\0yo\0"
    src.write_text('{"text": "hi"}\n{"body": "x"}\n')
    with pytest.raises(PlaitError, match=r"a.jsonl:2: no text field 'text' \(found: body\)"):
        prepare([src], tmp_path / "ds2")
    assert not (tmp_path / "ds2" / "text_document.bin").exists()  # nothing half-written is left


def test_prepare_refuses_empty_binary_and_existing_outputs(tmp_path):
    empty, blank, binary = tmp_path / "e.txt", tmp_path / "b.txt", tmp_path / "x.bin"
    empty.write_text("")
    blank.write_text("\n\n  \n")
    binary.write_bytes(b"\x7fELF\x00\x01")
    with pytest.raises(PlaitError, match="it is empty"):
        prepare([empty], tmp_path / "o1")
    with pytest.raises(PlaitError, match="no documents"):
        prepare([blank], tmp_path / "o2")
    with pytest.raises(PlaitError, match="binary file"):
        prepare([binary], tmp_path / "o3")
    (tmp_path / "t.txt").write_text("text")
    prepare([tmp_path / "t.txt"], tmp_path / "o4")
    with pytest.raises(PlaitError, match="already holds a dataset"):
        prepare([tmp_path / "t.txt"], tmp_path / "o4")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PlaitError, match=r"latin1.txt:1: not UTF-8"):
        prepare([tmp_path / "latin1.txt"], tmp_path / "o5")


def test_a_megatron_dataset_from_elsewhere_is_a_source(tmp_path):
    """Written by hand as Megatron's preprocess would (int32 tokens, a document of two sequences,
    no meta.json): read unchanged, ids checked against the model's vocabulary."""
    import struct
    seqs = [np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32), np.array([300, 2], np.int32)]
    (tmp_path / "corpus_text_document.bin").write_bytes(b"".join(s.tobytes() for s in seqs))
    lengths = np.array([3, 2, 2], np.int32)
    pointers = np.array([0, 12, 20], np.int64)
    doc_idx = np.array([0, 2, 3], np.int64)  # document 0 = sequences 0 and 1
    (tmp_path / "corpus_text_document.idx").write_bytes(
        b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 4, 3, 3) + lengths.tobytes()
        + pointers.tobytes() + doc_idx.tobytes())
    prefix = str(tmp_path / "corpus_text_document")
    ds = MemmapTokens(prefix)
    assert ds.vocab is None and ds.tokens.tolist() == [5, 6, 7, 8, 9, 300, 2]
    assert ds.indexed.document_lengths().tolist() == [5, 2]
    assert open_source(prefix, 512).window(0, 3).tolist() == [5, 6, 7]
    with pytest.raises(PlaitError, match="token id 300, beyond the model's vocabulary of 256"):
        open_source(prefix, 256).window(1, 5)


def test_truncated_bin_and_bad_header_are_errors(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello world")
    prepare([src], tmp_path / "ds")
    bin_ = tmp_path / "ds" / "text_document.bin"
    bin_.write_bytes(bin_.read_bytes()[:-4])
    with pytest.raises(PlaitError, match="truncated"):
        MemmapTokens(tmp_path / "ds")
    (tmp_path / "ds" / "text_document.idx").write_bytes(b"PK\x03\x04" + b"\0" * 40)
    with pytest.raises(PlaitError, match="not a Megatron index file"):
        MemmapTokens(tmp_path / "ds")


def test_the_older_flat_format_still_reads(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    np.arange(100, dtype=np.uint16).tofile(root / "tokens.bin")
    (root / "meta.json").write_text(json.dumps({"vocab": 256, "dtype": "uint16", "num_tokens": 100}))
    assert open_source(str(root), 256).window(2, 5).tolist() == [8, 9, 10, 11, 12]


def test_worker_processes_write_the_same_dataset(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i} " * (i % 7 + 1)}) + "\n" for i in range(600)))
    prepare([src], tmp_path / "one")
    prepare([src], tmp_path / "two", workers=2)
    for name in ("text_document.bin", "text_document.idx"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_cli_inspect(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("aaaa\n\nbb\n\ncccccc")
    assert main(["data", "prepare", str(src), "-o", str(tmp_path / "ds")]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "Megatron indexed" in out and "15" in out  # 4 + 2 + 6 characters + 3 EOS
    assert "3 / 5.0 / 7" in out  # document lengths with their EOS


def _local_hf_tokenizer(root, eos):
    """A word-level HF tokenizer saved locally (no network)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "the", "cat", "sat", "</s>"]
    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"eos_token": "</s>"} if eos else {}
    transformers.PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>",
                                         **extra).save_pretrained(root)
    return str(root)


def test_prepare_with_a_hugging_face_tokenizer_ends_documents_with_its_eos(tmp_path):
    tok = _local_hf_tokenizer(tmp_path / "tok", eos=True)
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "the cat"}\n{"text": "cat sat the"}\n')
    meta = prepare([src], tmp_path / "ds", tok)
    assert (meta["eos"], meta["vocab"], meta["documents"]) == (4, 5, 2)
    assert MemmapTokens(tmp_path / "ds").tokens.tolist() == [1, 2, 4, 2, 3, 1, 4]
    with pytest.raises(PlaitError, match="has no EOS token"):
        prepare([src], tmp_path / "ds2", _local_hf_tokenizer(tmp_path / "tok2", eos=False))
