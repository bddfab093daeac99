"""Bytes of weights, gradients and optimizer state per parameter, by precision and data-parallel
kind: the one source the planner's memory model, the runtime's memory checks and the tests read.
Re-exported by ``plait.ir.counts``."""
from __future__ import annotations

from typing import Union

from ..errors import PlaitError
from ..job import Precision
from ..precision import PrecisionPolicy


FP32_BYTES = 4
BF16_BYTES = 2
_FP32, _BF16 = FP32_BYTES, BF16_BYTES
# Under fp8 the linears cast the bf16 weights to fp8 on every use (torchao's tensorwise dynamic
# scaling, and plait's emulation of it): no fp8 copy of the weights outlives a GEMM.


STATE_CLASSES = ("weights", "grads", "master", "master_grads", "moments")


def state_tensor_bytes(precision: Union[Precision, str], dp_kind: str = "zero1",
                       shards: int = 1) -> dict[str, float]:
    """Bytes per model parameter held on ONE rank, per tensor class (STATE_CLASSES), for Adam:

      weights       the model's parameters (bf16 / fp8 runs: bf16; fp8 casts live only per GEMM)
      grads         their gradients (fp32 main grads under bf16 / fp8, as Megatron keeps them)
      master        an fp32 copy the optimizer updates: always under bf16 / fp8; under fp32 only
                    ZeRO-1, whose flat shard is a separate fp32 tensor in plait's runtime
      master_grads  a separate gradient of that copy: none in plait's runtime, whose ZeRO-1
                    reduce-scatters into its flat gradient buffer's own shard in every precision
                    (runtime/zero1.py)
      moments       Adam's m and v, fp32
    replicated: nothing sharded; zero1: master, master_grads, moments / shards; fsdp: every
    class / shards (the transiently gathered layer is the memory model's FSDP buffer). FSDP2's
    mixed precision keeps only the fp32 shards (the master) and casts a bf16 copy of the gathered
    layer for compute: no resident bf16 weights.
    """
    kind = precision.kind if isinstance(precision, Precision) else precision
    if shards < 1:
        raise PlaitError(f"data-parallel shards must be >= 1, got {shards}")
    if kind not in ("fp32", "bf16", "fp8"):
        raise PlaitError(f"unknown precision {kind!r}", hint="one of bf16, fp8, fp32")
    if dp_kind not in ("replicated", "zero1", "fsdp"):
        raise PlaitError(f"unknown data-parallel kind {dp_kind!r}",
                         hint="one of replicated, zero1, fsdp")
    mixed = kind != "fp32"
    full = {"weights": (0 if dp_kind == "fsdp" else _BF16) if mixed else _FP32,
            "grads": _FP32,
            "master": _FP32 if mixed or dp_kind == "zero1" else 0,
            "master_grads": 0,
            "moments": 2 * _FP32}
    sharded = {"replicated": (), "zero1": ("master", "master_grads", "moments"),
               "fsdp": STATE_CLASSES}[dp_kind]
    return {k: v / shards if k in sharded else float(v) for k, v in full.items()}


def param_state_bytes(precision: Union[Precision, str], dp_kind: str = "zero1",
                      shards: int = 1) -> dict[str, float]:
    """Bytes per model parameter held on ONE rank, given ``shards`` data-parallel ranks sharing it.

    replicated: everything full. zero1 (Megatron's distributed optimizer): weights and grads full,
    optimizer state (incl. fp32 master) / shards. fsdp: weights, grads and optimizer all / shards
    (the transiently gathered layer is activation-like; the planner's memory model owns it).
    Returns {"weights", "grads", "optimizer", "total"}; optimizer = master + master_grads +
    moments of ``state_tensor_bytes``.
    """
    t = state_tensor_bytes(precision, dp_kind, shards)
    out = {"weights": t["weights"], "grads": t["grads"],
           "optimizer": t["master"] + t["master_grads"] + t["moments"]}
    out["total"] = sum(out.values())
    return out


# What the data-parallel collectives move per parameter (one source for ZeRO-1 and FSDP, the
# planner's cost model and its tests). Weights travel in the compute dtype: the bf16 copy of the
# fp32 master under bf16 / fp8 (FSDP2's MixedPrecisionPolicy(param_dtype=bf16), Megatron's
# distributed optimizer gathering bf16 params). Gradients are reduced in fp32
# (ir/precision.PrecisionPolicy.reduce_dtype; Megatron-LM megatron/training/arguments.py
# validate_args: "bfloat16 requires gradient accumulation and all-reduce to be done in fp32").
# FSDP with reshard_after_forward (runtime/fsdp.py; Megatron-FSDP optim_grads_params) frees a
# unit's gathered weights after its forward, so every micro-batch gathers each unit twice (before
# forward, again before backward; a full recompute reuses the backward's gather) and
# reduce-scatters its gradients once.
FSDP_GATHERS_PER_MICROBATCH = 2
FSDP_SCATTERS_PER_MICROBATCH = 1
_DTYPE_BYTES = {"float32": _FP32, "bfloat16": _BF16}


def dp_traffic_bytes(precision: Union[Precision, str]) -> tuple[int, int]:
    """(bytes per parameter a weight all-gather moves, bytes per parameter a gradient reduction
    moves) under ``precision``: (2, 4) for bf16 and fp8, (4, 4) for fp32."""
    kind = precision.kind if isinstance(precision, Precision) else precision
    if kind not in ("fp32", "bf16", "fp8"):
        raise PlaitError(f"unknown precision {kind!r}", hint="one of bf16, fp8, fp32")
    policy = PrecisionPolicy(kind, 1)
    return _DTYPE_BYTES[policy.param_dtype], _DTYPE_BYTES[policy.reduce_dtype]


def fsdp_bytes_per_microbatch(params: float, precision: Union[Precision, str]) -> float:
    """Bytes FSDP's collectives move per micro-batch for ``params`` parameters (full, gathered
    size): two gathers of the weights and one reduce-scatter of the gradients."""
    gather, scatter = dp_traffic_bytes(precision)
    return params * (FSDP_GATHERS_PER_MICROBATCH * gather + FSDP_SCATTERS_PER_MICROBATCH * scatter)


# Bytes per parameter one optimizer step moves through memory (fp32 state). A fused Adam
# (Megatron-Core's, the stack of the reference rows): read the gradient, the fp32 master weight,
# m and v, write the master, m, v and the bf16 copy: 4 x 4 + 3 x 4 + 2 = 30. plait's own runtime
# steps what counts/optimizer.py adamw_path says (40 with torch's fused kernel and the clip).
FUSED_ADAM_STEP_BYTES = 30


# Bytes per stored parameter (a checkpoint or inference footprint, no training state).
STORED_WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1}


def stored_weight_bytes(precision: Union[Precision, str]) -> int:
    """Bytes one parameter takes in a checkpoint / for inference at ``precision``."""
    kind = precision.kind if isinstance(precision, Precision) else precision
    if kind not in STORED_WEIGHT_BYTES:
        raise PlaitError(f"unknown precision {kind!r}", hint="one of " + ", ".join(STORED_WEIGHT_BYTES))
    return STORED_WEIGHT_BYTES[kind]
