"""``mae-ray reproduce RUN_ID``: what a recorded run needs to run again, from its MLflow id alone.

Writes the run's config (rebuilt from its params: every config key is one) to a YAML file, prints the
command that runs it again and the command line it was started with, and warns about every difference
between the environment it recorded (``mae_ray.env.*`` tags, ``provenance.py``) and this machine's: a
package version, the code's commit, uncommitted changes (their diff is the run's artifact), the hardware.
``--run`` then starts it. Evaluation runs are re-run against the encoder they recorded (``eval.checkpoint``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Any

from mlflow import MlflowClient

from mae_ray import provenance, tracking
from mae_ray.config import Config, load_config
from mae_ray.errors import ConfigError
from mae_ray.jobs import files
from mae_ray.jobs.recorded import from_record

JOBS = ("pretrain", "linprobe", "finetune")  # runs with a config of their own; mae_ray.job tag, none = pretrain
_REDACTED = re.compile(r"\*\*\*")
_NOT_COMPARED = {"command", "ray_nodes", "git_commit", "git_dirty"}  # said separately, or not environment


def run(run_spec: str, tracking_uri: str | None, out: str | None, start: bool = False,
        trust_recorded: bool = False) -> dict[str, Any]:
    """``trust_recorded``: take the run's addresses, folders and shard specs too (``recorded.from_record``)."""
    run_id = run_spec.removeprefix("runs:/").strip("/").split("/")[0]
    uri = tracking.resolve_tracking_uri(tracking_uri)
    try:
        recorded = MlflowClient(uri).get_run(run_id)
    except Exception as e:
        raise ConfigError(f"no run {run_id} in {tracking.redact(uri)}: {str(e).splitlines()[0]}") from None
    tags, params = recorded.data.tags, recorded.data.params
    job = tags.get("mae_ray.job", "pretrain")
    env = {k.removeprefix(tracking.ENV_TAG): v for k, v in tags.items() if k.startswith(tracking.ENV_TAG)}
    print(f"[reproduce] run {run_id} ({recorded.info.run_name}): {job}")
    print(f"  started with: {env.get('command', 'not recorded')}")
    warnings = environment_differences(env)
    if job not in JOBS:  # a sweep's parent or trial: its command line is the record
        for line in warnings:
            print(f"warning: {line}")
        return {"job": job, "command": env.get("command"), "warnings": warnings}
    cfg, unknown = config_of(params, tracking_uri=uri)
    cfg, dropped = from_record(cfg, {"mlflow.tracking_uri"}, trust_recorded)  # the store it came from
    for line in dropped:
        print(f"[reproduce] {line}")
    path = os.path.abspath(out or f"reproduce-{run_id[:8]}.yaml")
    files.write_text(path, cfg.to_yaml())
    command = ["mae-ray", job, "--config", path]
    print(f"  its config: {path}\n  to run it again: {' '.join(command)}")
    for key in unknown:
        warnings.append(f"{key} was redacted when recorded: set it in {os.path.basename(path)}")
    for line in warnings:
        print(f"warning: {line}")
    if start:  # what will run, whole: the record chose none of what was dropped above
        print(f"[reproduce] starting {' '.join(command)} with:\n{tracking.redact(cfg.to_yaml())}", flush=True)
        subprocess.run([sys.executable, "-m", "mae_ray", *command[1:]], check=False)
    return {"job": job, "config": path, "command": command, "warnings": warnings}


def config_of(params: dict[str, str], tracking_uri: str) -> tuple[Config, list[str]]:
    """The run config its params describe (the same types: each value read back as ``--set`` reads it), and
    the keys whose recorded value was redacted; keys that are not config keys (``eval.encoder``) are left."""
    known = set(load_config(None, []).flatten())
    items, redacted = [], []
    for key, value in sorted(params.items()):
        if key not in known or key == "mlflow.tracking_uri" or value == tracking.NOT_PRETRAINED:
            continue  # NOT_PRETRAINED: a random-init evaluation's pre-training settings, which it does not use
        if _REDACTED.search(value):
            redacted.append(key)
            continue
        items.append(f"{key}={'null' if value == 'None' else value}")
    cfg = load_config(None, items)
    cfg.mlflow.tracking_uri = tracking_uri
    return cfg, redacted


def environment_differences(recorded: dict[str, str]) -> list[str]:
    """One line per way this machine differs from the recorded environment."""
    here = provenance.environment()
    lines = [f"{key}: {was} when recorded, {here.get(key, 'unknown')} here" for key, was in sorted(recorded.items())
             if key not in _NOT_COMPARED and here.get(key) != was]
    if recorded.get("git_commit") and recorded["git_commit"] != here.get("git_commit"):
        lines.append(f"code: recorded at commit {recorded['git_commit']}, here "
                     f"{here.get('git_commit') or 'not a git checkout'} (git checkout {recorded['git_commit'][:12]})")
    if recorded.get("git_dirty") == "true":
        lines.append(f"code: the run had uncommitted changes; apply the run's artifact {tracking.DIFF_ARTIFACT}")
    return lines
