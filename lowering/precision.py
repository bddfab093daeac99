"""The precision policy (ir/precision.py) in torch terms: the dtypes lowering builds the model in
and the runtime keeps main weights, gradients and optimizer state in."""
from __future__ import annotations

import torch

from plait.ir.precision import PrecisionPolicy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def param_dtype(policy: PrecisionPolicy) -> torch.dtype:
    """Parameters and activations of the compiled program."""
    return DTYPES[policy.param_dtype]


def main_dtype(policy: PrecisionPolicy) -> torch.dtype:
    """Main weights, gradient accumulation and reduction, Adam moments."""
    return DTYPES[policy.main_dtype]


def reduce_dtype(policy: PrecisionPolicy) -> torch.dtype:
    return DTYPES[policy.reduce_dtype]
