"""Who did not arrive: each rank publishes where it is (guarded collectives entered per plait axis,
the one it is inside) to the job's key-value store from a background thread; when a collective
times out, the rank that waited reads its group's members and names those that never entered it.

The thread keeps publishing while the main thread waits inside a collective or computes, so a
member whose record stops changing its timestamp is hung as a whole process (or dead), and a member
that is alive but behind is named with what it is doing instead.
"""
from __future__ import annotations

import json
import threading
import time
from typing import Optional

import torch.distributed as dist

from plait.lowering import collectives

PREFIX = "plait/position/"
INTERVAL_S = 0.5


class _Publisher(threading.Thread):
    def __init__(self, store, rank: int, interval_s: float):
        super().__init__(name="plait-position", daemon=True)
        self.store, self.rank, self.interval_s = store, rank, interval_s
        self.stopped = threading.Event()

    def publish(self) -> None:
        record = dict(collectives.position(), time=time.time())
        self.store.set(f"{PREFIX}{self.rank}", json.dumps(record))

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - the store went away: the job is ending
                return
            self.stopped.wait(self.interval_s)


_ACTIVE: list[Optional[_Publisher]] = [None]


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - no default store (not initialised, private API moved)
        return None


def start(rank: int, interval_s: float = INTERVAL_S) -> None:
    """Publish this rank's position until stop(); timeouts then name the missing members."""
    stop()
    store = _store()
    if store is None:
        return
    publisher = _Publisher(store, rank, interval_s)
    publisher.publish()  # present before the first collective can time out
    publisher.start()
    _ACTIVE[0] = publisher
    collectives.on_timeout(lambda op, axis, number, members: missing_note(
        store, rank, axis, number, members))


def stop() -> None:
    publisher, _ACTIVE[0] = _ACTIVE[0], None
    collectives.on_timeout(None)
    if publisher is not None:
        publisher.stopped.set()
        publisher.join(timeout=2 * publisher.interval_s)


def read_position(store, rank: int) -> Optional[dict]:
    key = f"{PREFIX}{rank}"
    try:
        return json.loads(store.get(key)) if store.check([key]) else None
    except Exception:  # noqa: BLE001 - unreadable: say so rather than fail the report
        return None


def missing_note(store, me: int, axis: str, number: int, members: tuple[int, ...]) -> str:
    """", rank 3 did not arrive (...)" for every member of the group behind call ``number``."""
    now, notes = time.time(), []
    for peer in members:
        if peer == me:
            continue
        record = read_position(store, peer)
        if record is None:
            notes.append(f"rank {peer} did not arrive (it never reported a position)")
            continue
        entered = record["calls"].get(axis, 0)
        if entered >= number:
            continue
        notes.append(f"rank {peer} did not arrive (it entered {entered} of the {number} "
                     f"{axis} collectives; {_doing(record, now)})")
    if not notes:
        return " (every member entered it: the transport failed, not a rank)"
    return ": " + "; ".join(notes)


def _doing(record: dict, now: float) -> str:
    silent = now - record["time"]
    if silent > 4 * INTERVAL_S + 1:
        return f"no sign of life for {silent:.0f} s: the process is hung or dead"
    inside = record.get("inside")
    if inside:
        return f"it waits in {inside[0]} on its {inside[1]} group"
    return "it is alive, computing outside any collective"
