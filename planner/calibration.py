"""Calibration files: what `plait calibrate CLUSTER -o calib.json` measured, read back for `plan`,
`estimate` and `run --calibration calib.json`.

The file is JSON (never code): the cluster and device it was measured on, ``values`` (cost-model
keys of planner/cost/context.py's Calibration, each a number), ``sources`` (how each value was
measured) and the raw ``measurements``. Applying it overrides the device spec's calibration with
the measured values; the plan's ``calibration`` fingerprint then covers them, and the explanation
names each value that came from the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from plait.ir.errors import PlaitError
from plait.ir.job import TrainJob

from .cost.context import Calibration

FORMAT = "plait-calibration"
KEYS = tuple(f.name for f in dataclasses.fields(Calibration))


@dataclasses.dataclass(frozen=True)
class CalibrationFile:
    path: str
    cluster: str
    device: str
    values: tuple[tuple[str, float], ...]
    sources: tuple[tuple[str, str], ...]
    digest: str  # sha256 of the file's bytes, first 16 hex digits


def _fail(path, why: str) -> PlaitError:
    return PlaitError(f"{path} is not a calibration file: {why}",
                      hint="write one with `plait calibrate CLUSTER -o calib.json`")


def read(path: str | Path) -> CalibrationFile:
    """Parse and check a calibration file; every problem is a PlaitError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise PlaitError(f"no calibration file at {p}")
    raw = p.read_bytes()
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(p, f"invalid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(p, f'"format" must be "{FORMAT}"')
    values = doc.get("values")
    if not isinstance(values, dict):
        raise _fail(p, '"values" must be an object of numbers')
    for key, value in values.items():
        if key not in KEYS:
            raise _fail(p, f"unknown key {key!r} (known: {', '.join(KEYS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < 0:
            raise _fail(p, f"{key} must be a finite number >= 0, not {value!r}")
    sources = doc.get("sources", {})
    return CalibrationFile(
        path=str(p), cluster=str(doc.get("cluster", "")), device=str(doc.get("device", "")),
        values=tuple(sorted((k, float(v)) for k, v in values.items())),
        sources=tuple(sorted((k, str(v)) for k, v in sources.items()) if isinstance(sources, dict)
                      else ()),
        digest=hashlib.sha256(raw).hexdigest()[:16])


def apply(job: TrainJob, cal: CalibrationFile) -> TrainJob:
    """``job`` on a device whose calibration is the spec's, overridden by the file's values. The
    file must have been measured on the job's device kind."""
    dev = job.cluster.device
    if cal.device and cal.device != dev.name:
        raise PlaitError(f"{cal.path} was measured on device {cal.device!r}; the job's cluster "
                         f"{job.cluster.name!r} has {dev.name!r}",
                         hint=f"run `plait calibrate {job.cluster.name} -o calib.json` there")
    return overridden(job, dict(cal.values))


def with_calibration(job: TrainJob, values: dict) -> TrainJob:
    """``job`` on a device whose calibration is exactly ``values`` (the rest: defaults)."""
    dev = dataclasses.replace(job.cluster.device, calibration=tuple(values.items()))
    return dataclasses.replace(job, cluster=dataclasses.replace(job.cluster, device=dev))


def overridden(job: TrainJob, values: dict) -> TrainJob:
    """``job`` with the device's calibration, ``values`` replacing the keys they name."""
    return with_calibration(job, {**dict(job.cluster.device.calibration), **values})


def measured_keys(cal: CalibrationFile | None) -> frozenset[str]:
    """The keys a calibration file measured (none without a file)."""
    return frozenset(k for k, _ in cal.values) if cal is not None else frozenset()


def explanation(cal: CalibrationFile) -> str:
    """One line for a plan's explanation: which cost-model values came from the file."""
    shown = ", ".join(f"{k} = {v:.4g}" for k, v in cal.values)
    return f"measured by `plait calibrate` ({cal.path}, sha256 {cal.digest}): {shown}"


def write(path: str | Path, cluster: str, device: str, values: dict, sources: dict,
          measurements: dict) -> None:
    doc = {"format": FORMAT, "cluster": cluster, "device": device,
           "values": {k: float(v) for k, v in sorted(values.items())},
           "sources": dict(sorted(sources.items())), "measurements": measurements}
    Path(path).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n", encoding="utf-8")


def calibrated(job: TrainJob, path: str | None) -> tuple[TrainJob, CalibrationFile | None]:
    """``job`` with the file at ``path`` applied (unchanged without a path), and the file."""
    if not path:
        return job, None
    cal = read(path)
    return apply(job, cal), cal


def note(plan, cal: CalibrationFile | None):
    """A plan computed with ``cal``: its explanation names the measured values first, and its
    fingerprints add the file's digest next to the calibration digest they already hold."""
    if cal is None:
        return plan
    return dataclasses.replace(plan, explanation=(explanation(cal),) + tuple(plan.explanation),
                               fingerprints=tuple(plan.fingerprints)
                               + (("calibration_file", cal.digest),))
