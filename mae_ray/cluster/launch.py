"""Ray plumbing shared by every job: start or join Ray, check resources, run a TorchTrainer,
and the in-worker side of checkpoints (report, find the latest, load).

The training math never imports this module's Ray calls directly; the job modules glue them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mae_ray.errors import CheckpointError, UserError

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "epoch_"


# --------------------------------------------------------------------------- driver side
def init_ray(address: str | None = None, verbose: bool = False, num_cpus: int | None = None,
             temp_dir: str | None = None) -> bool:
    """Join the cluster named by ``address`` or ``$RAY_ADDRESS`` (set by ``ray job submit``), else start
    a private local Ray. Returns True when this process started Ray (and so should shut it down).

    A plain ``ray.init()`` would try to join whatever head ``/tmp/ray/ray_current_cluster`` names,
    even a dead one; ``address="local"`` always starts a fresh instance. ``temp_dir``: the private
    instance's session folder (default Ray's ``/tmp/ray``); tests give each instance its own.
    """
    if ray.is_initialized():
        return False
    level = logging.INFO if verbose else logging.WARNING
    # Ray's loggers in every worker and actor: without a dashboard, Train's placement-group cleaner
    # warns every second that it cannot query the controller; ERROR keeps that out of the console.
    logs = ray.LoggingConfig(log_level="INFO" if verbose else "ERROR")
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, logging_level=level, logging_config=logs)
        return False
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             logging_level=level, logging_config=logs, **({"_temp_dir": temp_dir} if temp_dir else {}))
    return True


def check_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Refuse, at once, a request the cluster cannot meet: Ray Train V2 would otherwise wait for it forever."""
    if num_workers == 0:
        return  # in-process mode
    gpus = 1 if use_gpu else 0
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    asked = f"{num_workers} worker(s) x {cpus_per_worker:g} CPU" + (" + 1 GPU" if gpus else "")
    have = f"the cluster has {total.get('CPU', 0):g} CPU and {total.get('GPU', 0):g} GPU on {len(nodes)} node(s)"
    if num_workers * cpus_per_worker > total.get("CPU", 0) or num_workers * gpus > total.get("GPU", 0):
        raise UserError(f"asked for {asked}, but {have}; lower ray.num_workers or ray.cpus_per_worker")
    if not any(n.get("CPU", 0) >= cpus_per_worker and n.get("GPU", 0) >= gpus for n in nodes):
        raise UserError(f"asked for {asked}, but no single node has that much; {have}")


@dataclass
class TrainerSpec:
    name: str
    storage_path: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    max_failures: int
    keep_checkpoints: int | None = 2
    verbose: bool = False
    callbacks: list | None = None  # Ray Train callbacks (a sweep trial forwards reports to Tune)


def run_trainer(train_fn: Callable[[dict], None], loop_config: dict[str, Any], spec: TrainerSpec):
    """Run ``train_fn`` on ``spec.num_workers`` Ray workers (0: in this process) and return the Result."""
    check_resources(spec.num_workers, spec.cpus_per_worker, spec.use_gpu)
    resources = {"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})}
    trainer = TorchTrainer(
        _from_object_store(train_fn),
        # Ray Train keeps train_loop_config verbatim in its run records (the dashboard's Train view);
        # the config holds URLs that may carry credentials, so only a reference to it goes there
        train_loop_config={"loop_config": ray.put(loop_config)},
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers, use_gpu=spec.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=spec.name,
            storage_path=spec.storage_path,
            # controller_failure_limit bounds the retries of a worker group that cannot be scheduled
            failure_config=FailureConfig(max_failures=spec.max_failures, controller_failure_limit=0),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.keep_checkpoints),
            # Ray Train's own INFO lines ("Reporting training result ...") only with --verbose;
            # the job's prints are not ray.train records and always reach the console.
            logging_config=LoggingConfig(log_level="INFO" if spec.verbose else "WARNING"),
            # Train's print patch sends every print through its logger as well as to stdout, so each
            # line reached the console twice; plain prints reach it once, via Ray's log_to_driver.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **_worker_mlflow_retries()}},
            callbacks=spec.callbacks,
        ),
    )
    return trainer.fit()


def _from_object_store(train_fn: Callable[[dict], None]) -> Callable[[dict], None]:
    def train_loop(config: dict[str, Any]) -> None:
        train_fn(ray.get(config["loop_config"]))

    return train_loop


def _worker_mlflow_retries() -> dict[str, str]:
    """Workers log to MLflow between epochs and keep what fails for the next try (``tracking.EpochLogger``):
    MLflow's default of 7 retries with exponential backoff would stall training for minutes while the
    server is down. The driver keeps the defaults. Values set by the user win."""
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    return {k: os.environ.get(k, v) for k, v in defaults.items()}


def worker_error(e: BaseException) -> str:
    """The first line of the underlying worker exception (not Ray's wrapper text)."""
    failures = getattr(e, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) or getattr(e, "controller_failure", None) or e
    lines = [ln for ln in str(inner).splitlines() if ln.strip()]
    for ln in reversed(lines):  # Ray puts the remote traceback first and the exception line last
        if "Error" in ln and ":" in ln:
            return ln.strip()
    return lines[-1].strip() if lines else type(inner).__name__


def storage_uri(path: str) -> str:
    """Ray wants an absolute local path or a URI (s3://, gs://, ...)."""
    return path if "://" in path else os.path.abspath(path)


# --------------------------------------------------------------------------- worker side
def quiet_worker(verbose: bool) -> None:
    """Ray 2.60 logs "Reporting training result ..." at INFO per report through a logger named after its
    file (so Train's own log level does not apply to it); keep it out of the console unless --verbose."""
    if not verbose:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) in-process."""
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def report(metrics: dict[str, Any], state: dict[str, Any] | None, epoch: int,
           files: dict[str, Callable[[str], None]] | None = None) -> None:
    """Report ``metrics``; with ``state``, rank 0 also writes a checkpoint ``epoch_NNNNNN`` beside them.

    Every worker must call this the same number of times (it is a barrier in Ray Train).
    ``files`` maps file names to writers that put extra files in the checkpoint directory.
    """
    rank, _ = world()
    if state is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="mae_ray_ckpt_") as tmp:
        torch.save(state, os.path.join(tmp, STATE_FILE))
        for name, write in (files or {}).items():
            write(os.path.join(tmp, name))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:06d}", checkpoint_upload_fn=_upload)


def _upload(checkpoint: Checkpoint, dir_name: str) -> Checkpoint:
    """Ray's copy to storage, made safe: on a local or mounted filesystem the files go to
    ``.tmp-<dir_name>`` first and are renamed once whole, so a full or read-only disk, or a worker
    killed mid-copy, never leaves a folder that looks like a complete checkpoint. Object stores
    (S3, GCS) write each file whole or not at all, and a missing ``state.pt`` makes
    ``latest_checkpoint`` skip the folder, so there Ray's own copy is used as is.
    """
    import pyarrow.fs as pafs

    storage = ray.train.get_context().get_storage()
    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    final, tmp = f"{root}/{dir_name}", f"{root}/.tmp-{dir_name}"
    try:
        if not isinstance(fs, pafs.LocalFileSystem):
            return storage.persist_current_checkpoint(checkpoint, dir_name)
        fs.delete_dir_contents(tmp, missing_dir_ok=True)
        fs.create_dir(tmp)
        pafs.copy_files(checkpoint.path, tmp, source_filesystem=checkpoint.filesystem, destination_filesystem=fs)
        if fs.get_file_info(final).type != pafs.FileType.NotFound:
            fs.delete_dir(final)  # the same epoch written again after a restart
        fs.move(tmp, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            fs.delete_dir(tmp)  # frees what the failed copy took
        text = str(e).strip().splitlines()
        raise CheckpointError(f"cannot write checkpoint {dir_name} to {root}: "
                              f"{text[0] if text else type(e).__name__}") from None
    return Checkpoint(path=final, filesystem=fs)


def checkpoint_location(epoch: int) -> str:
    """Where the checkpoint of ``epoch`` is (or would be) stored, for messages."""
    name = f"{CHECKPOINT_PREFIX}{epoch:06d}"
    try:
        return f"{ray.train.get_context().get_storage().experiment_fs_path}/{name}"
    except NotImplementedError:
        return name


def latest_checkpoint(explicit: str | None = None) -> tuple[dict[str, Any] | None, str | None]:
    """The newest loadable training state and where it came from, or (None, None) for a fresh start.

    Ray 2.60 registers checkpoints asynchronously: a worker killed just after writing one can come
    back with ``get_checkpoint()`` naming the previous one, and resuming from that would run an epoch
    twice. So the run's storage folder is also listed, and the highest ``epoch_*`` state that loads
    wins. ``explicit`` (``--resume-from``) is used only when the run has no checkpoint of its own.
    """
    candidates = _stored_checkpoints()
    registered = ray.train.get_checkpoint()
    if registered is not None:
        candidates.append(registered)
    for ckpt in sorted(candidates, key=lambda c: os.path.basename(c.path.rstrip("/")), reverse=True):
        try:
            return load_state(ckpt), ckpt.path
        except CheckpointError as e:
            log.warning("skipping unreadable checkpoint %s: %s", ckpt.path, e)
    if explicit:
        return load_state(explicit), explicit
    return None, None


def newest_checkpoint_dir(folder: str) -> str:
    """The newest ``epoch_*`` folder with a state file under a local run folder (for messages), or 'none'."""
    if "://" in folder or not os.path.isdir(folder):
        return "none"
    found = sorted(p for p in os.listdir(folder)
                   if p.startswith(CHECKPOINT_PREFIX) and os.path.isfile(os.path.join(folder, p, STATE_FILE)))
    return os.path.join(folder, found[-1]) if found else "none"


def _stored_checkpoints() -> list[Checkpoint]:
    try:
        storage = ray.train.get_context().get_storage()
    except NotImplementedError:  # in-process mode has no storage context
        return []
    import pyarrow.fs as pafs

    fs, root = storage.storage_filesystem, storage.experiment_fs_path
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    return [
        Checkpoint(path=info.path, filesystem=fs)
        for info in infos
        if info.type == pafs.FileType.Directory and os.path.basename(info.path).startswith(CHECKPOINT_PREFIX)
    ]


def load_state(source: Checkpoint | str) -> dict[str, Any]:
    """Read a training state with ``weights_only=True`` from a Ray checkpoint or a local directory/file."""
    if isinstance(source, str):
        source = os.path.join(source, STATE_FILE) if os.path.isdir(source) else source
        if not os.path.isfile(source):
            raise CheckpointError(f"no checkpoint at {source}")
        return _torch_load(source)
    with source.as_directory() as path:
        file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(file):
            raise CheckpointError(f"{source.path} has no {STATE_FILE}")
        return _torch_load(file)


def _torch_load(path: str) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e).strip().splitlines()
        raise CheckpointError(f"cannot read {path}: {text[0] if text else type(e).__name__}") from None
