"""Driver-side glue every job shares: paths made absolute, a Ray session, the MLflow run's life, result.json.

The worker side is ``loop.EpochLoop``; the Ray calls themselves are in ``launch``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from mae_ray import faults, launch, tracking
from mae_ray.config import Config
from mae_ray.errors import DataError, UserError


def absolute_local(spec: str) -> str:
    """A local relative shard path made absolute; URLs, ``pipe:`` commands and empty values unchanged."""
    if not spec or "://" in spec or spec.startswith("pipe:") or os.path.isabs(spec):
        return spec
    return os.path.abspath(spec)


def prepare(cfg: Config, *, need_val: bool = False) -> str:
    """Make paths absolute (Ray workers run elsewhere), check shards exist, write the config; returns the URI."""
    from mae_ray.data import expand_urls

    cfg.data.train_shards = absolute_local(cfg.data.train_shards)
    cfg.data.val_shards = absolute_local(cfg.data.val_shards)
    if not cfg.data.train_shards:
        raise DataError("data.train_shards is empty: point it at the training shards")
    expand_urls(cfg.data.train_shards)  # a pattern that matches nothing fails here, before Ray starts
    if need_val:
        if not cfg.data.val_shards:
            raise DataError("data.val_shards is empty: evaluation needs the validation shards")
        expand_urls(cfg.data.val_shards)
    cfg.output_dir = os.path.abspath(cfg.output_dir)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
        f.write(cfg.to_yaml())
    return tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)


def num_classes(cfg: Config) -> int:
    """``data.num_classes``, else the ``num_classes`` of the training shards' dataset.json."""
    if cfg.data.num_classes:
        return cfg.data.num_classes
    from mae_ray.data import expand_urls

    first = expand_urls(cfg.data.train_shards)[0]
    manifest = os.path.join(os.path.dirname(first), "dataset.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            count = json.load(f).get("num_classes")
        if count:
            return int(count)
    raise DataError(f"no dataset.json with num_classes beside {first}: set data.num_classes")


@contextlib.contextmanager
def ray_session(cfg: Config, verbose: bool):
    """Start (or join) Ray and check the request fits, before any MLflow run is created."""
    started = launch.init_ray(cfg.ray.address, verbose=verbose)
    try:
        launch.check_resources(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu)
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def storage_for(cfg: Config, name: str) -> str:
    """Where Ray Train keeps this run's checkpoints: ``<ray.storage_path or output_dir/ray>/<name>``."""
    return f"{launch.storage_uri(cfg.ray.storage_path or os.path.join(cfg.output_dir, 'ray'))}/{name}"


def refuse_existing(cfg: Config, name: str) -> None:
    """A fresh run must not silently continue the checkpoints of an earlier run with the same name."""
    folder = storage_for(cfg, name)
    if "://" not in folder and os.path.isdir(folder):
        found = sorted(p for p in os.listdir(folder) if p.startswith(launch.CHECKPOINT_PREFIX))
        if found:
            raise UserError(f"{folder} already holds checkpoints of an earlier run ({found[-1]}): pass "
                            f"--resume-from {os.path.join(folder, found[-1])} to continue it, or another output_dir")


def fit(train_fn: Callable[[dict], None], cfg: Config, *, name: str, uri: str, run_id: str, verbose: bool,
        what: str, callbacks: list | None = None, **extra: Any):
    """Run ``train_fn`` on the configured workers; on failure mark the run FAILED and raise one clear line."""
    loop_config = {"config": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id, "output_dir": cfg.output_dir,
                   "faults": faults.from_env(), "verbose": verbose, **extra}
    storage = launch.storage_uri(cfg.ray.storage_path or os.path.join(cfg.output_dir, "ray"))
    spec = launch.TrainerSpec(name=name, storage_path=storage, num_workers=cfg.ray.num_workers,
                              use_gpu=cfg.ray.use_gpu, cpus_per_worker=cfg.ray.cpus_per_worker,
                              max_failures=cfg.ray.failure_max_retries, verbose=verbose, callbacks=callbacks)
    try:
        result = launch.run_trainer(train_fn, loop_config, spec)
    except Exception as e:
        tracking.end_run(uri, run_id, "FAILED")
        raise UserError(f"{what} failed: {launch.worker_error(e)}") from None
    if result.checkpoint is None:
        tracking.end_run(uri, run_id, "FAILED")
        raise UserError(f"{what} finished without a checkpoint (ray.num_workers=0 runs keep none)")
    return result


def write_result(output_dir: str, summary: dict[str, Any]) -> str:
    """``result.json``, written whole or not at all."""
    path = os.path.join(output_dir, "result.json")
    with open(path + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def numeric(metrics: dict[str, Any] | None) -> dict[str, float]:
    return {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))}
