"""The Ray processes a sweep driver started, recorded beside the sweep, so that a ``--resume`` after the driver
was killed can stop what it left running - only those, by pid - before it starts a Ray of its own.

The one module that reaches into Ray's internals for its processes (Ray keeps no public handle on them).
"""

from __future__ import annotations

import json
import os
import time

import psutil
import ray

RAY_PIDS = "ray_processes.json"


def remember(sweep_dir: str) -> None:
    """Record the Ray processes this driver started, with their start times: a killed driver leaves some running.

    On Linux the head's own processes (gcs_server, raylet, dashboard, ...) die with the driver (Ray's
    kernel fate sharing) and are reaped by PID 1; the raylet's children (dashboard and runtime-env
    agents, idle workers) do not: they run on for a minute or more. So those are recorded too.
    """
    node = ray._private.worker._global_node  # Ray keeps no public handle on its own processes
    started: dict[str, float] = {}
    for infos in node.all_processes.values():
        for info in infos:
            if not info.process:
                continue
            try:
                proc = psutil.Process(info.process.pid)
                for p in (proc, *proc.children(recursive=True)):
                    started[str(p.pid)] = p.create_time()
            except psutil.NoSuchProcess:
                continue
    with open(os.path.join(sweep_dir, RAY_PIDS), "w") as f:
        json.dump({"session_dir": node.get_session_dir_path(), "pids": [int(p) for p in started],
                   "started": started}, f)


def forget(sweep_dir: str) -> None:
    path = os.path.join(sweep_dir, RAY_PIDS)
    if os.path.exists(path):
        os.remove(path)


def stop_stale(sweep_dir: str, grace_s: float = 10.0, reap_s: float = 10.0) -> list[int]:
    """Stop the Ray processes a killed driver of this sweep left behind — only those, by pid — and wait
    until they are reaped: SIGTERM, SIGKILL after ``grace_s``, then up to ``reap_s`` until each has left
    the process table (this process reaps its own children; PID 1 reaps the orphans of the dead driver)."""
    path = os.path.join(sweep_dir, RAY_PIDS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        saved = json.load(f)
    started = saved.get("started", {})
    stale = []
    for pid in saved["pids"]:
        try:
            proc = psutil.Process(pid)
            if str(pid) in started:  # the pid still is that Ray process, not a reused one
                same = abs(proc.create_time() - started[str(pid)]) < 0.01
            else:  # a record without start times: the command line names the session
                same = saved["session_dir"] in " ".join(proc.cmdline())
            if same and proc.status() != psutil.STATUS_ZOMBIE:
                proc.terminate()
                stale.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    _, alive = psutil.wait_procs(stale, timeout=grace_s)  # reaps those that are our children
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    zombies = _wait_reaped([p.pid for p in stale], timeout=reap_s)
    if stale:
        print(f"[sweep] stopped {len(stale)} Ray process(es) a killed driver left running: "
              f"{' '.join(str(p.pid) for p in stale)}", flush=True)
    if zombies:
        print(f"[sweep] warning: exited but not reaped by their parent: {zombies}", flush=True)
    forget(sweep_dir)
    return [p.pid for p in stale]


def _wait_reaped(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` is in the process table (a zombie still is); returns those left."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if psutil.pid_exists(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if psutil.pid_exists(p)]
    return left
