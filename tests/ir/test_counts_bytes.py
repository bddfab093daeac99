"""Bytes per parameter of weights, gradients and optimizer state."""
import pytest

from plait.ir import counts
from plait.ir.errors import PlaitError
from plait.ir.job import Precision


def test_bf16_mixed_precision_replicated_is_18_bytes():
    # bf16 weights 2, fp32 main grads 4, fp32 master + Adam m + v 12 (Megatron's table)
    b = counts.param_state_bytes(Precision("bf16"), "replicated", shards=8)
    assert (b["weights"], b["grads"], b["optimizer"], b["total"]) == (2, 4, 12, 18)


def test_distributed_optimizer_shards_only_the_optimizer_state():
    b = counts.param_state_bytes("bf16", "zero1", shards=8)
    assert (b["weights"], b["grads"], b["optimizer"]) == (2, 4, 1.5)
    assert b["total"] == 6 + 12 / 8


def test_fsdp_shards_everything():
    b = counts.param_state_bytes("bf16", "fsdp", shards=4)
    # FSDP2 mixed precision: fp32 shards (the master) + fp32 grads + m + v; bf16 only gathered
    assert (b["weights"], b["grads"], b["optimizer"]) == (0, 1, 3)
    assert counts.param_state_bytes("fp32", "fsdp", shards=4)["total"] == 16 / 4


def test_fp32_has_no_master_copy():
    b = counts.param_state_bytes("fp32", "replicated")
    assert (b["weights"], b["grads"], b["optimizer"], b["total"]) == (4, 4, 8, 16)


def test_fp8_keeps_no_fp8_weight_copy():
    # tensorwise dynamic scaling casts the bf16 weight per GEMM (torchao, plait's emulation)
    fp8 = counts.param_state_bytes(Precision("fp8", fp8_recipe="tensorwise"), "zero1", shards=2)
    assert fp8 == counts.param_state_bytes("bf16", "zero1", shards=2)


@pytest.mark.parametrize("args,word", [(("fp16", "zero1"), "precision"),
                                       (("bf16", "zero3"), "data-parallel kind"),
                                       (("bf16", "zero1", 0), "shards")])
def test_bad_arguments_are_errors(args, word):
    with pytest.raises(PlaitError, match=word):
        counts.param_state_bytes(*args)


def test_data_parallel_traffic_moves_compute_dtype_weights_and_fp32_gradients():
    """Weights travel as the compute copy (bf16 under bf16 / fp8), gradients are reduced in fp32
    (Megatron-LM forces it for bf16; plait's FSDP2 reduce_dtype)."""
    assert counts.dp_traffic_bytes("bf16") == (2, 4)
    assert counts.dp_traffic_bytes(Precision(kind="fp8")) == (2, 4)
    assert counts.dp_traffic_bytes("fp32") == (4, 4)
    with pytest.raises(PlaitError):
        counts.dp_traffic_bytes("fp16")


def test_fsdp_moves_two_gathers_and_one_scatter_per_microbatch():
    """Mixtral-8x22B's 141B parameters under bf16: 2 x 282 GB of weights + 564 GB of gradients
    = 1.128 TB per micro-batch (the full tensor; each rank sends (n - 1) / n of it)."""
    assert counts.FSDP_GATHERS_PER_MICROBATCH == 2 and counts.FSDP_SCATTERS_PER_MICROBATCH == 1
    assert counts.fsdp_bytes_per_microbatch(141e9, "bf16") == pytest.approx(1.128e12, rel=1e-12)
    assert counts.fsdp_bytes_per_microbatch(1.0, "fp32") == 12.0
