"""Which torch AdamW implementation plait's runtime steps on a device, and the bytes per parameter
that step moves: the one choice runtime/optim.py builds its optimizer from and the stack fact
``optimizer_bytes`` (the CPU device spec, the embedded local-cpu device, `plait calibrate`) is
priced from, so the plan and the program cannot disagree. Re-exported by ``plait.ir.counts``."""
from __future__ import annotations

from dataclasses import dataclass

# Device types with torch's fused AdamW kernel (torch.optim.AdamW(fused=True): torch._fused_adamw_),
# as torch 2.13's torch/utils/_foreach_utils.py lists them for fused optimizers; any floating
# dtype, and DTensor parameters too (FSDP2: the op has a pointwise sharding rule, so each rank steps its
# shard; tests/runtime/test_optim_path.py runs it).
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia")
# Device types where torch's foreach (multi-tensor) kernels run (torch/utils/_foreach_utils.py)
FOREACH_DEVICES = ("cuda", "xpu", "mtia")

# Bytes per fp32 parameter one AdamW step moves through memory, counted from torch 2.13's source:
#   fused           one kernel per tensor list (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, the
#                   CUDA multi_tensor_apply kernel): read param, grad, exp_avg, exp_avg_sq (16),
#                   write param, exp_avg, exp_avg_sq (12) = 28
#   single-tensor   torch/optim/adam.py _single_tensor_adam, one memory pass per op:
#                   p *= 1 - lr wd (8), m.lerp_(g) (12), v *= beta2 (8), v.addcmul_(g, g) (12),
#                   sqrt(v) (8), / bias correction (8), + eps (8), p.addcdiv_(m, denom) (16) = 80
#   foreach         _multi_tensor_adam runs the same ops over tensor lists: 80 bytes, fewer launches
ADAMW_STEP_BYTES = {"fused": 28, "foreach": 80, "single-tensor": 80}
# The global-norm clip before it (runtime/optim.py clip_and_step): the gradient's squared norm
# (squared_norm: read 4) and g *= coef (read 4, write 4). ZeRO-1 under tensor parallelism squares
# and masks the shard instead (runtime/zero1.py: 16 more, unpriced).
CLIP_BYTES = 12


@dataclass(frozen=True)
class AdamWPath:
    kernel: str      # "fused", "foreach" or "single-tensor": what torch.optim.AdamW is built with
    step_bytes: int  # bytes per parameter of the clip and the step (the stack fact optimizer_bytes)
    reason: str      # why, for people (`plait doctor`, `plan --explain`, the run's log)

    @property
    def fused(self) -> bool:
        return self.kernel == "fused"

    @property
    def foreach(self) -> bool:
        return self.kernel == "foreach"


def adamw_path(device_type: str, floating: bool = True) -> AdamWPath:
    """The AdamW plait's runtime steps parameters of ``device_type`` ("cpu", "cuda", ...) with:
    torch's fused kernel where torch has one and every parameter is floating point, else the
    foreach kernels where they run, else the single-tensor loop."""
    def path(kernel: str, reason: str) -> AdamWPath:
        return AdamWPath(kernel, ADAMW_STEP_BYTES[kernel] + CLIP_BYTES, reason)

    if device_type in FUSED_ADAMW_DEVICES and floating:
        return path("fused", f"torch's fused AdamW kernel runs on {device_type}")
    why = (f"torch has no fused AdamW on {device_type}" if floating
           else "a parameter is not floating point (torch's fused AdamW needs floating point)")
    if device_type in FOREACH_DEVICES:
        return path("foreach", why + ": the foreach kernels")
    return path("single-tensor", why + ": one kernel per op and parameter")


def torch_device_type(backend: str) -> str:
    """The device type a cluster's ranks run on (runtime/device.py choose): CUDA under NCCL,
    the CPU under gloo."""
    return "cuda" if backend == "nccl" else "cpu"
