"""Fault injection for recovery tests: kill or fail a worker at a chosen point, once.

``MAE_RAY_FAULTS`` on the driver (``ACTION:rank=R:POINT=EPOCH``, e.g. ``kill:rank=1:mid_epoch=1``) is
handed to the workers in the loop config. Actions: ``kill`` (SIGKILL), ``fail`` (an exception),
``desync`` (the caller nudges one parameter of that rank, as a lost gradient all-reduce would), ``nan``
(the caller sets one parameter to NaN, as a diverging run would), ``pause`` (the worker waits there until
the test creates ``<marker>.go``: the test changes the world meanwhile, e.g. stops the S3 server). Points:
``mid_epoch`` (half-way through the epoch's batches), ``before_report``, ``after_report`` (around the
epoch's report and checkpoint), ``end_epoch`` (before the ranks' parameters are compared). Each fault
fires once per run (a marker file in the output folder remembers it), so the restarted worker group
runs through. Several faults: separated by commas. Real processes are killed with SIGKILL: what Ray
sees is a real lost worker. Unset in normal use: then every call here is a no-op.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "MAE_RAY_FAULTS"


def from_env() -> str | None:
    return os.environ.get(ENV) or None


def maybe_fire(injected: str | None, point: str, epoch: int, rank: int, marker_dir: str) -> str:
    """Fire the fault of ``injected`` (``ACTION:rank=R:POINT=E``) if it names this point, epoch and rank.

    Returns the action when it is one the caller carries out (``desync``, ``nan``), else "".
    """
    if not injected:
        return ""
    if "," in injected:
        fired = (maybe_fire(one, point, epoch, rank, marker_dir) for one in injected.split(","))
        return next((a for a in fired if a), "")
    action, *fields = injected.split(":")
    opts = dict(f.split("=", 1) for f in fields)
    if int(opts.get("rank", 0)) != rank or opts.get(point) is None or int(opts[point]) != epoch:
        return ""
    marker = os.path.join(marker_dir, f".fault-{action}-{point}-{epoch}-{rank}")
    if os.path.exists(marker):
        return ""
    os.makedirs(marker_dir, exist_ok=True)
    open(marker, "w").close()
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "fail":
        raise RuntimeError(f"injected failure at {point}={epoch} on rank {rank}")
    elif action in ("desync", "nan"):
        return action
    elif action == "pause":
        deadline = time.monotonic() + 120
        while not os.path.exists(marker + ".go") and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        raise ValueError(f"unknown fault action {action!r} in {ENV}")
    return ""
