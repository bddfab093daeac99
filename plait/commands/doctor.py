"""`plait doctor`: what this machine would run — torch, devices, and the kernel chosen for each op
(runtime/kernels.py) with the reason: the same choice `plait run` binds into the compiled program.
With --fp8 it also names the fp8 GEMM backend (torchao or transformer-engine on CUDA, chosen as
PLAIT_FP8_BACKEND / --fp8-backend says; plait's emulation elsewhere) and why."""
from __future__ import annotations

import os
import platform

from rich.table import Table

from plait.cli import arguments, command, console

FP8_BACKENDS = ("auto", "torchao", "transformer-engine", "emulation")  # runtime/fp8_backends.py


def _device_line() -> str:
    import torch  # here, not at the top: every `plait` command imports this module

    if torch.cuda.is_available():
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {', '.join(sorted(names))}"
    return "no CUDA device (gloo on CPU)"


def _optimizer_line(device: str) -> str:
    """The AdamW `plait run` steps on ``device`` (fp32 main weights: floating point), and the
    bytes per parameter the cost model's optimizer_bytes prices it at."""
    from plait.ir import counts

    path = counts.adamw_path(device)
    return (f"optimizer: torch AdamW, {path.kernel} ({path.reason}); with the global-norm clip "
            f"{path.step_bytes} bytes per parameter (the stack fact optimizer_bytes)")


@command("doctor", help="print the active fused kernel per op and why (flash-attn, mamba-ssm, ...)")
@arguments(lambda p: (p.add_argument("--device", default=None,
                                     help="cuda or cpu (default: cuda when available)"),
                      p.add_argument("--fp8", action="store_true",
                                     help="as for an fp8 job: which fp8 GEMM backend runs the linears"),
                      p.add_argument("--fp8-backend", choices=FP8_BACKENDS, default=None,
                                     help="as PLAIT_FP8_BACKEND (which `plait run` reads on every "
                                          "rank): auto (torchao, else transformer-engine), torchao, "
                                          "transformer-engine, emulation")))
def doctor(args) -> int:
    import torch

    from plait.runtime import kernels

    if args.fp8_backend:
        os.environ["PLAIT_FP8_BACKEND"] = args.fp8_backend
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    console.print(f"python {platform.python_version()}, torch {torch.__version__}; {_device_line()}")
    table = Table(title=f"kernels on {device}{' with fp8' if args.fp8 else ''}")
    for col in ("op", "kernel", "fused", "why"):
        table.add_column(col)
    for choice in kernels.report(device, args.fp8):
        table.add_row(choice.op, choice.kernel, "yes" if choice.fused else "no", choice.reason)
    console.print(table)
    console.print(_optimizer_line(device))
    if args.fp8:
        fp8 = kernels.select("fp8_linear", device, True)
        asked = os.environ.get("PLAIT_FP8_BACKEND", "auto")
        console.print(f"fp8 backend: {fp8.kernel} (PLAIT_FP8_BACKEND={asked}: {fp8.reason}); "
                      "tensorwise current scaling (TP shards: whole-tensor amax), E4M3 inputs and "
                      "weights, E5M2 gradients, first / last bf16_ends layers in bf16")
    return 0
