"""Ray Tune sweeps over any config key: ``python -m mae_ray sweep --config SWEEP.yaml [--resume] [--set ...]``.

Each trial is a Tune function with a small CPU share that runs pre-training as its own TorchTrainer
(named after the trial), forwarding rank-0 reports to Tune with ``TuneReportCallback``, then the
evaluation (linear probe, fine-tune) and a final report. With ``ray.num_workers: 0`` the trial runs
those jobs in its own process instead (``launch.run_trainer``; a worker's CPU share reserved for it):
on one machine that saves starting three Ray Train runs per trial. ASHA stops weak trials early on the online
``knn_top1`` (not on the reconstruction loss, which the paper shows does not rank representations).
MLflow: one parent run per sweep, one child run per trial (its pre-training run). ``--resume``
restores the Tune experiment: finished trials are not re-run, no MLflow run is duplicated.
With ``storage_path`` (a bucket, or a filesystem every node mounts) the sweep's state lives there:
``<storage_path>/<name>/`` holds Tune's experiment (``tune/``), ``sweep.json``, each trial's checkpoints
(``checkpoints/<trial id>``) and finished results (``trials/<trial id>/``), so ``--resume`` needs nothing local.
An evaluation-only sweep (``pretrain: false``) evaluates one fixed encoder per trial instead; its trial
runs hold the evaluation runs and scores. The sweep file itself is read and checked in sweep_config.py.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
from typing import Any

import ray
from ray import tune
from ray.tune.execution import class_cache
from ray.tune.schedulers import ASHAScheduler

from mae_ray import provenance, tracking
from mae_ray.cluster import launch, ray_processes
from mae_ray.config import Config
from mae_ray.errors import ConfigError
from mae_ray.jobs import files, lifecycle, sweep_report
from mae_ray.jobs.encoders import resolve_encoder
from mae_ray.jobs.files import read_json, write_json
from mae_ray.jobs.sweep_config import EVAL_JOBS, SweepConfig, hide_secrets, param_space
from mae_ray.jobs.sweep_trial import NOTE, random_baseline, trial
from mae_ray.tracking import redact


# --------------------------------------------------------------------------- the sweep
def run(sweep: SweepConfig, base: Config, sweep_file: str, *, resume: bool = False,
        verbose: bool = False) -> dict[str, Any]:
    cfg = copy.deepcopy(base)  # made absolute below, for every trial; the caller's stays as given
    uri = lifecycle.prepare(cfg, write=False)  # absolute shard paths and tracking URI, for every trial
    listed = {j for jobs in sweep.jobs.values() for j in jobs}
    for job in ("pretrain", *EVAL_JOBS):  # an epoch shorter than one update: refused now, not per trial
        if getattr(sweep, job) or job in listed:
            lifecycle.check_epoch_updates(cfg, job)
    if not sweep.pretrain:  # the one encoder every trial evaluates: a missing or misfit one fails here

        if os.path.exists(cfg.eval.checkpoint):  # trials run in their own folders
            cfg.eval.checkpoint = os.path.abspath(cfg.eval.checkpoint)
        resolve_encoder(cfg.eval.checkpoint, cfg, uri)
    sweep_dir = os.path.join(os.path.abspath(sweep.output_dir), sweep.name)
    shared = f"{launch.storage_uri(sweep.storage_path).rstrip('/')}/{sweep.name}" if sweep.storage_path else None
    tune_path = f"{shared or sweep_dir}/tune"  # Tune's experiment state: where every node sees it
    state = read_json(os.path.join(sweep_dir, "sweep.json")) or (shared and read_json(f"{shared}/sweep.json"))
    where = f"{sweep_dir}{f' or {shared}' if shared else ''}"
    if resume and not state:
        raise ConfigError(f"--resume: no sweep to resume at {where}")
    if not resume and state:
        raise ConfigError(f"{where} already holds a sweep: pass --resume to continue it, or another name")
    # a second sweep, or a second --resume, beside a live one: refused here, before the reaping of stale Ray
    with files.claim(sweep_dir, f"sweep {sweep.name}"):
        started = False
        # before a Ray of this driver's own starts: a killed driver's Ray agents still hold their ports (the
        # dashboard agent's is fixed), which a new Ray's agents would fail to take
        ray_processes.stop_stale(sweep_dir)
        try:
            with lifecycle.ray_session(cfg, verbose) as started:  # Ray stops on leaving, if this process started it
                if started:
                    ray_processes.remember(sweep_dir)
                concurrent = _concurrency(sweep, cfg)
                if resume:
                    parent = state["parent_run_id"]
                else:
                    parent = _start_parent(uri, cfg, sweep)
                    state = {"parent_run_id": parent, "uri": tracking.redact(uri)}  # what --resume needs
                    for folder in (sweep_dir, shared):
                        if folder:
                            write_json(f"{folder}/sweep.json", state)
                    _log_sweep_files(uri, parent, sweep_file, cfg, sweep_dir)
                print(f"[sweep] {sweep.name}: up to {concurrent} trial(s) at a time; folder {sweep_dir}; "
                      f"mlflow parent run {parent}", flush=True)
                with lifecycle.Ending(uri, parent):  # FINISHED after the report; FAILED, or KILLED on Ctrl-C
                    shown_space, hidden = hide_secrets(sweep.search)
                    fn = tune.with_resources(
                        tune.with_parameters(trial, base=cfg, sweep_dir=sweep_dir, uri=uri, parent_run_id=parent,
                                             sweep={"pretrain": sweep.pretrain, "linprobe": sweep.linprobe,
                                                    "finetune": sweep.finetune, "jobs": sweep.jobs,
                                                    "best_of": sweep.best_of,
                                                    "cases": sweep.cases, "shared": shared,
                                                    "name": sweep.name, "command": provenance.command()},
                                             hidden=hidden),
                        _trial_resources(sweep, cfg))
                    if resume and tune.Tuner.can_restore(tune_path):
                        # a trial the dead driver left running shows as errored: restart it (trials are idempotent)
                        tuner = tune.Tuner.restore(tune_path, trainable=fn, resume_unfinished=True,
                                                   restart_errored=True)
                    else:
                        tuner = tune.Tuner(
                            fn, param_space=param_space(shown_space),
                            tune_config=tune.TuneConfig(num_samples=sweep.num_samples, max_concurrent_trials=concurrent,
                                                        scheduler=_scheduler(sweep)),
                            run_config=tune.RunConfig(name="tune", storage_path=shared or sweep_dir,
                                                      verbose=1 if verbose else 0,
                                                      callbacks=[sweep_report.progress_callback(
                                                          sweep.linprobe or sweep.finetune, concurrent)]),
                        )
                    # the random-init baseline runs beside the trials (a Ray task holding a trial's share), not after
                    baseline = _start_baseline(sweep, cfg, sweep_dir, shared, uri, parent, verbose)
                    with _credentials_not_copied_by_tune():
                        grid = tuner.fit()
                    baseline = ray.get(baseline) if baseline is not None else None
                    return sweep_report.finish(grid, sweep, sweep_dir, uri, parent, baseline, epochs=cfg.train.epochs)
        finally:
            if started:
                ray_processes.forget(sweep_dir)


def _start_parent(uri: str, cfg: Config, sweep: SweepConfig) -> str:
    note = (f"Sweep {sweep.name} over {', '.join(sweep.search) or 'nothing'}: one child run per trial, named by what "
            "it varies, with its linprobe_top1 / finetune_top1. report/ holds the table and the plots.")
    return lifecycle.open_run(uri, cfg.mlflow.experiment, f"sweep-{sweep.name}", _sweep_params(sweep),
                              {**tracking.run_tags(), "mae_ray.job": "sweep", NOTE: tracking.redact(note)})


def _log_sweep_files(uri: str, parent: str, sweep_file: str, base: Config, sweep_dir: str) -> None:
    """The sweep file and the trials' base config, credentials redacted, as artifacts ``sweep/`` of the
    parent run; the base config also in the sweep folder (a record: ``--resume`` reads the sweep file)."""
    logger = tracking.EpochLogger(uri, parent)
    with open(sweep_file) as f:
        sweep_text = tracking.redact(f.read())
    with tempfile.TemporaryDirectory() as tmp:  # the artifact keeps the file's name
        copy = os.path.join(tmp, os.path.basename(sweep_file))
        with open(copy, "w") as f:
            f.write(sweep_text)
        logger.log_artifact(copy, "sweep")
    path = files.write_text(os.path.join(sweep_dir, "base_config.yaml"),
                            tracking.redact(base.to_yaml()))
    logger.log_artifact(path, "sweep")


@contextlib.contextmanager
def _credentials_not_copied_by_tune():
    """Ray Tune copies the driver's ``AWS_*`` credentials into every trial actor's runtime environment,
    which Ray logs in full on the trial's node (``runtime_env_agent.log``) and keeps in its actor
    table (the dashboard's view). Not here: the trials, like every Ray Train worker, take credentials
    from their node's environment (``ray start``'s, or the instance role; docs/operations.md).
    """
    try:
        copied = class_cache.ENV_VARS_TO_PROPAGATE
    except (ImportError, AttributeError):  # a Ray that no longer does this
        yield
        return
    class_cache.ENV_VARS_TO_PROPAGATE = {name for name in copied if not name.startswith("AWS_")}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = copied


def _trial_resources(sweep: SweepConfig, cfg: Config) -> dict[str, float]:
    """What Tune reserves for a trial function. With ``ray.num_workers=0`` the trial runs its jobs itself
    (no Ray Train worker group to start: the quickstart's way on one machine), so it holds a worker's share.

    An elastic trial (``ray.min_workers``: spot nodes) runs on the head node, holding none of its CPUs. On the
    head because the trial holds the lifecycle - its MLflow run, Tune's reports, and Ray Train's controller,
    which Ray places on the trial's node - so a reclaimed spot node costs the trial workers, as it costs a job
    (its group shrinks), never the trial. No CPU because Ray Train's elastic policy counts every node's whole
    CPUs as room for workers, not what other tasks hold there: a trial's 0.2 CPU on a 1-CPU head made it start a
    group of one worker too many, time out, and choose the same size again, for ever.
    """
    if cfg.ray.num_workers:
        return {"cpu": 0, launch.HEAD_NODE: 0.001} if cfg.ray.elastic else {"cpu": sweep.trial_cpus}
    gpu = {"gpu": cfg.ray.gpus_per_worker} if cfg.ray.use_gpu else {}
    return {"cpu": max(sweep.trial_cpus, cfg.ray.cpus_per_worker), **gpu}


def _concurrency(sweep: SweepConfig, cfg: Config) -> int:
    """Trials at a time such that every trial's Train workers can be placed (they are not Tune's resources): as
    many as fit with their whole group (``ray.num_workers``), and one where a trial fits only with its smallest
    (an elastic trial starts on the nodes there are, and grows as more arrive)."""
    trial, per_worker = _trial_resources(sweep, cfg)["cpu"], cfg.ray.cpus_per_worker
    have = ray.cluster_resources().get("CPU", 0)
    smallest = cfg.ray.min_workers if cfg.ray.elastic else cfg.ray.num_workers
    if have < trial + smallest * per_worker:
        which = "ray.min_workers" if cfg.ray.elastic else "ray.num_workers"
        raise ConfigError(f"one trial needs {trial + smallest * per_worker:g} CPU (trial_cpus + {which} x "
                          f"ray.cpus_per_worker) but the cluster has {have:g}")
    return max(1, min(sweep.max_concurrent_trials, int(have // (trial + cfg.ray.num_workers * per_worker))))


def _scheduler(sweep: SweepConfig):
    if sweep.scheduler.type == "none":
        return None

    s = sweep.scheduler
    # its rungs count epochs (``epochs_done``, in every epoch's report), not reports: a checkpoint taken inside
    # an epoch is a report too, and carries no metric for it to judge
    return ASHAScheduler(time_attr="epochs_done", metric=s.metric, mode=s.mode, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, max_t=10_000)


def _sweep_params(sweep: SweepConfig) -> dict[str, str]:
    return {"sweep.name": sweep.name, "sweep.base": redact(sweep.base),
            "sweep.search": redact(json.dumps(sweep.search))[:6000],
            "sweep.metric": sweep.metric, "sweep.scheduler": sweep.scheduler.type,
            "sweep.num_samples": str(sweep.num_samples)}


def _start_baseline(sweep: SweepConfig, cfg: Config, sweep_dir: str, shared: str | None,
                    uri: str, parent: str, verbose: bool):
    """The baseline as a Ray task with a trial's resources (None when the sweep has none): Ray starts it
    first, and the trials take the rest of the cluster until it ends."""
    if not (sweep.random_baseline and (sweep.linprobe or sweep.finetune)):
        return None

    share = _trial_resources(sweep, cfg)
    on_head = {k: v for k, v in share.items() if k == launch.HEAD_NODE}  # an elastic sweep's, as a trial's
    task = ray.remote(random_baseline).options(num_cpus=share["cpu"], num_gpus=share.get("gpu", 0), resources=on_head)
    return task.remote(sweep, cfg, sweep_dir, shared, uri, parent, verbose, provenance.command())
