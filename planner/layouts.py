"""Legal folded 5D layouts: the job's rows of the legality-and-capability table (plait/ir/legality.py,
each with a message that shows the arithmetic), the pins a job or a command line may set, and the
enumeration the search walks.

Dense side: tp x cp x dp x pp = world. Expert side: etp x ep x edp x pp = world. PP is shared.
The pipeline splits the model at *units*: the smallest repeating block of layers (a Llama decoder
layer [attention, mlp] is one unit) or, for a non-periodic hybrid pattern, single layers.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Optional

from plait.ir import legality
from plait.ir.errors import LayoutError
from plait.ir.job import LAYOUT_KEYS, TrainJob
from plait.ir.legality import LEGAL, RUNNABLE, Violation
from plait.ir.plan import DP_KINDS, Layout
from plait.ir.units import unit_name, units  # noqa: F401  (re-exported: the planner's units)

DP_SHARD_NAMES = {"replicated": "replicated", "none": "replicated", "zero1": "zero1",
                  "distributed": "zero1", "fsdp": "fsdp", "zero3": "fsdp"}
INT_KEYS = legality.SIZES


# ------------------------------------------------------------------------------------------------
# Rules: the legality-and-capability table (plait/ir/legality.py) of a job
# ------------------------------------------------------------------------------------------------

def table(job: TrainJob) -> legality.Table:
    return legality.table(legality.Workload.of_job(job))


def violations(job: TrainJob, layout: Layout, levels: tuple[str, ...] = (LEGAL,),
               skip: tuple[str, ...] = ()) -> list[str]:
    """What ``layout`` breaks (Megatron's rules by default; rows named in ``skip`` left out), each
    with its arithmetic."""
    t = table(job)
    rows = tuple(r for r in t.select(levels) if r.name not in skip)
    return [v.message for v in t.violations(layout, rows)]


def validate_layout(job: TrainJob, layout: Layout,
                    levels: tuple[str, ...] = (LEGAL, RUNNABLE)) -> None:
    """Raise LayoutError listing every rule the layout breaks, each with its arithmetic."""
    table(job).require(layout, levels, what=f"job {job.name!r}")


def blocked(job_table: legality.Table, layout: Layout) -> Optional[Violation]:
    """The first RUNNABLE row a legal layout breaks: why plait cannot execute it yet."""
    return job_table.first(layout, job_table.select((RUNNABLE,)))


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
    t = table(job)
    legal = t.select((LEGAL,), phase="mesh")
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
            if not t.first(lay, legal):
                yield lay


def knob_variants(job: TrainJob, mesh: Layout, pins: dict) -> Iterator[Layout]:
    """(vpp, mbs, dp_kind) variants of one mesh that pass every LEGAL rule."""
    t = table(job)
    legal = t.select((LEGAL,), phase="knob")
    n_units = len(units(job.model))
    per_dp = job.global_batch // mesh.dp  # sequences per DP rank; the batch row judges the rest
    vpps = _choices(pins, "vpp", [v for v in range(1, SEARCH_BOUNDS["max_vpp"] + 1)
                                  if (v == 1 or mesh.pp > 1) and mesh.pp * v <= n_units])
    mbss = _choices(pins, "mbs", [d for d in divisors(per_dp) if d <= SEARCH_BOUNDS["max_mbs"]]
                    if per_dp else [])
    kinds = _choices(pins, "dp_kind", DP_KINDS)
    for vpp in vpps:
        for mbs in mbss:
            for kind in kinds:
                lay = replace(mesh, vpp=vpp, mbs=mbs, dp_kind=kind)
                if not t.first(lay, legal):
                    yield lay


def blockers(job: TrainJob, mesh: Layout, variants: list[Layout]) -> list[Optional[Violation]]:
    """Per variant of ``mesh``: the first RUNNABLE row it breaks (None: plait can run it). Rows
    about the mesh are asked once, rows about the knobs once per variant."""
    t = table(job)
    on_mesh = t.first(mesh, t.select((RUNNABLE,), phase="mesh"))
    if on_mesh:
        return [on_mesh] * len(variants)
    knob = t.select((RUNNABLE,), phase="knob")
    return [t.first(v, knob) for v in variants] if knob else [None] * len(variants)


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
        skip = ("world", "expert-world") + (("batch",) if "dp" not in pins else ())
        problems = violations(job, _probe_layout(job, pins), skip=skip)
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
