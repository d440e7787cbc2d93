"""``python -m mae_ray evaluate --run RUN_ID_or_CHECKPOINT``: linear probe, then fine-tune.

Both with the configured budgets (``linprobe.*``, ``finetune.*``), both recorded in MLflow as child
runs of the pre-training run, which receives ``linprobe_top1/5`` and ``finetune_top1/5``. Without
``--config`` the pre-training run's own config is the base (its data, its budgets), ``--set``
overrides any key. This is what each sweep trial calls after pre-training.
"""

from __future__ import annotations

import os
import re
from typing import Any

from mae_ray import tracking
from mae_ray.config import Config, load_config
from mae_ray.jobs import files, finetune, lifecycle, linprobe, recorded
from mae_ray.jobs.encoders import resolve_encoder

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SPENT = ("cpu_hours", "gpu_hours", "cost")  # what a run's workers held (worker_loop.EpochLoop._spent)


def as_spec(run: str) -> str:
    """A bare MLflow run id becomes ``runs:/ID``; paths, ``runs:/`` and ``random`` pass unchanged."""
    return f"runs:/{run}" if _RUN_ID.match(run) and not os.path.exists(run) else run


def run(cfg: Config, *, source=None, skip: tuple[str, ...] = (), verbose: bool = False) -> dict[str, Any]:
    """Linear probe then fine-tune ``cfg.eval.checkpoint`` (or ``source``); returns the combined summary."""
    jobs = [(name, job) for name, job in (("linprobe", linprobe), ("finetune", finetune)) if name not in skip]
    for name, _ in jobs:  # both refused before the first one runs
        lifecycle.check_epoch_updates(cfg, name)
    root = os.path.abspath(cfg.output_dir)
    source = source or resolve_encoder(cfg.eval.checkpoint, cfg, tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri))
    summary: dict[str, Any] = {"encoder": source.label, "parent_run_id": source.parent_run_id}
    with files.claim(root, "evaluation"):
        for name, job in jobs:
            own = [f"output_dir={os.path.join(root, name)}"]
            if cfg.mlflow.run_name:  # its own run folder under a shared ray.storage_path (a sweep trial's jobs)
                own.append(f"mlflow.run_name={cfg.mlflow.run_name}-{name}")
            sub = cfg.override(*own)
            result = job.run(sub, source=source, verbose=verbose)
            summary.update({k: v for k, v in result.items() if k.startswith(name)})
            spent = {k: v for k, v in result.get("metrics", {}).items() if k in SPENT}  # its hours, and their price
            summary.update({f"{name}_{k}": v for k, v in spent.items()})
            summary[f"{name}_run_id"] = result["mlflow_run_id"]
        lifecycle.write_result(root, summary)
    return summary


def run_spec(checkpoint: str, config: str | None, overrides: list[str], *, skip: tuple[str, ...] = (),
             verbose: bool = False, trust_recorded: bool = False) -> tuple[Config, dict[str, Any]]:
    """``mae-ray evaluate --run SPEC``: without ``config`` the pre-training run's own config is the base
    (its data, its budgets; outputs beside, not over, its result.json). Returns (config used, summary).

    That config is a record (a run's artifact, a checkpoint's copy): what it may not decide - addresses,
    folders, shard specs that run programs - is the user's (``recorded.from_record``) unless ``trust_recorded``.
    """
    cfg, source = resolve_spec(checkpoint, config, overrides, trust_recorded)
    return cfg, run(cfg, source=source, skip=skip, verbose=verbose)


def resolve_spec(checkpoint: str, config: str | None, overrides: list[str], trust_recorded: bool = False):
    """(the config ``evaluate --run SPEC`` runs, the encoder): see :func:`run_spec`. Prints each setting not
    taken from the record."""
    cfg = load_config(config, [*overrides, f"eval.checkpoint={checkpoint}"])
    source = resolve_encoder(checkpoint, cfg, tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri))
    if config is None and source.saved_config is not None:
        saved, dropped = recorded.from_record(source.saved_config, recorded.user_keys(overrides), trust_recorded)
        for line in dropped:
            print(f"[evaluate] {line}", flush=True)
        saved.output_dir = os.path.join(saved.output_dir, "eval")  # beside the run's result.json, not over it
        cfg = saved.override(*overrides, f"eval.checkpoint={checkpoint}")
    return cfg, source
