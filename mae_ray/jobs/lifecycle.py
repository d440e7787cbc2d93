"""The driver side every training job shares: one run lifecycle (:func:`run_job`) and its steps.

The one owner of MLflow run status: every run mae-ray makes - a job's, a sweep's parent, a trial's - is opened
by :func:`open_run` and given its status (FINISHED, FAILED, KILLED) here and nowhere else: on leaving an
:class:`Ending` block (an error inside it: FAILED), or by :func:`stopped`
(``tests/test_layout.py`` checks it).

``run_job`` owns the order - checks, Ray session, config file, MLflow run, Ray Train fit, the run's
status, result.json - and a job (pre-training, linear probe, fine-tuning) supplies only what is its own
in a :class:`JobPlan`: its worker loop, its extra checks and run metadata, and its summary. The worker
side is ``cluster/worker_loop.EpochLoop``; the Ray calls themselves are in ``cluster/launch``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from mae_ray import redaction, storage, tracking
from mae_ray.cluster import checkpoints, faults, launch
from mae_ray.cluster.worker_spec import WorkerSpec
from mae_ray.config import Config
from mae_ray.data import shards
from mae_ray.data.shards import check_local_shards, dataset_size, expand_urls, manifest_classes
from mae_ray.data.sources import check_remote_shard, use_limits
from mae_ray.errors import DataError, UserError
from mae_ray.jobs import files
from mae_ray.jobs.encoders import EncoderSource
from mae_ray.train import recipe


def open_run(uri: str, experiment: str, name: str, params: dict[str, Any], tags: dict[str, str],
             parent_run_id: str | None = None) -> str:
    """A new MLflow run (RUNNING): a job's, a sweep's parent or a trial's; returns its id."""
    return tracking.start_run(uri, experiment, name, params, tags, parent_run_id=parent_run_id)


def _close(uri: str, run_id: str, status: str) -> str | None:
    """Set a run's final status (FINISHED, FAILED, KILLED); an MLflow outage is one warning (returned), never an
    exception that would hide the job's own result or error."""
    return tracking.end_run_or_warn(uri, run_id, status)


class Ending:
    """The end of a run's life, as a ``with`` block: an error inside it ends the run FAILED (KILLED on Ctrl-C)
    and goes on; leaving it normally ends the run FINISHED, unless ``finish=False`` (the caller who made the
    run ends it: a sweep trial's pre-training, a job's Ray Train fit before its summary). ``warning``: what an
    MLflow outage left undone (the run stays RUNNING)."""

    def __init__(self, uri: str, run_id: str, finish: bool = True):
        self.uri, self.run_id, self.finish, self.warning = uri, run_id, finish, None

    def __enter__(self) -> Ending:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is not None:
            _close(self.uri, self.run_id, "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")
        elif self.finish:
            self.warning = _close(self.uri, self.run_id, "FINISHED")
        return False  # the error goes on


def stopped(uri: str, run_id: str) -> None:
    """A sweep trial the scheduler stopped early: recorded as stopped (KILLED, ``sweep.status``), not lost."""
    tracking.EpochLogger(uri, run_id).set_tags({"sweep.status": "stopped"})
    _close(uri, run_id, "KILLED")


def absolute_local(pattern: str) -> str:
    """A local relative shard path made absolute; URLs, ``pipe:`` commands and empty values unchanged."""
    if not pattern or "://" in pattern or pattern.startswith("pipe:") or os.path.isabs(pattern):
        return pattern
    return os.path.abspath(pattern)


def prepare(cfg: Config, *, need_val: bool = False, write: bool = True) -> str:
    """Make paths absolute (Ray workers run elsewhere), check the shards, write the config; returns the URI.

    A shard pattern that matches nothing, or a local shard that is empty or not a tar, fails here,
    before Ray starts. ``write=False`` leaves the writing to :func:`write_config`, for jobs with more
    to check first: a refused job leaves no output folder behind and an earlier run's files untouched.
    """
    redaction.install()  # the console of a job started from Python too, not only from the CLI
    storage.use_endpoint(cfg.storage.endpoint_url)  # before the first shard listing, and inherited by Ray
    use_limits(cfg.data)  # the data bounds likewise
    if storage.is_object_uri(cfg.ray.storage_path or ""):
        storage.check_writable(cfg.ray.storage_path)  # a missing bucket fails here, not in Ray's controller

    cfg.data.train_shards = absolute_local(cfg.data.train_shards)
    cfg.data.val_shards = absolute_local(cfg.data.val_shards)
    if not cfg.data.train_shards:
        raise DataError("data.train_shards is empty: point it at the training shards")
    if need_val and not cfg.data.val_shards:
        raise DataError("data.val_shards is empty: evaluation needs the validation shards")
    for pattern in (cfg.data.train_shards, cfg.data.val_shards):  # val_shards, when set, serve pre-training too
        if pattern:
            check_local_shards(expand_urls(pattern))
            check_remote_shard(expand_urls(pattern))
    cfg.output_dir = os.path.abspath(cfg.output_dir)
    if write:
        write_config(cfg)
    return tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)


def write_config(cfg: Config) -> str:
    """``<output_dir>/config.yaml`` (the folder created if need be), written whole; returns its path."""
    return files.write_text(os.path.join(cfg.output_dir, "config.yaml"), cfg.to_yaml())


def num_classes(cfg: Config) -> int:
    """``data.num_classes``, else the ``num_classes`` of the training shards' dataset.json.

    Refused when the dataset.json beside the training or validation shards lists more classes than
    that: their labels would be out of range for the classifier, which fails late and obscurely (a
    CUDA device-side assert) or not at all (cross-entropy ignores label -1). The loaders check every
    label against the count as well (``make_*_loader(num_classes=...)``).
    """
    sets = (("training", cfg.data.train_shards), ("validation", cfg.data.val_shards))
    listed = {which: manifest_classes(expand_urls(pattern)[0]) for which, pattern in sets if pattern}
    if cfg.data.num_classes:
        count, origin = cfg.data.num_classes, "data.num_classes"
    elif listed["training"][1]:
        count, origin = listed["training"][1], listed["training"][0]
    else:
        raise DataError(f"no num_classes in {listed['training'][0]} (missing, or without that key): "
                        "set data.num_classes")
    for which, (manifest, listed_count) in listed.items():
        if listed_count and listed_count > count:
            raise DataError(f"the {which} shards' {manifest} lists {listed_count} classes but the classifier gets "
                            f"{count} (from {origin}): their labels would be out of range; use shards written with "
                            "the same classes (make_shards --classes), or set data.num_classes to match")
    return count


def check_epoch_updates(cfg: Config, job: str) -> None:
    """Refuse, before Ray starts, a ``job`` whose epoch is shorter than one optimiser update (``recipe.check_epoch``).

    The epoch's samples: ``data.samples_per_epoch``, else the training shards' dataset.json; a cached-feature
    probe trains on every training sample. Shards without a count are checked by the workers instead
    (``engine.StepPlan``), once the loader knows its length.
    """
    if not cfg.data.train_shards:
        return  # prepare() says so
    if job == "linprobe" and cfg.linprobe.cache_features:
        samples, key = None, None  # the cache holds every training sample
    elif job == "finetune" and cfg.finetune.samples_per_epoch:
        samples, key = cfg.finetune.samples_per_epoch, "finetune.samples_per_epoch"
    else:
        samples, key = cfg.data.samples_per_epoch, "data.samples_per_epoch"
    samples = samples or dataset_size(cfg.data.train_shards)
    if samples is None:
        return
    max_batches = cfg.train.max_steps_per_epoch if job == "pretrain" else None
    recipe.check_epoch({"pretrain": "train"}.get(job, job), samples, recipe.for_job(cfg, job), max_batches, key)


@contextlib.contextmanager
def ray_session(cfg: Config, verbose: bool):
    """Start (or join) Ray and check the request fits, before any MLflow run is created. Yields whether
    this process started Ray (and so stops it on leaving)."""
    started = launch.init_ray(cfg.ray.address, verbose=verbose)
    try:
        smallest = cfg.ray.min_workers if cfg.ray.elastic else cfg.ray.num_workers  # an elastic group's start
        launch.check_resources(smallest, cfg.ray.cpus_per_worker, cfg.ray.use_gpu, cfg.ray.gpus_per_worker)
        yield started
    finally:
        if started:
            ray.shutdown()


def storage_for(cfg: Config, name: str) -> str:
    """Where Ray Train keeps this run's checkpoints: ``<ray.storage_path or output_dir/ray>/<name>``."""
    return f"{launch.storage_uri(cfg.ray.storage_path or os.path.join(cfg.output_dir, 'ray'))}/{name}"


def refuse_existing(cfg: Config, name: str) -> None:
    """A fresh run must not silently continue the checkpoints of an earlier run with the same name."""
    folder = storage_for(cfg, name)
    found = checkpoints.checkpoint_folders(folder, with_state=False)
    if found:
        raise UserError(f"{folder} already holds checkpoints of an earlier run ({found[-1].rsplit('/', 1)[-1]}): "
                        f"pass --resume-from {found[-1]} to continue it, or another output_dir")


def fit(train_fn: Callable[[WorkerSpec], None], cfg: Config, *, name: str, uri: str, run_id: str, verbose: bool,
        what: str, callbacks: list | None = None, resume_from: str | None = None,
        evaluation: Evaluation | None = None):
    """Run ``train_fn(WorkerSpec)`` on the configured workers; on failure mark the run FAILED and raise one
    clear line. ``evaluation``: an evaluation job's encoder (its weights sent once through the object store)
    and task."""
    encoder = None
    if evaluation is not None and evaluation.source.state is not None:
        encoder = ray.put(evaluation.source.state)
    worker = WorkerSpec(config=cfg, tracking_uri=uri, run_id=run_id, output_dir=cfg.output_dir,
                        faults=faults.from_env(), verbose=verbose, resume_from=resume_from, encoder=encoder,
                        model_kwargs=evaluation and evaluation.source.model_kwargs,
                        num_classes=evaluation and evaluation.num_classes)
    storage = launch.storage_uri(cfg.ray.storage_path or os.path.join(cfg.output_dir, "ray"))
    trainer = launch.TrainerSpec(name=name, storage_path=storage, num_workers=cfg.ray.num_workers,
                              use_gpu=cfg.ray.use_gpu, cpus_per_worker=cfg.ray.cpus_per_worker,
                              gpus_per_worker=cfg.ray.gpus_per_worker,
                              max_failures=cfg.ray.failure_max_retries, min_workers=cfg.ray.min_workers,
                              resize_check_s=cfg.ray.resize_check_s, verbose=verbose, callbacks=callbacks)
    try:
        result = launch.run_trainer(train_fn, worker, trainer)
    except Exception as e:  # the run ends FAILED in run_job's Ending
        message = launch.worker_error(e)
        if isinstance(getattr(e, "controller_failure", None), OSError):  # Ray's own writes to storage failed
            folder = f"{storage}/{name}"
            message = (f"cannot write to the checkpoint storage {folder}: {message}; "
                       f"last good checkpoint: {_newest_checkpoint(folder, cfg.storage.upload_retry_s)}")
        raise UserError(f"{what} failed: {message}") from None
    if result.checkpoint is None:
        raise UserError(f"{what} finished without a checkpoint")
    return result


def _newest_checkpoint(folder: str, retry_s: float) -> str:
    """The newest checkpoint under ``folder``, asked again while the storage does not answer (an outage)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return checkpoints.newest_checkpoint_dir(folder)
        except DataError as e:
            if time.monotonic() >= deadline:
                return f"unknown ({e})"
        time.sleep(2.0)


def log_data(uri: str, run_id: str, cfg: Config) -> None:
    """The run's shard sets in MLflow's dataset tracking; a set that cannot be described is only a warning."""
    sets = {}
    for context, pattern in (("training", cfg.data.train_shards), ("validation", cfg.data.val_shards)):
        try:
            if pattern:
                sets[context] = (pattern, shards.lineage(pattern))
        except Exception as e:  # lineage is a record: it never stops a run
            print(f"[mlflow] warning: {context} data not logged as an MLflow dataset ({e})", flush=True)
    try:
        tracking.log_datasets(uri, run_id, sets)
    except Exception as e:
        print(f"[mlflow] warning: datasets not logged ({e})", flush=True)


def write_result(output_dir: str, summary: dict[str, Any]) -> str:
    """``result.json``, written whole or not at all, secrets redacted."""
    return files.write_json(os.path.join(output_dir, "result.json"), summary)


def numeric(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}



# --------------------------------------------------------------------------- the run lifecycle
@dataclass
class Setup:
    """What a job adds to its run once the common checks passed (``JobPlan.setup``)."""

    header: str  # the line printed before Ray starts
    params: dict[str, str] = field(default_factory=dict)  # MLflow params beyond the flattened config
    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    evaluation: Evaluation | None = None  # an evaluation job's: what its workers get beside the config


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation job (probe, fine-tuning) hands its workers beside the config, and reads again in its
    summary: the encoder it judges (weights, architecture, where it came from) and the number of classes."""

    source: EncoderSource
    num_classes: int


@dataclass
class JobPlan:
    job: str  # pretrain | linprobe | finetune: the worker loop's name, the checkpoint format's key
    what: str  # for messages: "pre-training"
    train_loop: Callable[[WorkerSpec], None]
    name: str  # the run's name, and so its checkpoint folder
    # (cfg, uri) -> Setup: the job's own checks, the dearest last; nothing written yet, Ray not started
    setup: Callable[[Config, str], Setup]
    # (Ray Train result, run id, uri, setup) -> (the job's part of result.json, {run id: final metrics} for
    # the lifecycle to log); may log artifacts itself (guarded: an MLflow outage is a warning)
    summarize: Callable[[Any, str, str, Setup], tuple[dict[str, Any], dict[str, dict[str, float]]]]
    need_val: bool = False


def run_job(cfg: Config, plan: JobPlan, *, verbose: bool = False, resume_from: str | None = None,
            continue_existing: bool = False, run_id: str | None = None, callbacks: list | None = None
            ) -> dict[str, Any]:
    """Run one training job, in the one order every job follows; returns what result.json holds.

    Every check comes before anything is written or Ray starts, so a refused job leaves no trace.
    ``resume_from``: a checkpoint of a stopped run, continued in its own MLflow run. ``continue_existing``:
    checkpoints already in this run's folder are resumed (a sweep trial restored by Tune), not refused.
    ``run_id``: an MLflow run the caller created (a sweep trial). ``callbacks``: Ray Train callbacks.
    """
    uri = prepare(cfg, need_val=plan.need_val, write=False)  # first: it puts storage.endpoint_url in force
    with files.claim(cfg.output_dir, plan.what):  # a second job on this folder: refused, one line
        return _run_claimed(cfg, plan, uri, verbose=verbose, resume_from=resume_from,
                            continue_existing=continue_existing, run_id=run_id, callbacks=callbacks)


def _run_claimed(cfg: Config, plan: JobPlan, uri: str, *, verbose: bool, resume_from: str | None,
                 continue_existing: bool, run_id: str | None, callbacks: list | None) -> dict[str, Any]:
    check_epoch_updates(cfg, plan.job)
    if resume_from:
        run_id = checkpoints.load_state(resume_from).get("mlflow_run_id")  # a bad path fails now, not in a worker
    if not (resume_from or continue_existing):
        refuse_existing(cfg, plan.name)
    setup = plan.setup(cfg, uri)
    print(setup.header, flush=True)
    owns = run_id is None or resume_from is not None  # else the caller made the run and ends it (a sweep trial)
    with ray_session(cfg, verbose):
        write_config(cfg)  # once the cluster is known to fit the request
        if run_id is None:
            params = {**tracking.params_from_config(cfg.flatten()), **setup.params}
            run_id = open_run(uri, cfg.mlflow.experiment, plan.name, params, {**tracking.run_tags(), **setup.tags},
                              parent_run_id=setup.parent_run_id)
        if not resume_from:  # a resumed run logged its data when it started
            log_data(uri, run_id, cfg)
        start = time.time()
        with Ending(uri, run_id, finish=False):
            result = fit(plan.train_loop, cfg, name=plan.name, uri=uri, run_id=run_id, verbose=verbose,
                         what=plan.what, callbacks=callbacks, resume_from=resume_from, evaluation=setup.evaluation)
    with Ending(uri, run_id, finish=owns) as ending:
        summary, final = plan.summarize(result, run_id, uri, setup)
        summary.update(mlflow_run_id=run_id, wall_time_s=round(time.time() - start, 1))
        write_result(cfg.output_dir, summary)  # first: the report never waits on MLflow
        # the run's last MLflow calls (MLflow's client retries each), then a warning naming what is missing
        missing = [w for w in (tracking.log_values_or_warn(uri, rid, values) for rid, values in final.items()) if w]
    missing += [ending.warning] if ending.warning else []
    if missing:
        summary["mlflow_incomplete"] = missing
        write_result(cfg.output_dir, summary)
    return summary
