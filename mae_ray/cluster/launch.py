"""Ray plumbing shared by every job: start or join Ray, check resources, run a TorchTrainer; in the
worker, its rank and quiet logging. Checkpoints (format, writing, finding, loading) are ``checkpoints``'.

The training math never imports this module's Ray calls directly; the job modules glue them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from mae_ray import redaction, storage
from mae_ray.data.sources import use_limits
from mae_ray.errors import UserError

log = logging.getLogger(__name__)

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# Ray's resource of the head node (``ray._common.constants.HEAD_NODE_RESOURCE_NAME``): asking for a sliver of it
# places a task on the head, the node a spot cluster keeps (an elastic sweep's trials run there)
HEAD_NODE = "node:__internal_head__"
ELASTIC_START_RETRIES = 10  # an elastic group's starts that may time out (each after Ray's 60 s) in one run


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
    # ray.init applies that config to this process's root logger too (ERROR, kept after ray.shutdown), which
    # would silence our own warnings here (MLflow unreachable, a sample skipped): mae_ray's level is its own
    ours = logging.getLogger("mae_ray")
    if ours.level == logging.NOTSET:
        ours.setLevel(level)
    # Ray's loggers in every worker and actor: without a dashboard, Train's placement-group cleaner
    # warns every second that it cannot query the controller; ERROR keeps that out of the console.
    logs = ray.LoggingConfig(log_level="INFO" if verbose else "ERROR")
    target = address or os.environ.get("RAY_ADDRESS")
    if target:
        ray.init(address=target, logging_level=level, logging_config=logs)
        return False
    if not verbose:
        # One machine has nothing to be preempted, and Ray Train's preemption watcher logs an error-level
        # line at every job start (ray-project/ray#53727) that reads like a failure. Off by default here
        # (Train and Tune pass the variable on to their controllers and trials); --verbose keeps it.
        os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
             logging_level=level, logging_config=logs, **({"_temp_dir": temp_dir} if temp_dir else {}))
    return True


def check_resources(num_workers: int, cpus_per_worker: float, use_gpu: bool, gpus_per_worker: float = 1.0) -> None:
    """Refuse, at once, a request the cluster cannot meet: Ray Train V2 would otherwise wait for it forever."""
    if num_workers == 0:
        return  # in-process mode
    gpus = gpus_per_worker if use_gpu else 0
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    asked = f"{num_workers} worker(s) x {cpus_per_worker:g} CPU" + (f" + {gpus:g} GPU" if gpus else "")
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
    gpus_per_worker: float = 1.0
    min_workers: int | None = None  # an elastic group of min_workers..num_workers (None: fixed)
    resize_check_s: float = 60.0  # how often an elastic group looks for room to grow
    verbose: bool = False
    callbacks: list | None = None  # Ray Train callbacks (a sweep trial forwards reports to Tune)


def run_trainer(train_fn: Callable[[Any], None], worker_spec: Any, trainer: TrainerSpec):
    """Run ``train_fn(worker_spec)`` on ``trainer.num_workers`` Ray workers (0: in this process); the Result."""
    if trainer.num_workers == 0:
        return _run_in_process(train_fn, worker_spec, trainer)
    elastic = trainer.min_workers is not None and trainer.min_workers < trainer.num_workers
    # an elastic group starts once its smallest size fits: that is what must fit now
    check_resources(trainer.min_workers if elastic else trainer.num_workers, trainer.cpus_per_worker, trainer.use_gpu,
                    trainer.gpus_per_worker)
    resources = {"CPU": trainer.cpus_per_worker, **({"GPU": trainer.gpus_per_worker} if trainer.use_gpu else {})}
    storage_path, storage_fs = trainer.storage_path, None
    if storage.is_object_uri(storage_path):
        # The client goes to Ray as an object: its endpoint travels with it to Train's controller and workers,
        # whose environment (another node's) need not name one. Credentials are not in it: each process
        # resolves them from its own environment.
        storage_fs, storage_path = storage.filesystem(storage_path)
    endpoint = {storage.ENDPOINT_ENV: os.environ[storage.ENDPOINT_ENV]} if os.environ.get(storage.ENDPOINT_ENV) else {}
    trainer = TorchTrainer(
        _from_object_store(train_fn),
        # Ray Train keeps train_loop_config verbatim in its run records (the dashboard's Train view);
        # the config holds URLs that may carry credentials, so only a reference to it goes there
        train_loop_config={"worker_spec": ray.put(worker_spec)},
        scaling_config=ScalingConfig(
            # (min, max): Ray Train starts the group at any size that fits, restarts it smaller when a node
            # is lost and larger when one arrives; the workers keep the recipe at every size (StepPlan)
            num_workers=(trainer.min_workers, trainer.num_workers) if elastic else trainer.num_workers,
            elastic_resize_monitor_interval_s=trainer.resize_check_s,
            use_gpu=trainer.use_gpu, resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=trainer.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            # controller_failure_limit bounds the retries of a worker group that cannot be scheduled: none for a
            # fixed group (it would wait for the same size again); an elastic group that could not start at
            # the size Ray chose (a node just lost, not yet known dead) tries again at the size that fits then
            failure_config=FailureConfig(max_failures=trainer.max_failures,
                                         controller_failure_limit=ELASTIC_START_RETRIES if elastic else 0),
            # none deleted by Ray: the upload function keeps the newest (checkpoints.KEEP), as in-process runs do
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            # Ray Train's own INFO lines ("Reporting training result ...") only with --verbose;
            # the job's prints are not ray.train records and always reach the console.
            logging_config=LoggingConfig(log_level="INFO" if trainer.verbose else "WARNING"),
            # Train's print patch sends every print through its logger as well as to stdout, so each
            # line reached the console twice; plain prints reach it once, via Ray's log_to_driver.
            worker_runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **_worker_mlflow_retries(),
                                             **endpoint}},
            callbacks=trainer.callbacks,
        ),
    )
    return trainer.fit()


# --------------------------------------------------------------------------- in this process (ray.num_workers=0)
@dataclass
class InProcessRun:
    """A job run in the calling process: what Ray Train would hold for it (where its checkpoints go, what it
    reported last). Ray Train's own local mode cannot serve here: its API refuses to run inside a Ray Tune
    trial, and it keeps no checkpoint (only the last one reported, in a folder deleted once reported)."""

    fs: Any  # pyarrow filesystem of the run's checkpoints
    root: str  # the run's folder on it: ``<storage_path>/<run name>``
    use_gpu: bool = False
    forward: Callable[[dict[str, Any]], None] | None = None  # also given every report (a Tune trial's)
    metrics: dict[str, Any] | None = None  # the last report's
    unsent: dict[str, Any] | None = None  # the last report, until forwarded
    checkpoint: Any = None  # the last checkpoint stored


@dataclass
class InProcessResult:
    metrics: dict[str, Any] | None
    checkpoint: Any


_IN_PROCESS: list[InProcessRun] = []


def in_process_run() -> InProcessRun | None:
    """The job running in this process (``ray.num_workers=0``), if any."""
    return _IN_PROCESS[-1] if _IN_PROCESS else None


def _run_in_process(train_fn: Callable[[Any], None], worker_spec: Any, trainer: TrainerSpec) -> InProcessResult:
    """One worker, no Ray Train: a sweep trial's own process, or a quick run on one machine. No restarts."""
    import pyarrow.fs as pafs

    path, fs = trainer.storage_path, None
    if storage.is_object_uri(path):
        fs, path = storage.filesystem(path)
    run = InProcessRun(fs=fs or pafs.LocalFileSystem(), root=f"{path}/{trainer.name}", use_gpu=trainer.use_gpu,
                       forward=_tune_report(trainer.callbacks))
    _IN_PROCESS.append(run)
    try:
        train_fn(worker_spec)
        if run.checkpoint is None:  # nothing was left to train: the newest stored one, as Ray Train's result
            from mae_ray.cluster.checkpoints import newest_stored  # (it imports this module)

            run.checkpoint = newest_stored()
    finally:
        _IN_PROCESS.pop()
    return InProcessResult(metrics=run.metrics, checkpoint=run.checkpoint)


def forward_report() -> None:
    """In-process in a sweep trial: the epoch's report to Tune, once the epoch is in MLflow (the scheduler may
    stop the trial at this call; with Ray Train the callback forwards it while the worker goes on)."""
    run = in_process_run()
    if run is not None and run.unsent is not None:
        metrics, run.unsent = run.unsent, None
        if run.forward:
            run.forward(metrics)


def _tune_report(callbacks: list | None) -> Callable[[dict[str, Any]], None] | None:
    """A sweep trial's ``TuneReportCallback`` (a Ray Train callback) becomes a direct report to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    if any(isinstance(c, TuneReportCallback) for c in callbacks or ()):
        from ray import tune

        return tune.report
    return None


def _from_object_store(train_fn: Callable[[Any], None]) -> Callable[[dict], None]:
    def train_loop(config: dict[str, Any]) -> None:
        train_fn(ray.get(config["worker_spec"]))

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
            return redaction.redact(ln.strip())
    return redaction.redact(lines[-1].strip()) if lines else type(inner).__name__


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


def enter_worker(worker) -> tuple[int, int]:
    """What every Ray Train worker does first (``worker``: its ``WorkerSpec``): Ray's per-report INFO line
    quietened, the config's object-storage endpoint in force for it and its loader processes (a worker on
    another node did not inherit the driver's environment) and the data bounds likewise, its console
    redacted. Returns (rank, world size)."""
    redaction.install()
    quiet_worker(worker.verbose)
    storage.use_endpoint(worker.config.storage.endpoint_url)
    use_limits(worker.config.data)  # data.max_image_pixels, max_member_bytes, shard_tries: for its loaders too
    return world()


def world() -> tuple[int, int]:
    """(rank, world size) of this worker; (0, 1) in-process."""
    if in_process_run():
        return 0, 1
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def node_id() -> str | None:
    """This worker's Ray node id (hex); None in-process."""
    return None if in_process_run() else ray.get_runtime_context().get_node_id()


def first_on_node() -> bool:
    """Whether this worker has the lowest rank on its Ray node: one per node does per-node work. Not Ray Train's
    local rank, which groups workers by IP address, one for every Ray node of a host. A collective: every rank
    calls it. True in-process."""
    if in_process_run() is not None:
        return True
    import torch.distributed as dist

    nodes: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node_id())
    return nodes.index(node_id()) == dist.get_rank()


def preemption_watched() -> bool:
    """Whether this run can be told that a node of its group is being reclaimed: a Ray Train run whose
    preemption watcher is on (``init_ray`` turns it off on a one-machine Ray it starts)."""
    return in_process_run() is None and os.environ.get(PREEMPTION_WATCHER_ENV, "1") != "0"


def preemption_notice():
    """Ray Train's notice that a node of this group is being reclaimed (a ``ray.train.PreemptionInfo``: the
    nodes, their ranks, the deadline), or None. A barrier: every rank calls it at the same point."""
    return ray.train.get_preemption_info()


def device():
    """The torch device of this worker (in-process: the first GPU with ``ray.use_gpu``, else the CPU)."""
    import torch

    run = in_process_run()
    if run is None:
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cuda" if run.use_gpu and torch.cuda.is_available() else "cpu")


def prepare_model(model, move_to_device: bool = True):
    """DDP over the workers (Ray Train's ``prepare_model``); in-process, the model on this worker's device."""
    if in_process_run() is None:
        import ray.train.torch

        return ray.train.torch.prepare_model(model, move_to_device=move_to_device)
    return model.to(device()) if move_to_device else model
