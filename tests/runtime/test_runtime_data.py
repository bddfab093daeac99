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
    assert bytes(tokens.tolist()).decode() == "héllo\n\n"
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
    assert "tokens (byte tokenizer" in capsys.readouterr().out
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "missing.txt" in err and "Traceback" not in err
