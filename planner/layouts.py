"""Legal folded 5D layouts: the rules (as data, each with a message that shows the arithmetic), the
pins a job or a command line may set, and the enumeration the search walks.

Dense side: tp x cp x dp x pp = world. Expert side: etp x ep x edp x pp = world. PP is shared.
The pipeline splits the model at *units*: the smallest repeating block of layers (a Llama decoder
layer [attention, mlp] is one unit) or, for a non-periodic hybrid pattern, single layers.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable, Iterator, Optional

from plait.ir.errors import LayoutError
from plait.ir.job import LAYOUT_KEYS, TrainJob
from plait.ir.model import ModelSpec
from plait.ir.plan import DP_KINDS, RECOMPUTE, Layout

from .groups import parse_order

DISPATCHERS = ("alltoall", "allgather")
CP_COMMS = ("ring", "alltoall")  # context-parallel attention: K/V ring | all-to-all (Ulysses)
DP_SHARD_NAMES = {"replicated": "replicated", "none": "replicated", "zero1": "zero1",
                  "distributed": "zero1", "fsdp": "fsdp", "zero3": "fsdp"}
INT_KEYS = ("tp", "cp", "dp", "pp", "vpp", "ep", "etp", "edp", "mbs")


# ------------------------------------------------------------------------------------------------
# Pipeline units
# ------------------------------------------------------------------------------------------------

def units(model: ModelSpec) -> tuple[tuple[str, ...], ...]:
    """The layer sequence cut into pipeline units: repeats of its smallest period when the model is
    periodic (every unit identical), otherwise one unit per layer."""
    return _units(model.layers)


@lru_cache(maxsize=256)
def _units(layers: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    n = len(layers)
    for p in range(1, n // 2 + 1):
        if n % p == 0 and layers == layers[:p] * (n // p):
            return (layers[:p],) * (n // p)
    return tuple((k,) for k in layers)


def unit_name(model: ModelSpec) -> str:
    u = units(model)
    return "decoder layers" if len(u[0]) > 1 else "layers"


# ------------------------------------------------------------------------------------------------
# Rules: each takes (job, layout) and returns None or the reason, with its arithmetic
# ------------------------------------------------------------------------------------------------

def _divides(what: str, value: int, by_name: str, by: int) -> Optional[str]:
    if by > 0 and value % by == 0:
        return None
    return f"{what} ({value}) must be divisible by {by_name} ({by}): {value} % {by} = {value % by}"


def rule_world(job: TrainJob, lay: Layout) -> Optional[str]:
    w = job.cluster.world
    if lay.world != w:
        return (f"tp*cp*dp*pp = {lay.tp}*{lay.cp}*{lay.dp}*{lay.pp} = {lay.world} but the cluster has "
                f"{w} GPUs")
    return None


def rule_expert_world(job: TrainJob, lay: Layout) -> Optional[str]:
    if lay.expert_world != lay.world:
        return (f"etp*ep*edp*pp = {lay.etp}*{lay.ep}*{lay.edp}*{lay.pp} = {lay.expert_world} but "
                f"tp*cp*dp*pp = {lay.world}")
    return None


def rule_attention_heads(job: TrainJob, lay: Layout) -> Optional[str]:
    a = job.model.attention if "attention" in job.model.layers else None
    if a is None:
        return None
    return (_divides("attention heads", a.heads, "tp", lay.tp)
            or _divides("kv_heads", a.kv_heads, "tp", lay.tp))


def rule_mamba_heads(job: TrainJob, lay: Layout) -> Optional[str]:
    m = job.model.mamba if job.model.is_hybrid else None
    if m is None:
        return None
    return _divides("mamba heads", m.heads, "tp", lay.tp) or _divides("mamba groups", m.groups, "tp",
                                                                      lay.tp)


def rule_ffn(job: TrainJob, lay: Layout) -> Optional[str]:
    model = job.model
    if "mlp" in model.layers and model.mlp is not None:
        r = _divides("mlp ffn", model.mlp.ffn, "tp", lay.tp)
        if r:
            return r
    if model.is_moe:
        moe = model.moe
        return (_divides("expert ffn", moe.ffn, "etp", lay.etp)
                or (moe.shared_ffn and _divides("shared expert ffn", moe.shared_ffn, "tp", lay.tp))
                or None)
    return None


def rule_experts(job: TrainJob, lay: Layout) -> Optional[str]:
    if not job.model.is_moe:
        if lay.ep != 1 or lay.etp != lay.tp:
            return (f"model {job.model.name!r} has no MoE layers: ep must be 1 and etp equal tp "
                    f"(got ep={lay.ep}, etp={lay.etp}, tp={lay.tp})")
        return None
    return _divides("experts", job.model.moe.experts, "ep", lay.ep)


def rule_context(job: TrainJob, lay: Layout) -> Optional[str]:
    if lay.cp > 1 and job.seq_len % (2 * lay.cp):
        return (f"seq_len ({job.seq_len}) must be divisible by 2*cp = {2 * lay.cp} (load-balanced "
                f"causal context parallelism): {job.seq_len} % {2 * lay.cp} = "
                f"{job.seq_len % (2 * lay.cp)}")
    if lay.cp > 1 and lay.cp_comm not in CP_COMMS:
        return f"cp_comm = {lay.cp_comm!r} is not one of {', '.join(CP_COMMS)}"
    if lay.cp > 1 and lay.cp_comm == "alltoall" and "attention" in job.model.layers:
        heads = job.model.attention.heads // lay.tp
        return _divides("attention heads per tp rank", heads, "cp (all-to-all)", lay.cp)
    return None


def rule_sequence_parallel(job: TrainJob, lay: Layout) -> Optional[str]:
    if lay.sp and lay.tp == 1:
        return "sequence parallel needs tp > 1 (tp = 1)"
    tokens = job.seq_len // lay.cp
    if lay.sp and tokens % lay.tp:
        return (f"sequence parallel splits seq_len/cp = {job.seq_len}/{lay.cp} = {tokens} tokens over "
                f"tp = {lay.tp}: {tokens} % {lay.tp} = {tokens % lay.tp}")
    return None


def rule_stages(job: TrainJob, lay: Layout) -> Optional[str]:
    n = len(units(job.model))
    chunks = lay.pp * lay.vpp
    if n < chunks:
        return (f"{n} {unit_name(job.model)} cannot fill pp*vpp = {lay.pp}*{lay.vpp} = {chunks} "
                f"pipeline stages")
    if lay.vpp > 1 and lay.pp == 1:
        return f"an interleaved schedule (vpp = {lay.vpp}) needs pp > 1"
    return None


def rule_batch(job: TrainJob, lay: Layout) -> Optional[str]:
    per = lay.dp * lay.mbs
    if job.global_batch % per:
        return (f"global batch ({job.global_batch}) must be divisible by dp*mbs = {lay.dp}*{lay.mbs} = "
                f"{per}: {job.global_batch} % {per} = {job.global_batch % per}")
    m = job.global_batch // per
    if lay.vpp > 1 and m % lay.pp:
        return (f"the interleaved schedule needs micro-batches ({job.global_batch}/({lay.dp}*{lay.mbs})"
                f" = {m}) divisible by pp ({lay.pp})")
    return None


def rule_names(job: TrainJob, lay: Layout) -> Optional[str]:
    for key, value, allowed in (("dp_kind", lay.dp_kind, DP_KINDS),
                                ("recompute", lay.recompute, RECOMPUTE),
                                ("dispatcher", lay.dispatcher, DISPATCHERS)):
        if value not in allowed:
            return f"{key} = {value!r} is not one of {', '.join(allowed)}"
    try:
        parse_order(lay.order)
    except LayoutError as e:
        return e.message
    if min(getattr(lay, k) for k in INT_KEYS) < 1:
        return "every parallel size must be at least 1"
    return None


@dataclass(frozen=True)
class Rule:
    name: str
    check: Callable[[TrainJob, Layout], Optional[str]]


RULES: tuple[Rule, ...] = (
    Rule("names", rule_names),
    Rule("world", rule_world),
    Rule("expert-world", rule_expert_world),
    Rule("attention-heads", rule_attention_heads),
    Rule("mamba-heads", rule_mamba_heads),
    Rule("ffn", rule_ffn),
    Rule("experts", rule_experts),
    Rule("context", rule_context),
    Rule("sequence-parallel", rule_sequence_parallel),
    Rule("stages", rule_stages),
    Rule("batch", rule_batch),
)


def violations(job: TrainJob, layout: Layout) -> list[str]:
    out = []
    for rule in RULES:
        msg = rule.check(job, layout)
        if msg:
            out.append(msg)
            if rule.name == "names":  # the other rules assume well-formed values
                break
    return out


def validate_layout(job: TrainJob, layout: Layout) -> None:
    """Raise LayoutError listing every rule the layout breaks, each with its arithmetic."""
    problems = violations(job, layout)
    if problems:
        head = f"layout {layout.short()} is not legal for job {job.name!r}"
        raise LayoutError(head + ":\n  - " + "\n  - ".join(problems))


# ------------------------------------------------------------------------------------------------
# Pins: the job's `layout {}` block and `--layout "tp=2 pp=8 ..."` strings
# ------------------------------------------------------------------------------------------------

def _parse_value(key: str, text: str):
    low = text.strip().lower()
    if key in INT_KEYS:
        if not low.isdigit() or int(low) < 1:
            raise LayoutError(f"{key} = {text!r} must be a positive integer")
        return int(low)
    if key == "sp":
        if low in ("true", "on", "yes", "1"):
            return True
        if low in ("false", "off", "no", "0"):
            return False
        raise LayoutError(f"sp = {text!r} must be true or false")
    return low


def parse_layout(text: str) -> dict:
    """``"tp=2 pp=8 ep=8 etp=1 recompute=full"`` -> {"tp": 2, ...}; ``key=auto`` leaves it open."""
    pins: dict = {}
    seen: set = set()
    for token in text.replace(",", " ").split():
        key, sep, value = token.partition("=")
        key = key.strip().lower()
        if not sep or key not in LAYOUT_KEYS:
            raise LayoutError(f"cannot read {token!r} in layout {text!r}",
                              hint="write key=value pairs with keys from " + " ".join(LAYOUT_KEYS))
        if key in seen:  # "dp=8 dp=2": which one was meant is not ours to guess
            raise LayoutError(f"{key} is given twice in layout {text!r}", hint="give each key once")
        seen.add(key)
        if value.strip().lower() != "auto":
            pins[key] = _parse_value(key, value)
    return normalize_pins(pins)


def normalize_pins(raw: dict) -> dict:
    """Map the DSL's spellings onto Layout fields: dp_shard -> dp_kind, bools for sp."""
    pins = {}
    for key, value in raw.items():
        if value is None or value == "auto":
            continue
        if key == "dp_shard":
            name = {True: "fsdp", False: "zero1"}.get(value, value) if isinstance(value, bool) else value
            if str(name).lower() not in DP_SHARD_NAMES:
                raise LayoutError(f"dp_shard = {value!r} is not one of "
                                  + ", ".join(sorted(DP_SHARD_NAMES)))
            pins["dp_kind"] = DP_SHARD_NAMES[str(name).lower()]
        elif key in INT_KEYS and isinstance(value, bool):
            raise LayoutError(f"{key} = {value!r} must be a positive integer")
        else:
            pins[key] = value
    return pins


def job_pins(job: TrainJob, extra: Optional[dict] = None) -> dict:
    """The job's pins overridden by ``extra`` (already parsed)."""
    pins = normalize_pins(job.layout.as_dict())
    pins.update(extra or {})
    return pins


# ------------------------------------------------------------------------------------------------
# Enumeration
# ------------------------------------------------------------------------------------------------

# Where the search looks when a dimension is open. Pins override every bound.
SEARCH_BOUNDS = {
    "tp_within_node": True,  # tensor (and expert-tensor) parallel groups stay inside a node
    "max_cp": 64,
    "min_tokens_per_cp": 1024,  # shorter per-rank sequences make ring attention latency-bound
    "max_vpp": 8,
    "max_mbs": 8,
}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choices(pins: dict, key: str, options) -> list:
    if key in pins:
        return [pins[key]]
    return list(options)


def _dense_meshes(job: TrainJob, pins: dict) -> Iterator[tuple[int, int, int]]:
    world, gpn = job.cluster.world, job.cluster.gpus_per_node
    n_units = len(units(job.model))
    for tp in _choices(pins, "tp", [d for d in divisors(world)
                                    if d <= gpn or not SEARCH_BOUNDS["tp_within_node"]]):
        for cp in _choices(pins, "cp", [d for d in divisors(world // tp if world % tp == 0 else 1)
                                        if d == 1 or (d <= SEARCH_BOUNDS["max_cp"] and job.seq_len // d
                                                      >= SEARCH_BOUNDS["min_tokens_per_cp"])]):
            rest = world // (tp * cp) if world % (tp * cp) == 0 else 0
            for pp in _choices(pins, "pp", [d for d in divisors(rest) if d <= n_units] if rest else []):
                yield tp, cp, pp


def _expert_sides(job: TrainJob, pins: dict, tp: int, cp: int, pp: int, dp: int):
    if not job.model.is_moe:
        yield pins.get("etp", tp), pins.get("ep", 1)
        return
    inner = tp * cp * dp  # ranks per pipeline stage, shared by both sides
    gpn = job.cluster.gpus_per_node
    for ep in _choices(pins, "ep", [d for d in divisors(job.model.moe.experts) if inner % d == 0]):
        for etp in _choices(pins, "etp", [d for d in divisors(inner // ep if inner % ep == 0 else 1)
                                          if d <= gpn or not SEARCH_BOUNDS["tp_within_node"]]):
            yield etp, ep


def meshes(job: TrainJob, pins: dict) -> Iterator[Layout]:
    """Every mesh (tp, cp, dp, pp | etp, ep, edp) the pins allow, with the non-mesh knobs at their
    pinned or default values. Illegal meshes are skipped silently; validate pins first."""
    world = job.cluster.world
    base = Layout(
        sp=False, dp_kind=pins.get("dp_kind", "zero1"), recompute=pins.get("recompute", "none"),
        dispatcher=pins.get("dispatcher", job.moe.dispatcher), order=pins.get("order", Layout().order),
        cp_comm=pins.get("cp_comm", Layout().cp_comm))
    for tp, cp, pp in _dense_meshes(job, pins):
        dp = world // (tp * cp * pp)
        if "dp" in pins and pins["dp"] != dp:
            continue
        for etp, ep in _expert_sides(job, pins, tp, cp, pp, dp):
            if (tp * cp * dp) % (etp * ep):
                continue
            edp = tp * cp * dp // (etp * ep)
            if "edp" in pins and pins["edp"] != edp:
                continue
            lay = replace(base, tp=tp, cp=cp, dp=dp, pp=pp, etp=etp, ep=ep, edp=edp,
                          sp=pins.get("sp", tp > 1))
            if not _mesh_violation(job, lay):
                yield lay


_MESH_RULES = ("world", "expert-world", "attention-heads", "mamba-heads", "ffn", "experts",
               "context", "sequence-parallel")


def _mesh_violation(job: TrainJob, lay: Layout) -> Optional[str]:
    for rule in RULES:
        if rule.name in _MESH_RULES:
            msg = rule.check(job, lay)
            if msg:
                return msg
    return None


_KNOB_RULES = tuple(r for r in RULES if r.name in ("stages", "batch"))  # names: on pins


def knob_variants(job: TrainJob, mesh: Layout, pins: dict) -> Iterator[Layout]:
    """(vpp, mbs, dp_kind) variants of one mesh that pass every rule."""
    n_units = len(units(job.model))
    per_dp = job.global_batch // mesh.dp if job.global_batch % mesh.dp == 0 else 0
    vpps = _choices(pins, "vpp", [v for v in range(1, SEARCH_BOUNDS["max_vpp"] + 1)
                                  if (v == 1 or mesh.pp > 1) and mesh.pp * v <= n_units])
    mbss = _choices(pins, "mbs", [d for d in divisors(per_dp) if d <= SEARCH_BOUNDS["max_mbs"]]
                    if per_dp else [])
    kinds = _choices(pins, "dp_kind", DP_KINDS)
    for vpp in vpps:
        for mbs in mbss:
            for kind in kinds:
                lay = replace(mesh, vpp=vpp, mbs=mbs, dp_kind=kind)
                if not any(rule.check(job, lay) for rule in _KNOB_RULES):
                    yield lay


def check_pins(job: TrainJob, pins: dict) -> None:
    """Raise LayoutError when the pinned dimensions alone already break a rule, with the arithmetic.
    Open dimensions are set to 1 (dp, edp to what the world leaves) so only the pins are judged."""
    world = job.cluster.world
    problems = []
    for side, keys in (("dense", ("tp", "cp", "dp", "pp")), ("expert", ("etp", "ep", "edp", "pp"))):
        pinned = [(k, pins[k]) for k in keys if k in pins]
        prod = 1
        for _, v in pinned:
            prod *= v
        if pinned and world % prod:
            expr = "*".join(k for k, _ in pinned) + " = " + "*".join(str(v) for _, v in pinned)
            expr += f" = {prod}" if len(pinned) > 1 else ""
            problems.append(f"{expr} does not divide the {world} GPUs of the cluster ({side} side)")
    if not problems:
        probe = _probe_layout(job, pins)
        skip = {"world", "expert-world"} | ({"batch"} if "dp" not in pins else set())
        problems = [r.check(job, probe) for r in RULES if r.name not in skip]
        problems = [p for p in problems if p]
    if problems:
        shown = " ".join(f"{k}={v}" for k, v in sorted(pins.items()))
        raise LayoutError(f"the pinned layout ({shown}) is impossible for job {job.name!r}:\n  - "
                          + "\n  - ".join(problems))


def _probe_layout(job: TrainJob, pins: dict) -> Layout:
    world = job.cluster.world
    tp, cp, pp = (pins.get(k, 1) for k in ("tp", "cp", "pp"))
    dp = pins.get("dp", max(1, world // (tp * cp * pp)))
    etp = pins.get("etp", 1 if job.model.is_moe else tp)
    ep = pins.get("ep", 1)
    edp = pins.get("edp", max(1, tp * cp * dp // (etp * ep)))
    fields = {k: pins[k] for k in ("vpp", "mbs", "dp_kind", "recompute", "dispatcher", "order",
                                   "cp_comm")
              if k in pins}
    return Layout(tp=tp, cp=cp, dp=dp, pp=pp, etp=etp, ep=ep, edp=edp,
                  sp=pins.get("sp", tp > 1), **fields)
