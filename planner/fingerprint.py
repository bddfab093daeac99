"""Fingerprints of a plan's inputs: the same fingerprints and the same plait version give the same
plan (the search is deterministic: no wall-clock limit decides anything), so a plan JSON says
exactly what it was computed from."""
from __future__ import annotations

import dataclasses
import hashlib
import json

from plait import __version__
from plait.ir.job import TrainJob
from plait.ir.serde import to_dict

from .cost.context import Calibration


def digest(obj) -> str:
    """First 16 hex digits of the sha256 of an IR value's canonical JSON."""
    text = json.dumps(to_dict(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprints(job: TrainJob) -> tuple[tuple[str, str], ...]:
    """(input, digest) for the model, the cluster, the job (with its pins, batch and options),
    the calibration the cost model used (device values over the defaults) and plait's version."""
    job_only = dataclasses.replace(job, model=job.model.name, cluster=job.cluster.name)
    return (("model", digest(job.model)), ("cluster", digest(job.cluster)),
            ("job", digest(job_only)), ("calibration", digest(Calibration.of(job.cluster.device))),
            ("plait", __version__))
