"""The precision policy (ir/precision.py): dtypes per kind, the BF16-ends rule, the DSL's
fp8(bf16_ends = N) with Nemotron-H's default of 4, fmt round trips, recipes the runtime runs."""
import dataclasses

import pytest

from plait.ir.dsl import parse_text
from plait.ir.dsl.fmt import format_library
from plait.ir.errors import PlaitError
from plait.ir.job import Precision
from plait.ir.precision import PrecisionPolicy

MODEL = """
model "m" {
  vocab = 256
  hidden = 64
  attention { heads = 4, kv_heads = 2, rope = none }
  mlp { ffn = 128 }
  layers = 6 * [attention, mlp]
}
"""


def _job(precision: str):
    return parse_text(MODEL + f'train "t" {{ model = "m", global_batch = 8, seq_len = 64, '
                      f'precision = {precision} }}').jobs["t"]


@pytest.mark.parametrize("kind, param, mixed", [("fp32", "float32", False), ("bf16", "bfloat16", True),
                                                ("fp8", "bfloat16", True)])
def test_dtypes_per_kind(kind, param, mixed):
    p = PrecisionPolicy.from_precision(Precision(kind), 12)
    assert (p.param_dtype, p.mixed) == (param, mixed)
    assert p.main_dtype == p.reduce_dtype == "float32"  # main weights, grads, Adam: always fp32


def test_plain_fp8_keeps_nemotron_h_default_of_four_bf16_layers_at_each_end():
    p = PrecisionPolicy.of(_job("fp8"))
    assert p.fp8_layers == tuple(range(4, 8))
    assert [p.gemm_precision(i) for i in (0, 3, 4, 7, 8, 11)] == ["bf16", "bf16", "fp8", "fp8", "bf16", "bf16"]
    assert PrecisionPolicy.of(_job("bf16")).fp8_layers == ()


def test_bf16_ends_and_skip_first_last():
    assert PrecisionPolicy.of(_job("fp8(bf16_ends = 1)")).fp8_layers == tuple(range(1, 11))
    assert PrecisionPolicy.of(_job("fp8(bf16_ends = 0)")).fp8_layers == tuple(range(12))
    assert PrecisionPolicy.of(_job("fp8(skip_first = 2, skip_last = 0)")).fp8_layers == tuple(range(2, 12))


def test_describe_names_the_bf16_layers_of_a_stage():
    p = PrecisionPolicy.of(_job("fp8(bf16_ends = 2)"))
    assert p.describe() == "fp8 (bf16 GEMMs: layers 0-1, 10-11)"
    assert p.describe(4, 8) == "fp8" and p.describe(0, 2) == "bf16 (fp8 recipe's bf16 ends)"
    assert PrecisionPolicy.of(_job("bf16")).describe(0, 3) == "bf16"


@pytest.mark.parametrize("text", ["fp8", "fp8(bf16_ends = 2)", "fp8(skip_first = 1, skip_last = 3)",
                                  "fp8(recipe = tensorwise, bf16_ends = 0)"])
def test_fmt_round_trips_fp8_options(text):
    lib = parse_text(MODEL + f'train "t" {{ model = "m", global_batch = 8, seq_len = 64, precision = {text} }}')
    again = parse_text(format_library(lib))
    assert again.jobs == lib.jobs


def test_the_runtime_refuses_recipes_it_does_not_run():
    PrecisionPolicy.of(_job("fp8(recipe = tensorwise)")).check_runnable()
    PrecisionPolicy.of(_job("fp8")).check_runnable()  # no recipe: tensorwise
    with pytest.raises(PlaitError, match="tensorwise") as err:
        PrecisionPolicy.of(_job("fp8(recipe = delayed)")).check_runnable()
    assert "export megatron" in err.value.hint


def test_a_job_without_precision_in_code_is_fp32():
    job = dataclasses.replace(_job("bf16"), precision=None)
    assert PrecisionPolicy.of(job).kind == "fp32"
