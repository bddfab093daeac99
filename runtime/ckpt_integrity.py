"""Trusting a checkpoint: atomic step directories, a manifest of hashes, fingerprints of what wrote
it, and the checks `--resume` runs before any rank starts.

A step is written under a temporary name (``.step-000004.tmp``); when every rank's file is done,
rank 0 writes manifest.json -- every file's size and SHA-256 plus the plan, model and job
fingerprints -- renames the directory into place (a directory of the same step is moved aside,
never written over) and only then moves ``latest``. Anything not in the manifest, missing, shorter
or with another hash is refused by name.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from plait.ir.errors import PlaitError
from plait.ir.serde import to_dict

from .ckpt_store import INDEX, sha256

META = "plait.json"
MANIFEST = "manifest.json"
LATEST = "latest"
# Layout fields that describe how the state was sharded (informational: any layout loads it).
STATE_FIELDS = ("tp", "cp", "dp", "pp", "vpp", "ep", "etp", "edp", "dp_kind")
# Job fields that change the math or the data order of the continued run.
JOB_FIELDS = ("global_batch", "seq_len", "seed", "dataset", "data_seed", "optimizer", "steps")
LARGE = 1 << 30  # bytes: show a progress bar while verifying more than this


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def temp_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f".step-{step:06d}.tmp"


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def dataset_identity(data) -> dict:
    """What names the token stream: synthetic (and its seed below), or the prepared dataset's
    tokenizer and size (its path may move between runs); a blend: each source's size and epoch
    cap and each phase's start and weights (a changed recipe changes the sample order)."""
    if data.sources:
        from plait.ir.datarecipe import dataset_tokens

        return {"sources": {s.name: {"tokens": dataset_tokens(s.path), "epochs": s.epochs}
                            for s in data.sources},
                "phases": [[p.name, [list(w) for w in p.weights], p.at, p.at_tokens]
                           for p in data.phases]}
    if data.synthetic or not data.path:
        return {"synthetic": True}
    try:
        meta = json.loads((Path(data.path) / "meta.json").read_text())
    except (OSError, ValueError):
        return {"path": str(data.path)}
    return {k: meta.get(k) for k in ("tokenizer", "vocab", "dtype", "num_tokens")}


def job_fields(job, total_steps: int) -> dict:
    return json.loads(json.dumps({
        "global_batch": job.global_batch, "seq_len": job.seq_len, "seed": job.seed,
        "dataset": dataset_identity(job.data), "data_seed": job.data.seed,
        "optimizer": {k: v for k, v in to_dict(job.optimizer).items() if k != "skip_bad_steps"},
        "steps": total_steps}))


def fingerprints(job, plan, total_steps: int) -> dict:
    """plait.json's record of what wrote a checkpoint: the model, the job fields that matter and
    the layout, each in full (to name a difference) and hashed (for the manifest)."""
    model = json.loads(json.dumps(to_dict(job.model)))
    layout = {k: getattr(plan.layout, k) for k in STATE_FIELDS}
    stages = [[s.first, s.last] for s in sorted(plan.stages, key=lambda s: s.first)]
    fields = job_fields(job, total_steps)
    return {"model": model, "job_fields": fields, "layout": layout, "stages": stages,
            "world": plan.world,
            "fingerprints": {"model": _digest(model), "job": _digest(fields),
                             "plan": _digest({"layout": layout, "stages": stages})}}


# ---- writing ------------------------------------------------------------------------------------
def finalize(root: Path, step: int, rank: int, written: Optional[tuple[int, str]]) -> Path:
    """Collective: gather every rank's file size and hash (None: its write failed); rank 0 writes
    the manifest last, renames the step directory into place and moves ``latest``."""
    tmp, target = temp_dir(root, step), step_dir(root, step)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (rank, *written) if written else (rank, None, None))
    failed = [r for r, size, _ in everyone if size is None]
    if failed:  # every rank raises: none waits for a checkpoint that will not complete
        raise PlaitError(f"writing checkpoint step {step} failed on rank(s) {failed}; {tmp} is "
                         "left incomplete (never resumed from); see the rank errors above")
    if rank == 0:
        from .ckpt_store import rank_file

        files = {rank_file(r): {"size": size, "sha256": digest} for r, size, digest in everyone}
        for name in (INDEX, META):
            files[name] = {"size": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)}
        meta = json.loads((tmp / META).read_text())
        manifest = {"step": step, "files": files, "fingerprints": meta["fingerprints"]}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        _rename_into_place(tmp, target)
        latest = Path(root) / f".{LATEST}.tmp"
        latest.write_text(target.name + "\n")
        os.replace(latest, Path(root) / LATEST)
    dist.barrier()
    return target


def _rename_into_place(tmp: Path, target: Path) -> None:
    """``tmp`` becomes ``target``; a step directory already there is moved aside first and deleted
    only when it is a checkpoint plait wrote (it has a manifest): anything else is kept beside it."""
    aside = None
    if target.exists():
        aside = next(p for k in range(1 << 20)
                     if not (p := target.with_name(f".{target.name}.replaced{k or ''}")).exists())
        target.rename(aside)
    tmp.rename(target)
    if aside is not None and (aside / MANIFEST).is_file():
        shutil.rmtree(aside, ignore_errors=True)


# ---- finding and checking -----------------------------------------------------------------------
def find(path: str | Path) -> Path:
    """The checkpoint at ``path``: a step directory itself, else the one ``latest`` names, else
    the newest complete step directory inside; PlaitError naming the path when there is none."""
    root = Path(path)
    if (root / MANIFEST).is_file() or (root / META).is_file() or (root / ".metadata").is_file():
        return root
    if not root.is_dir():
        raise PlaitError(f"no checkpoint at {root}: the directory does not exist")
    latest = root / LATEST
    if latest.is_file():
        chosen = root / latest.read_text().strip()
        if (chosen / MANIFEST).is_file():
            return chosen
        raise PlaitError(f"{latest} names {chosen}, which holds no complete checkpoint")
    steps = sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())
    if not steps:
        raise PlaitError(f"no checkpoint in {root} (expected step-NNNNNN/ directories written by "
                         "`plait run --save`)")
    return steps[-1]


def read_meta(path: Path) -> dict:
    """plait.json of a step directory: JSON only (nothing in a checkpoint is unpickled)."""
    if (path / ".metadata").is_file() and not (path / MANIFEST).is_file():
        raise PlaitError(f"{path} is a torch.distributed.checkpoint directory (pickled .metadata); "
                         "plait does not load it because unpickling can run code",
                         hint="resume from a checkpoint written by this plait (`plait run --save`)")
    try:
        return json.loads((path / META).read_text())
    except FileNotFoundError:
        raise PlaitError(f"checkpoint {path} has no {META}; it was not written by plait") from None
    except (OSError, ValueError) as e:
        raise PlaitError(f"checkpoint {path}: {META} is unreadable ({e})") from None


def _first_difference(there, here, where: str = "") -> Optional[str]:
    if isinstance(there, dict) and isinstance(here, dict):
        for key in sorted(set(there) | set(here), key=str):
            diff = _first_difference(there.get(key), here.get(key), f"{where}.{key}" if where else key)
            if diff:
                return diff
        return None
    return None if there == here else f"{where}: {there!r} in the checkpoint, {here!r} here"


def check_model(path: Path, meta: dict, model) -> None:
    """The checkpoint holds this model (any layout loads it); else the first field that differs."""
    diff = _first_difference(meta.get("model"), json.loads(json.dumps(to_dict(model))))
    if diff:
        raise PlaitError(f"checkpoint {path} holds model {meta.get('model', {}).get('name')!r}, "
                         f"which differs from this job's {model.name!r} at {diff}")


def check_job(path: Path, meta: dict, job, total_steps: int, allow_change: bool) -> None:
    """Refuse a continued run whose math or data order differs from the one that wrote ``path``,
    naming the field, unless the user said so (``--allow-job-change``)."""
    if allow_change:
        return
    diff = _first_difference(meta.get("job_fields"), job_fields(job, total_steps))
    if diff:
        raise PlaitError(f"checkpoint {path} was written by a job that differs: {diff}",
                         hint="resume with the same job, or pass --allow-job-change to continue "
                              "with this change on purpose")


def verify(path: Path, progress: bool = True) -> dict:
    """Check every file of a step directory against its manifest (hashed in parallel; a progress
    bar for large checkpoints); returns the manifest. Refuses, naming the file, anything missing,
    truncated, altered or not listed."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        raise PlaitError(f"checkpoint {path} has no {MANIFEST}: it is incomplete or not plait's",
                         hint="resume from a step directory that `plait run --save` finished") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PlaitError(f"checkpoint {path}: {MANIFEST} is unreadable ({e})") from None
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    for name in sorted(present - set(files)):
        raise PlaitError(f"checkpoint {path}: {name} is not in its manifest (a foreign file)")
    for name, want in sorted(files.items()):
        f = path / name
        if not f.is_file():
            raise PlaitError(f"checkpoint {path}: {name} is missing")
        size = f.stat().st_size
        if size != want["size"]:
            what = "truncated" if size < want["size"] else "longer than written"
            raise PlaitError(f"checkpoint {path}: {name} is {what} ({size} bytes, the manifest "
                             f"says {want['size']})")
    _check_hashes(path, files, progress and sum(w["size"] for w in files.values()) > LARGE)
    return manifest


def _check_hashes(path: Path, files: dict, show: bool) -> None:
    names = sorted(files)
    with ThreadPoolExecutor(max_workers=min(8, len(names) or 1)) as pool:
        results = pool.map(lambda n: (n, sha256(path / n)), names)
        if show:
            from rich.progress import track
            results = track(results, total=len(names), description="verifying checkpoint")
        for name, digest in results:
            if digest != files[name]["sha256"]:
                raise PlaitError(f"checkpoint {path}: {name} was altered (its SHA-256 differs from "
                                 "the manifest's)")
