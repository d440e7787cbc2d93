"""MAE pre-training as a Ray Train job: ``python -m mae_ray.pretrain --config FILE [--set KEY=VALUE ...]``.

Driver: validate config and data paths, create the MLflow run, start or join Ray, run the workers,
log the final artifacts, write ``result.json``. Worker (``train_loop``): build model and loader,
resume from the newest checkpoint, train epochs, report metrics + checkpoints, log to MLflow (rank 0).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from mae_ray.cli import guarded, job_parser, quiet_logs
from mae_ray.config import Config, from_dict, load_config
from mae_ray.errors import UserError


# --------------------------------------------------------------------------- worker
def train_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (or in-process with ray.num_workers=0)."""
    import ray.train.torch
    import torch

    from mae_ray import engine, faults, launch, tracking
    from mae_ray.data import make_train_loader
    from mae_ray.models import MaskedAutoencoderViT
    from mae_ray.weights import save_encoder

    cfg: Config = from_dict(Config, loop_config["config"])
    launch.quiet_worker(loop_config.get("verbose", False))
    rank, world_size = launch.world()
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        engine.configure_cuda()
    else:
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed + rank)

    model = MaskedAutoencoderViT(**cfg.model.kwargs())
    loader = make_train_loader(
        cfg.data.train_shards, batch_size=cfg.train.batch_size, transform="pretrain",
        img_size=model.patch_embed.img_size[0], rank=rank, world_size=world_size,
        num_workers=cfg.data.num_workers, samples_per_epoch=cfg.data.samples_per_epoch,
        seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
    )
    batches = len(loader) if cfg.train.max_steps_per_epoch is None else min(len(loader), cfg.train.max_steps_per_epoch)
    plan = engine.StepPlan(batches, cfg.train.accum_iter, cfg.train.epochs, cfg.train.warmup_epochs)
    lr = cfg.train.lr or engine.scaled_lr(cfg.train.blr, cfg.train.batch_size, cfg.train.accum_iter, world_size)
    optimizer = engine.build_optimizer(model.to(device), lr, cfg.train.weight_decay, device)
    scheduler = engine.build_scheduler(optimizer, plan, cfg.train.min_lr)
    precision = engine.Precision(cfg.train.amp, device)

    state, resumed_from = launch.latest_checkpoint(loop_config.get("resume_from"))
    start_epoch, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.scaler.load_state_dict(state["scaler"])
        engine.set_rng_state(state["rng"])
        start_epoch, history = state["epoch"] + 1, list(state["history"])
    raw_model = model
    model = ray.train.torch.prepare_model(model)  # DDP over NCCL (GPU) or Gloo (CPU); no-op for 1 worker
    if cfg.train.compile:
        model = torch.compile(model)

    logger = None
    if rank == 0:
        logger = tracking.EpochLogger(loop_config["tracking_uri"], loop_config["run_id"])
        logger.backfill(history)  # epochs a killed worker checkpointed but never logged
        where = f"resumed from {resumed_from} at epoch {start_epoch}" if state else "fresh start"
        print(f"[pretrain] {world_size} worker(s), {plan.batches_per_epoch} batches/epoch, "
              f"effective batch {cfg.train.batch_size * cfg.train.accum_iter * world_size}, lr {lr:.3g}; {where}",
              flush=True)
    pictures = _Pictures(cfg, raw_model, loop_config) if rank == 0 else None
    last_good = resumed_from

    for epoch in range(start_epoch, cfg.train.epochs):
        loader.set_epoch(epoch)
        torch.manual_seed(hash((cfg.train.seed, epoch, rank)) % 2**31)  # masks: reproducible on resume
        try:
            metrics = engine.train_one_epoch(
                model, loader, optimizer, scheduler, precision, epoch=epoch, plan=plan,
                mask_ratio=cfg.model.mask_ratio, device=device,
            )
        except engine.NonFiniteLossError as e:
            raise engine.NonFiniteLossError(f"{e}; last good checkpoint: {last_good or 'none'}") from None
        metrics = _reduce_over_ranks(metrics, loader.skipped, device)
        history.append({"epoch": epoch, **metrics})
        last = epoch == cfg.train.epochs - 1
        save = last or (epoch + 1) % cfg.train.checkpoint_every == 0
        state = None
        files = {}
        if save and rank == 0:
            state = {
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": precision.scaler.state_dict(),
                "epoch": epoch, "step": (epoch + 1) * plan.updates_per_epoch, "config": cfg.to_yaml(),
                "rng": engine.rng_state(), "mlflow_run_id": loop_config["run_id"], "history": history,
            }
            if last:
                files = {
                    "encoder.pth": lambda p: save_encoder(raw_model, p),
                    "encoder.safetensors": lambda p: save_encoder(raw_model, p),
                    "config.yaml": lambda p: open(p, "w").write(cfg.to_yaml()),
                }
        faults.maybe_fire(loop_config.get("faults"), "before_report", epoch, rank, loop_config["output_dir"])
        launch.report({"epoch": epoch, **metrics}, state, epoch, files)
        faults.maybe_fire(loop_config.get("faults"), "after_report", epoch, rank, loop_config["output_dir"])
        if rank == 0:
            logger.log_epoch(epoch, metrics)
            print(f"[pretrain] epoch {epoch + 1}/{cfg.train.epochs} loss {metrics['train_loss']:.4f} "
                  f"lr {metrics['lr']:.3g} {metrics['images_per_s']:.1f} img/s {metrics['epoch_time_s']:.1f}s "
                  f"skipped {int(metrics['data/skipped'])}", flush=True)
            pictures.maybe_log(epoch, last, logger)
    if logger is not None and not logger.flush():
        print(f"[pretrain] warning: {len(logger.pending)} metric values could not reach MLflow", flush=True)


def _reduce_over_ranks(metrics: dict[str, float], skipped: int, device) -> dict[str, float]:
    """Loss averaged, throughput and skipped samples summed over ranks (what the whole job did)."""
    import torch
    import torch.distributed as dist

    values = torch.tensor([metrics["train_loss"], metrics["images_per_s"], float(skipped)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values[0] /= dist.get_world_size()
    out = dict(metrics)
    out.update(train_loss=values[0].item(), images_per_s=values[1].item())
    out["data/skipped"] = values[2].item()
    out.pop("batches", None)
    return out


class _Pictures:
    """Rank 0's reconstruction grids of fixed validation images under a fixed mask."""

    def __init__(self, cfg: Config, model, loop_config: dict[str, Any], count: int = 8):
        self.cfg, self.model, self.count = cfg, model, count
        self.every = cfg.train.visualize_every
        self.out_dir = os.path.join(loop_config["output_dir"], "reconstructions")
        self.images = None

    def _load(self):
        from mae_ray.data import make_eval_loader
        from mae_ray.visualize import fixed_noise

        shards = self.cfg.data.val_shards or self.cfg.data.train_shards
        size = self.model.patch_embed.img_size[0]
        loader = make_eval_loader(shards, batch_size=self.count, transform="eval", img_size=size, num_workers=0)
        self.images = next(iter(loader))[0][: self.count]
        self.noise = fixed_noise(self.images.shape[0], self.model.patch_embed.num_patches)

    def maybe_log(self, epoch: int, last: bool, logger) -> None:
        if not (last or (self.every and (epoch + 1) % self.every == 0)):
            return
        from mae_ray.visualize import reconstruct, save_reconstruction_grid

        if self.images is None:
            self._load()
        pics = reconstruct(self.model, self.images, self.cfg.model.mask_ratio, self.noise)
        path = os.path.join(self.out_dir, f"epoch_{epoch + 1:04d}.png")
        save_reconstruction_grid(pics, path, title=f"epoch {epoch + 1}, mask ratio {self.cfg.model.mask_ratio}")
        logger.log_artifact(path, "reconstructions")


# --------------------------------------------------------------------------- driver
def run(cfg: Config, *, resume_from: str | None = None, verbose: bool = False,
        parent_run_id: str | None = None) -> dict[str, Any]:
    """Pre-train with ``cfg`` and return what result.json holds. Raises UserError for user mistakes."""
    from mae_ray import faults, launch, tracking
    from mae_ray.data import expand_urls

    cfg.data.train_shards = absolute_local(cfg.data.train_shards)  # workers run in other directories
    cfg.data.val_shards = absolute_local(cfg.data.val_shards)
    expand_urls(cfg.data.train_shards)  # a pattern that matches nothing fails here, before Ray starts
    output_dir = cfg.output_dir = os.path.abspath(cfg.output_dir)
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    run_id = None
    if resume_from:
        state = launch.load_state(resume_from)  # fail now on a bad path, not inside a worker
        run_id = state.get("mlflow_run_id")
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        f.write(cfg.to_yaml())
    name = cfg.mlflow.run_name or os.path.basename(output_dir.rstrip("/"))
    storage = launch.storage_uri(cfg.ray.storage_path or os.path.join(output_dir, "ray"))
    print(f"[pretrain] outputs: {output_dir}  checkpoints: {storage}/{name}  mlflow: {tracking.redact(uri)}",
          flush=True)

    started = launch.init_ray(cfg.ray.address, verbose=verbose)
    try:
        launch.check_resources(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu)
        if run_id is None:
            run_id = tracking.start_run(uri, cfg.mlflow.experiment, name, tracking.params_from_config(cfg.flatten()),
                                        tracking.run_tags(), parent_run_id=parent_run_id)
        loop_config = {"config": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id,
                       "output_dir": output_dir, "resume_from": resume_from, "faults": faults.from_env(),
                       "verbose": verbose}
        spec = launch.TrainerSpec(name=name, storage_path=storage, num_workers=cfg.ray.num_workers,
                                  use_gpu=cfg.ray.use_gpu, cpus_per_worker=cfg.ray.cpus_per_worker,
                                  max_failures=cfg.ray.failure_max_retries, verbose=verbose)
        start = time.time()
        try:
            result = launch.run_trainer(train_loop, loop_config, spec)
        except Exception as e:
            tracking.end_run(uri, run_id, "FAILED")
            raise UserError(f"pre-training failed: {_worker_error(e)}") from None
        summary = _finish(cfg, result, uri, run_id, output_dir, time.time() - start)
    finally:
        if started:
            import ray

            ray.shutdown()
    return summary


def absolute_local(spec: str) -> str:
    """A local relative shard path made absolute; URLs, ``pipe:`` commands and empty values unchanged."""
    if not spec or "://" in spec or spec.startswith("pipe:") or os.path.isabs(spec):
        return spec
    return os.path.abspath(spec)


def _finish(cfg: Config, result, uri: str, run_id: str, output_dir: str, wall_s: float) -> dict[str, Any]:
    from mae_ray import tracking

    ckpt = result.checkpoint
    if ckpt is None:
        raise UserError("pre-training finished without a checkpoint (ray.num_workers=0 runs keep none)")
    logger = tracking.EpochLogger(uri, run_id)
    with ckpt.as_directory() as path:
        for name in ("config.yaml", "encoder.pth", "encoder.safetensors", "state.pt"):
            logger.log_artifact(os.path.join(path, name), "checkpoint" if name == "state.pt" else "encoder")
    tracking.end_run(uri, run_id, "FINISHED")
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    summary = {
        "checkpoint": ckpt.path,
        "encoder": os.path.join(ckpt.path, "encoder.pth"),
        "encoder_safetensors": os.path.join(ckpt.path, "encoder.safetensors"),
        "mlflow_run_id": run_id,
        "mlflow_tracking_uri": tracking.redact(uri),
        "metrics": metrics,
        "wall_time_s": round(wall_s, 1),
    }
    tmp = os.path.join(output_dir, "result.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(output_dir, "result.json"))
    return summary


def _worker_error(e: BaseException) -> str:
    """The first line of the underlying worker exception (not Ray's wrapper text)."""
    failures = getattr(e, "worker_failures", None) or {}
    inner = next(iter(failures.values()), None) or getattr(e, "controller_failure", None) or e
    lines = [ln for ln in str(inner).splitlines() if ln.strip()]
    for ln in reversed(lines):  # Ray puts the remote traceback first and the exception line last
        if "Error" in ln and ":" in ln:
            return ln.strip()
    return lines[-1].strip() if lines else type(inner).__name__


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("mae-ray pretrain", "MAE pre-training on Ray Train")
    parser.add_argument("--resume-from", help="checkpoint directory (or state.pt) of a stopped run to continue")
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)

    def job() -> int:
        cfg = load_config(args.config, args.overrides)
        summary = run(cfg, resume_from=args.resume_from, verbose=args.verbose)
        m = summary["metrics"]
        print(f"[pretrain] done: {m.get('epoch', -1) + 1} epochs, final loss {m.get('train_loss', float('nan')):.4f}, "
              f"{summary['wall_time_s']}s; result: {os.path.join(os.path.abspath(cfg.output_dir), 'result.json')}; "
              f"mlflow run {summary['mlflow_run_id']}", flush=True)
        return 0

    return guarded(job)


if __name__ == "__main__":
    sys.exit(main())
