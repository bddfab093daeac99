"""Fused-kernel registry: for each op a compiled program runs, the fused kernel when its package
imports and the hardware suits it, else the pure-PyTorch implementation the reference model uses.

  op                fused (CUDA)                                    fallback
  attention         flash_attn.flash_attn_func                      torch SDPA
  attention_varlen  flash_attn.flash_attn_varlen_func               SDPA per packed sequence
  ssd_scan          mamba_ssm mamba_chunk_scan_combined             plait SSD chunked scan
  causal_conv1d     causal_conv1d.causal_conv1d_fn                  torch conv1d + silu
  linear, norm      transformer_engine.pytorch (only with fp8)      torch.nn / plait norms

Every op has one signature whatever runs it (see the fallbacks below). Causal attention is
aligned to the bottom right when query and key lengths differ (query i sees keys up to
i + sk - sq), as flash-attn >= 2.1 does; SDPA's is_causal aligns to the top left, so the fallback
builds that mask itself. Imports are lazy and guarded with ``except Exception`` (a broken CUDA
extension raises OSError or RuntimeError, not ImportError). Each choice is logged once.

The seam with lowering (which never imports runtime): compiled graphs call the reference ops
(`causal_attention`, `causal_conv1d`, `ssd_scan`) as single fx nodes; `bind` retargets those nodes
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
from torch import nn

from plait.lowering.modules import attention as ref_attention
from plait.lowering.modules import mamba as ref_mamba
from plait.lowering.modules import ssd
from plait.lowering.modules.norms import RMSNorm

log = logging.getLogger("plait.kernels")

OPS = ("attention", "attention_varlen", "ssd_scan", "causal_conv1d", "linear", "norm")
MODULES = {"flash-attn": "flash_attn", "mamba-ssm": "mamba_ssm.ops.triton.ssd_combined",
           "causal-conv1d": "causal_conv1d", "transformer-engine": "transformer_engine.pytorch"}


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


# ---- the fallbacks (the reference implementations, one signature per op) -----------------------
def bottom_right_causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """[sq, sk] bool, True where query i may see key j: j <= i + (sk - sq)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(diagonal=sk - sq)


def sdpa_attention(q, k, v, scale: float) -> torch.Tensor:
    """q [b, sq, hq, d], k/v [b, sk, hkv, d] -> [b, sq, hq, d]; causal, bottom-right aligned."""
    sq, sk = q.shape[1], k.shape[1]
    if sq == sk:
        return ref_attention.causal_attention(q, k, v, scale)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    repeat = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    mask = bottom_right_causal_mask(sq, sk, q.device)
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


def torch_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


def torch_norm(kind: str, dim: int, eps: float) -> nn.Module:
    return RMSNorm(dim, eps) if kind == "rmsnorm" else nn.LayerNorm(dim, eps=eps)


# ---- the fused kernels, adapted to the same signatures -----------------------------------------
def _flash(module):
    def attention(q, k, v, scale: float):
        return module.flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
    return attention


def _flash_varlen(module):
    def attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale: float):
        return module.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k,
                                             softmax_scale=scale, causal=True)
    return attention_varlen


def _mamba_scan(module):
    def ssd_scan(x, dt, A, B, C, chunk: int):  # dt already biased and softplus'ed
        return module.mamba_chunk_scan_combined(x, dt, A, B, C, chunk)
    return ssd_scan


def _conv(module):
    def causal_conv1d(x, weight, bias):
        out = module.causal_conv1d_fn(x.transpose(1, 2), weight.squeeze(1), bias, activation="silu")
        return out.transpose(1, 2)
    return causal_conv1d


def _te_linear(module):
    return lambda in_features, out_features, bias=True: module.Linear(in_features, out_features, bias=bias)


def _te_norm(module):
    def norm(kind: str, dim: int, eps: float):
        return module.RMSNorm(dim, eps=eps) if kind == "rmsnorm" else module.LayerNorm(dim, eps=eps)
    return norm


@dataclass(frozen=True)
class Rule:
    package: str
    fused_name: str
    build: Callable
    fallback_name: str
    fallback: Callable
    fp8_only: bool = False


RULES = {
    "attention": Rule("flash-attn", "flash-attn flash_attn_func", _flash,
                      "torch SDPA (bottom-right causal)", sdpa_attention),
    "attention_varlen": Rule("flash-attn", "flash-attn flash_attn_varlen_func", _flash_varlen,
                             "torch SDPA per packed sequence", sdpa_varlen_attention),
    "ssd_scan": Rule("mamba-ssm", "mamba_ssm mamba_chunk_scan_combined", _mamba_scan,
                     "plait SSD chunked scan (PyTorch)", ssd.ssd_chunked),
    "causal_conv1d": Rule("causal-conv1d", "causal_conv1d_fn", _conv,
                          "torch conv1d + silu", ref_mamba.causal_conv1d),
    "linear": Rule("transformer-engine", "transformer_engine Linear (fp8)", _te_linear,
                   "torch.nn.Linear", torch_linear, fp8_only=True),
    "norm": Rule("transformer-engine", "transformer_engine RMSNorm / LayerNorm", _te_norm,
                 "plait RMSNorm / torch LayerNorm", torch_norm, fp8_only=True),
}


def _decide(op: str, device, fp8: bool) -> Choice:
    rule = RULES[op]
    if rule.fp8_only and not fp8:
        return Choice(op, rule.fallback_name, False, "fp8 not requested", rule.fallback)
    ok, why = cuda_ready(device)
    module, missing = probe(rule.package)
    if not ok:
        installed = missing or f"{rule.package} is installed"
        return Choice(op, rule.fallback_name, False, f"{why}; {installed}", rule.fallback)
    if module is None:
        return Choice(op, rule.fallback_name, False, missing, rule.fallback)
    try:
        fn = rule.build(module)
    except Exception as err:  # an API the adapter does not know
        return Choice(op, rule.fallback_name, False, f"{rule.package}: {err}", rule.fallback)
    return Choice(op, rule.fused_name, True, f"{rule.package} imports and CUDA is available", fn)


def select(op: str, device="cpu", fp8: bool = False) -> Choice:
    """The kernel for ``op`` on ``device``; the first time a choice is made it is logged."""
    if op not in RULES:
        raise KeyError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    choice = _decide(op, device, fp8)
    if (op, choice.kernel) not in _LOGGED:
        _LOGGED.add((op, choice.kernel))
        log.info("kernel %s: %s (%s)", op, choice.kernel, choice.reason)
    return choice


def report(device="cpu", fp8: bool = False) -> list[Choice]:
    return [select(op, device, fp8) for op in OPS]


# ---- the seam: retarget a lowered graph's reference ops ------------------------------------------
SEAMS = {ref_attention.causal_attention: "attention", ref_mamba.causal_conv1d: "causal_conv1d",
         ref_mamba.ssd_scan: "ssd_scan"}


def bind(gm: torch.fx.GraphModule, device="cpu", fp8: bool = False) -> dict[str, str]:
    """Point every reference-op node of ``gm`` (and its child graphs) at the chosen fused kernel;
    returns {node name: kernel}. Nodes keep their reference op when no fused kernel applies."""
    swapped = {}
    for module in gm.modules():
        if not isinstance(module, torch.fx.GraphModule):
            continue
        for node in module.graph.nodes:
            op = SEAMS.get(node.target) if node.op == "call_function" else None
            choice = select(op, device, fp8) if op else None
            if choice is not None and choice.fused:
                node.target = choice.fn
                swapped[node.name] = choice.kernel
        if swapped:
            module.recompile()
    return swapped
