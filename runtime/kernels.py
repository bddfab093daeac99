"""Fused-kernel registry: for each op a compiled program runs, the fused kernel when its package
imports and the hardware suits it, else the pure-PyTorch implementation the reference model uses.

  op                fused (CUDA)                                    fallback
  attention         flash_attn.flash_attn_func (window_size)        torch SDPA (banded mask)
  attention_varlen  flash_attn.flash_attn_varlen_func               SDPA per packed sequence
  document_attention flash_attn_varlen_func on the packed documents SDPA with a block-diagonal mask
  ring_attention    SDPA flash backend per chunk pair (CP ring)     CPU flash / explicit-score pairs
  ssd_scan          mamba_ssm mamba_chunk_scan_combined             plait SSD chunked scan
  causal_conv1d     causal_conv1d.causal_conv1d_fn                  torch conv1d + silu
  fp8_linear        torchao Float8 tensorwise GEMM (fp8 jobs), or   plait's fp8 emulation (lowering/fp8.py)
                    transformer-engine's (runtime/fp8_backends.py)

Every op has one signature whatever runs it (see the fallbacks below). Causal attention is
aligned to the bottom right when query and key lengths differ (query i sees keys up to
i + sk - sq), as flash-attn >= 2.1 does; SDPA's is_causal aligns to the top left, so the fallback
builds that mask itself. Imports are lazy and guarded with ``except Exception`` (a broken CUDA
extension raises OSError or RuntimeError, not ImportError). Each choice is logged once.

The seam with lowering (which never imports runtime): compiled graphs call the reference ops
(`causal_attention`, `ring_attention` under context parallelism, `causal_conv1d`, `ssd_scan`,
`fp8_linear` in an fp8 job's fp8 layers) as single
fx nodes; `bind` retargets those nodes
to the chosen fused kernels after lowering, on the rank that runs the program. With no fused kernel
the graph is left exactly as lowered.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.fx
import torch.nn.functional as F

from plait.lowering import cp_attention, cp_pairs, fp8
from plait.lowering.modules import attention as ref_attention
from plait.lowering.modules import mamba as ref_mamba
from plait.lowering.modules import ssd

from . import fp8_backends

log = logging.getLogger("plait.kernels")

OPS = ("attention", "attention_varlen", "document_attention", "ring_attention", "ssd_scan",
       "causal_conv1d", "fp8_linear")
MODULES = {"flash-attn": "flash_attn", "mamba-ssm": "mamba_ssm.ops.triton.ssd_combined",
           "causal-conv1d": "causal_conv1d", "torch-flash": "torch.backends.cuda",  # PyTorch's own
           **fp8_backends.PACKAGES}


@dataclass(frozen=True)
class Choice:
    op: str
    kernel: str  # what runs, for people
    fused: bool
    reason: str  # why this one
    fn: Callable = field(compare=False, repr=False)


# ---- availability (monkeypatch `probe` / `cuda_ready` in tests) --------------------------------
_PROBES: dict[str, tuple[Optional[object], str]] = {}
_LOGGED: set[tuple[str, str]] = set()


def probe(package: str) -> tuple[Optional[object], str]:
    """(module, "") when ``package`` imports, else (None, why); cached per process."""
    if package not in _PROBES:
        try:
            _PROBES[package] = (importlib.import_module(MODULES[package]), "")
        except ModuleNotFoundError:
            _PROBES[package] = (None, f"{package} is not installed")
        except Exception as err:  # a broken build: missing CUDA library, ABI mismatch, ...
            _PROBES[package] = (None, f"{package} failed to import ({type(err).__name__}: {err})")
    return _PROBES[package]


def cuda_ready(device) -> tuple[bool, str]:
    if torch.device(device).type != "cuda":
        return False, f"device is {torch.device(device).type}, fused kernels need CUDA"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    return True, ""


def reset() -> None:
    """Forget probes and logged choices (tests, or after installing a package)."""
    _PROBES.clear()
    _LOGGED.clear()
    _CHOICES.clear()


# ---- the fallbacks (the reference implementations, one signature per op) -----------------------
def bottom_right_causal_mask(sq: int, sk: int, device=None, window: Optional[int] = None) -> torch.Tensor:
    """[sq, sk] bool, True where query i may see key j: j <= i + (sk - sq), and within ``window``
    keys of it (0 <= i + (sk - sq) - j < window) when given."""
    return ref_attention.band_mask(sq, sk, sk - sq, window, device)


def sdpa_attention(q, k, v, scale: float, window: Optional[int] = None) -> torch.Tensor:
    """q [b, sq, hq, d], k/v [b, sk, hkv, d] -> [b, sq, hq, d]; causal, bottom-right aligned,
    within ``window`` keys when given."""
    sq, sk = q.shape[1], k.shape[1]
    if sq == sk:
        return ref_attention.causal_attention(q, k, v, scale, window)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    mask = bottom_right_causal_mask(sq, sk, q.device, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def sdpa_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                          max_seqlen_k: int, scale: float) -> torch.Tensor:
    """Packed q [total_q, hq, d], k/v [total_k, hkv, d]; sequence i is rows
    cu_seqlens[i]:cu_seqlens[i+1]. Causal attention within each sequence."""
    out = []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bounds_q) - 1):
        sl_q, sl_k = slice(bounds_q[i], bounds_q[i + 1]), slice(bounds_k[i], bounds_k[i + 1])
        out.append(sdpa_attention(q[None, sl_q], k[None, sl_k], v[None, sl_k], scale)[0])
    return torch.cat(out, dim=0)


# ---- the fused kernels, adapted to the same signatures -----------------------------------------
def flash_window_size(window: Optional[int]) -> tuple[int, int]:
    """flash-attn's (left, right) window: query i sees keys i - left .. i + right, -1 unbounded;
    causal masks the right side, and ``window`` keys counting the query's own is left = window - 1
    (what transformers passes for sliding_window)."""
    return (-1, -1) if window is None else (window - 1, 0)


def _flash(module):
    def attention(q, k, v, scale: float, window: Optional[int] = None):
        if v.shape[-1] != q.shape[-1]:  # flash-attn 2 checks v's head width against q's: MLA's
            return sdpa_attention(q, k, v, scale, window)  # narrower v heads run SDPA
        # window_size only with a window: flash-attn before 2.3 has no such argument
        extra = {} if window is None else {"window_size": flash_window_size(window)}
        return module.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, **extra)
    return attention


def _flash_varlen(module):
    def attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale: float):
        return module.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                             softmax_scale=scale, causal=True)
    return attention_varlen


def document_segments(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32, longest segment) of a packed batch: rows laid end to end, a segment
    starting at each row's first token and wherever the document key changes."""
    starts = torch.ones_like(documents, dtype=torch.bool)
    starts[:, 1:] = documents[:, 1:] != documents[:, :-1]
    first = starts.flatten().nonzero().flatten()
    cu = torch.cat([first, first.new_tensor([documents.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _flash_documents(module):
    def document_attention(q, k, v, scale: float, documents, window: Optional[int] = None):
        cu, longest = document_segments(documents)
        extra = {} if window is None else {"window_size": flash_window_size(window)}
        out = module.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                            cu, cu, longest, longest, softmax_scale=scale,
                                            causal=True, **extra)
        return out.view(q.shape)
    return document_attention


def _mamba_scan(module):
    def ssd_scan(x, dt, A, B, C, chunk: int):  # dt already biased and softplus'ed
        return module.mamba_chunk_scan_combined(x, dt, A, B, C, chunk)
    return ssd_scan


def _conv(module):
    def causal_conv1d(x, weight, bias):
        out = module.causal_conv1d_fn(x.transpose(1, 2), weight.squeeze(1), bias, activation="silu")
        return out.transpose(1, 2)
    return causal_conv1d


def _ring_flash(module):
    """The context-parallel ring with SDPA's flash backend per chunk pair (lowering/cp_pairs.py),
    once this torch build has it and, on a real device, it passes a self-check against the math
    kernel (an API or build problem falls back, with the reason, instead of failing mid-run)."""
    if not module.is_flash_attention_available():
        raise RuntimeError("this PyTorch build has no flash attention backend")
    if torch.cuda.is_available():
        cp_pairs.self_check("sdpa-flash", "cuda")
    return cp_attention.ring_attention_with("sdpa-flash")


@dataclass(frozen=True)
class Fused:
    package: str
    name: str
    build: Callable


@dataclass(frozen=True)
class Rule:
    fused: tuple[Fused, ...]  # tried in order (fp8_linear: in the order PLAIT_FP8_BACKEND asks)
    fallback_name: str
    fallback: Callable
    fp8_only: bool = False

    def candidates(self) -> tuple[Fused, ...]:
        """The fused kernels to try; the fp8 GEMM's are the user's choice (fp8_backends.order)."""
        if not self.fp8_only:
            return self.fused
        by_name = {f.package: f for f in self.fused}
        return tuple(by_name[name] for name in fp8_backends.order())


def _rule(package, fused_name, build, fallback_name, fallback, fp8_only=False) -> Rule:
    return Rule((Fused(package, fused_name, build),), fallback_name, fallback, fp8_only)


RULES = {
    "attention": _rule("flash-attn", "flash-attn flash_attn_func", _flash,
                      "torch SDPA (bottom-right causal)", sdpa_attention),
    "attention_varlen": _rule("flash-attn", "flash-attn flash_attn_varlen_func", _flash_varlen,
                             "torch SDPA per packed sequence", sdpa_varlen_attention),
    "document_attention": _rule("flash-attn", "flash-attn flash_attn_varlen_func (documents)",
                                _flash_documents, "torch SDPA (block-diagonal causal mask)",
                                ref_attention.document_attention),
    "ring_attention": _rule("torch-flash", "SDPA flash backend per ring chunk pair (bf16/fp16; LSE merge)",
                           _ring_flash, "PyTorch ring chunk pairs (CPU flash kernel on CPU, explicit "
                           "scores elsewhere)", cp_attention.ring_attention),
    "ssd_scan": _rule("mamba-ssm", "mamba_ssm mamba_chunk_scan_combined", _mamba_scan,
                     "plait SSD chunked scan (PyTorch)", ssd.ssd_chunked),
    "causal_conv1d": _rule("causal-conv1d", "causal_conv1d_fn", _conv,
                          "torch conv1d + silu", ref_mamba.causal_conv1d),
    "fp8_linear": Rule(
        (Fused("torchao", "torchao Float8 GEMM (tensorwise, dynamic)",
               fp8_backends.checked(fp8_backends.torchao_linear)),
         Fused("transformer-engine", "transformer-engine fp8 GEMM (per-tensor current scaling)",
               fp8_backends.checked(fp8_backends.te_linear))),
        "plait fp8 emulation (float8_e4m3fn / e5m2 quantise-dequantise)", fp8.fp8_linear,
        fp8_only=True),
}


def _decide(op: str, device, fp8: bool) -> Choice:
    rule = RULES[op]
    if rule.fp8_only and not fp8:
        return Choice(op, "(not used)", False, "the job does not train in fp8", rule.fallback)
    ok, why = cuda_ready(device)
    candidates = rule.candidates()
    if not candidates:  # fp8 with PLAIT_FP8_BACKEND=emulation
        return Choice(op, rule.fallback_name, False, f"{fp8_backends.ENV}=emulation", rule.fallback)
    reasons = []
    for fused in candidates:
        module, missing = probe(fused.package)
        if not ok or module is None:
            reasons.append(missing or f"{fused.package} is installed")
            continue
        try:
            fn = fused.build(module)
        except Exception as err:  # an API the adapter does not know, a failed self-check
            reasons.append(f"{fused.package}: {err}")
            continue
        reasons.append(f"{fused.package} imports and CUDA is available")
        return Choice(op, fused.name, True, "; ".join(reasons), fn)
    return Choice(op, rule.fallback_name, False, "; ".join(([] if ok else [why]) + reasons),
                  rule.fallback)


_CHOICES: dict[tuple[str, str, bool], Choice] = {}


def select(op: str, device="cpu", fp8: bool = False) -> Choice:
    """The kernel for ``op`` on ``device`` (decided once per process: every caller, doctor and
    bind alike, gets the same function); the first time a choice is made it is logged."""
    if op not in RULES:
        raise KeyError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    key = (op, torch.device(device).type, fp8)
    if key not in _CHOICES:
        _CHOICES[key] = choice = _decide(op, device, fp8)
        if (op, choice.kernel) not in _LOGGED:
            _LOGGED.add((op, choice.kernel))
            log.info("kernel %s: %s (%s)", op, choice.kernel, choice.reason)
    return _CHOICES[key]


def report(device="cpu", fp8: bool = False) -> list[Choice]:
    return [select(op, device, fp8) for op in OPS]


# ---- the seam: retarget a lowered graph's reference ops ------------------------------------------
SEAMS = {ref_attention.causal_attention: "attention",
         ref_attention.document_attention: "document_attention",
         ref_mamba.causal_conv1d: "causal_conv1d",
         ref_mamba.ssd_scan: "ssd_scan", fp8.fp8_linear: "fp8_linear",
         cp_attention.ring_attention: "ring_attention"}
SEAM_OPS = {op: fn for fn, op in SEAMS.items()}  # the reference function a graph calls per op


def bound(reference: Callable, device="cpu", fp8: bool = False) -> tuple[Callable, str]:
    """(the function a compiled graph's node calling ``reference`` runs after ``bind`` on
    ``device``, what it is for people): the fused kernel ``select`` picks for its op, else
    ``reference`` itself, as ``bind`` leaves it. `plait calibrate` times ops through this, so the
    rates it measures are the program's."""
    op = SEAMS.get(reference)
    if op is None:
        return reference, reference.__name__
    choice = select(op, device, fp8)
    return (choice.fn, choice.kernel) if choice.fused else (reference, choice.kernel)


def bind(gm: torch.fx.GraphModule, device="cpu", fp8: bool = False) -> dict[str, str]:
    """Point every reference-op node of ``gm`` (and its child graphs) at the kernel ``select``
    (and so `plait doctor`) reports for it; returns {node name: kernel} for every such node, fused
    or not. A node whose op has no fused kernel keeps its reference function."""
    bound = {}
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        changed = False
        for node in module.graph.nodes:
            op = SEAMS.get(node.target) if node.op == "call_function" else None
            if op is None:
                continue
            choice = select(op, device, fp8)
            bound[node.name] = choice.kernel
            if choice.fused:
                node.target, changed = choice.fn, True
                node.meta[KERNEL] = op
        if changed:
            module.recompile()
    return bound


KERNEL = "plait.kernel"  # node meta: the op a fused kernel was bound for


def bound_ops(gm: torch.fx.GraphModule) -> dict[str, tuple[str, Callable]]:
    """{node name: (op, function it calls)} for every kernel-op node of a compiled program, before
    or after ``bind`` (what a test compares with ``report``)."""
    out = {}
    for module in gm.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                op = node.meta.get(KERNEL) or (SEAMS.get(node.target) if node.op == "call_function" else None)
                if op is not None:
                    out[node.name] = (op, node.target)
    return out
