"""MAE pre-training as a Ray Train job: ``python -m mae_ray pretrain --config FILE [--set KEY=VALUE ...]``.

Driver: validate config and data paths, create the MLflow run, start or join Ray, run the workers,
log the final artifacts, write ``result.json``. Worker (``train_loop``): build model and loader,
resume from the newest checkpoint, train epochs, report metrics + checkpoints, log to MLflow (rank 0).
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
import torch.distributed as dist

from mae_ray import tracking
from mae_ray.cluster import checkpoints, launch
from mae_ray.cluster.worker_loop import EpochLoop
from mae_ray.cluster.worker_spec import WorkerSpec
from mae_ray.config import Config
from mae_ray.data.device_decode import pretrain_batch
from mae_ray.data.loader import epoch_batches, make_eval_loader, make_train_loader
from mae_ray.data.shards import expand_urls
from mae_ray.data.transforms import build_transform, eval_transform, normalize_batch
from mae_ray.errors import DataError
from mae_ray.jobs import lifecycle
from mae_ray.model.flops import peak_flops, train_flops_per_image
from mae_ray.model.mae import MaskedAutoencoderViT
from mae_ray.model.pca import fit_pca
from mae_ray.model.visualize import fixed_noise, reconstruct, save_reconstruction_grid
from mae_ray.model.weights import save_encoder
from mae_ray.train import engine, optim, recipe
from mae_ray.train.knn import KnnMonitor


# --------------------------------------------------------------------------- worker
def train_loop(spec: WorkerSpec) -> None:
    """Runs on every Ray Train worker (or in-process with ray.num_workers=0)."""
    cfg = spec.config
    rank, world_size = launch.enter_worker(spec)
    device = launch.device()
    if device.type == "cuda":
        engine.configure_cuda()
    else:
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed + rank)

    config_text = tracking.redact(cfg.to_yaml())  # saved in checkpoints, which go to MLflow as artifacts
    model = MaskedAutoencoderViT(**cfg.model.kwargs())
    # uint8 batches through the DataLoader (4x fewer bytes in shared memory and to the GPU), normalised
    # on the device in on_device below: 1.5x the loader's images/s here (docs/performance.md)
    size, on_gpu = model.patch_embed.img_size[0], cfg.data.decode == "gpu"
    if on_gpu and device.type != "cuda":
        raise DataError(f"data.decode=gpu: this worker has no CUDA device (it runs on {device})")
    # the epoch as the configured group takes it; an elastic group's ranks split its updates (StepPlan)
    group = max(1, cfg.ray.num_workers)
    planned = epoch_batches(cfg.data.train_shards, cfg.data.samples_per_epoch, group, cfg.train.batch_size)
    if cfg.train.max_steps_per_epoch is not None:
        planned = min(planned, cfg.train.max_steps_per_epoch)
    batching = recipe.for_job(cfg, "pretrain")
    plan = engine.StepPlan(planned, batching.accum_iter, cfg.train.epochs, cfg.train.warmup_epochs, workers=group,
                           live=world_size, rank=rank)
    loader = make_train_loader(
        cfg.data.train_shards, batch_size=cfg.train.batch_size,
        transform=build_transform("pretrain", size, normalize=False, augment=cfg.train.augment),
        rank=rank, world_size=world_size, num_workers=cfg.data.num_workers, batches=plan.rank_batches,
        seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        pin_memory=device.type == "cuda" and not on_gpu, raw=on_gpu,
    )
    lr = cfg.train.lr if cfg.train.lr is not None else batching.lr(cfg.train.blr)
    optimizer = optim.pretrain_optimizer(model.to(device), lr, cfg.train.weight_decay, device)
    scheduler = optim.build_scheduler(optimizer, plan, cfg.train.min_lr)
    precision = engine.Precision(cfg.train.amp, device)

    loop = EpochLoop("pretrain", spec, epochs=cfg.train.epochs, checkpoint_every=cfg.train.checkpoint_every,
                     stateful={"model": model, "optimizer": optimizer, "scheduler": scheduler,
                               "scaler": precision.scaler},
                     seed=cfg.train.seed, plan=plan, extra_state={"config": config_text})
    raw_model = model
    _pca_target(cfg, raw_model, loop)  # before DDP: every replica starts with the same basis
    model = launch.prepare_model(model)  # DDP over NCCL (GPU) or Gloo (CPU); no-op for 1 worker
    if cfg.train.compile:
        model = torch.compile(model)
    loop.say(f"{loop.describe_group(batching)}, {plan.rank_batches} batches/epoch, lr {lr:.3g}; "
             f"{loop.describe_start()}")
    pictures = _Pictures(cfg, raw_model, spec.output_dir) if rank == 0 else None
    monitor = KnnMonitor(cfg, rank, world_size, device, raw_model.patch_embed.img_size[0])
    flops_per_image, peak = train_flops_per_image(cfg.model.kwargs(), cfg.model.mask_ratio), peak_flops(device)
    final_files = {
        checkpoints.ENCODER_FILE: lambda p: save_encoder(raw_model, p),
        checkpoints.ENCODER_SAFETENSORS: lambda p: save_encoder(raw_model, p),  # the format from the suffix
        checkpoints.CONFIG_FILE: lambda p: _write_text(p, config_text),
    }

    for epoch in loop.remaining():  # masks seeded per (seed, epoch, rank, micro-batch): exact on resume
        control = loop.begin(epoch, loader)  # from where a checkpoint inside the epoch left off
        device_skips = [0]  # images the device decoder could not read (data.decode=gpu), this epoch
        try:
            batches = loop.batches(loader, epoch, plan.rank_batches)
            metrics = engine.train_one_epoch(
                model, on_device(batches, device, size, on_gpu, device_skips), optimizer,
                scheduler, precision,
                epoch=epoch, plan=plan, mask_ratio=cfg.model.mask_ratio, device=device, control=control,
            )
        except engine.NonFiniteLossError as e:
            raise engine.NonFiniteLossError(f"{e}; last good checkpoint: {loop.last_good or 'none'}") from None
        metrics = _reduce_over_ranks(metrics, loader.skipped + device_skips[0], device)
        if peak:  # model FLOPs utilisation, as nanoGPT prints it (GPU only: CPUs have no fixed peak)
            metrics["mfu"] = metrics["images_per_s"] * flops_per_image / (peak * world_size)
        if monitor.due(epoch):
            metrics["knn_top1"] = monitor.run(raw_model)
        loop.end_epoch(epoch, metrics, final_files)
        if pictures is not None:
            pictures.maybe_log(epoch, epoch == cfg.train.epochs - 1, loop.logger)
    loop.finish()


def _pca_target(cfg: Config, model, loop) -> None:
    """target=pca: the basis, fitted by rank 0 and broadcast to every rank. A resumed run keeps its
    checkpoint's basis: the decoder learned to predict coefficients in that one."""
    if model.target != "pca":
        return
    if loop.resumed:
        loop.say("PCA target: the checkpoint's basis (not refitted)")
        return
    if loop.rank == 0:
        fit = fit_pca_basis(cfg, model)
        model.pca_mean.copy_(fit.mean)
        model.pca_basis.copy_(fit.basis)
        (p, k), n = model.pca_basis.shape, fit.patches // model.patch_embed.num_patches
        about = f"{k} of {p} components, {fit.explained:.1%} of the variance of {fit.patches} patches of {n} images"
        loop.say(f"PCA target: {about} (seed {cfg.train.seed})")
        loop.logger.set_tags({"mae_ray.pca_target": about})
    if dist.is_available() and dist.is_initialized():
        for buffer in (model.pca_mean, model.pca_basis):
            dist.broadcast(buffer, src=0)


def fit_pca_basis(cfg: Config, model):
    """The PCA of ``model.pca_fit_images`` training images' patches (``model/pca.PcaFit``), the same bits for
    the same ``train.seed``: the shards in an order drawn from it, each image as pre-training sees it
    (train.augment's crop, normalised) with the crops drawn from it, read in this process by the exact-once
    loader. The run's own RNG is left as it was."""
    urls = expand_urls(cfg.data.train_shards)
    random.Random(f"mae-ray/pca/{cfg.train.seed}").shuffle(urls)
    size = model.patch_embed.img_size[0]
    loader = make_eval_loader(urls, batch_size=64, img_size=size, num_workers=0,
                              transform=build_transform("pretrain", size, augment=cfg.train.augment))

    def patches():  # [B, L, p*p*3] batches, cfg.model.pca_fit_images images in all
        left = cfg.model.pca_fit_images
        for imgs, _ in loader:
            yield model.patchify(imgs[:left])
            left -= min(left, imgs.shape[0])
            if not left:
                return

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        return fit_pca(patches(), model.pca_basis.shape[1])


def on_device(batches, device, img_size: int = 0, decode: bool = False, skips: list[int] | None = None):
    """uint8 image batches -> float32 normalised on ``device`` (where the model runs); with ``decode``, batches
    of encoded JPEGs decoded and cropped there (``data.decode=gpu``), undecodable ones counted in ``skips``."""
    for imgs, labels in batches:
        if decode:
            yield pretrain_batch(imgs, device, img_size, skips), labels
        else:
            yield normalize_batch(imgs.to(device, non_blocking=True)), labels


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _reduce_over_ranks(metrics: dict[str, float], skipped: int, device) -> dict[str, float]:
    """Loss and data-wait fraction averaged, throughput and skipped samples summed over ranks (the whole job)."""
    values = torch.tensor([metrics["train_loss"], metrics["images_per_s"], float(skipped),
                           metrics["data_wait_frac"]], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values[0] /= dist.get_world_size()
        values[3] /= dist.get_world_size()
    out = dict(metrics)
    out.update(train_loss=values[0].item(), images_per_s=values[1].item(), data_wait_frac=values[3].item())
    out["data/skipped"] = values[2].item()
    out.pop("batches", None)
    return out


class _Pictures:
    """Rank 0's reconstruction grids of fixed validation images under a fixed mask."""

    def __init__(self, cfg: Config, model, output_dir: str, count: int = 8):
        self.cfg, self.model, self.count = cfg, model, count
        self.every = cfg.train.visualize_every
        self.out_dir = os.path.join(output_dir, "reconstructions")
        self.images = None

    def _load(self):
        shards = self.cfg.data.val_shards or self.cfg.data.train_shards
        size = self.model.patch_embed.img_size[0]
        loader = make_eval_loader(shards, batch_size=self.count, transform=eval_transform(self.cfg.data, size),
                                  img_size=size, num_workers=0)
        self.images = next(iter(loader))[0][: self.count]
        self.noise = fixed_noise(self.images.shape[0], self.model.patch_embed.num_patches)

    def maybe_log(self, epoch: int, last: bool, logger) -> None:
        if not (last or (self.every and (epoch + 1) % self.every == 0)):
            return

        if self.images is None:
            self._load()
        pics = reconstruct(self.model, self.images, self.cfg.model.mask_ratio, self.noise)
        path = os.path.join(self.out_dir, f"epoch_{epoch + 1:04d}.png")
        save_reconstruction_grid(pics, path, title=f"epoch {epoch + 1}, mask ratio {self.cfg.model.mask_ratio}")
        logger.log_artifact(path, "reconstructions")


# --------------------------------------------------------------------------- driver
def run(cfg: Config, *, resume_from: str | None = None, verbose: bool = False, parent_run_id: str | None = None,
        continue_existing: bool = False, run_id: str | None = None, callbacks: list | None = None) -> dict[str, Any]:
    """Pre-train with ``cfg`` and return what result.json holds. Raises UserError for user mistakes.

    The steps and their order are ``lifecycle.run_job``'s (see there for ``resume_from``, ``continue_existing``,
    ``run_id``, ``callbacks``); ``parent_run_id``: the MLflow run this one is a child of.
    """
    name = cfg.mlflow.run_name or os.path.basename(os.path.abspath(cfg.output_dir).rstrip("/"))

    def setup(cfg: Config, uri: str) -> lifecycle.Setup:
        where = lifecycle.storage_for(cfg, name)
        return lifecycle.Setup(f"[pretrain] outputs: {cfg.output_dir}  checkpoints: {where}  "
                               f"mlflow: {tracking.redact(uri)}", parent_run_id=parent_run_id)

    def summarize(result, run_id: str, uri: str, _setup):
        ckpt = result.checkpoint
        checkpoints.log_final_to_mlflow(ckpt, tracking.EpochLogger(uri, run_id))
        where = checkpoints.location(ckpt)  # s3://... for a bucket, as --resume-from and eval.checkpoint take it
        return {**checkpoints.final_paths(where), "mlflow_tracking_uri": tracking.redact(uri),
                "metrics": lifecycle.numeric(result.metrics)}, {}

    plan = lifecycle.JobPlan("pretrain", "pre-training", train_loop, name, setup, summarize)
    return lifecycle.run_job(cfg, plan, verbose=verbose, resume_from=resume_from, continue_existing=continue_existing,
                          run_id=run_id, callbacks=callbacks)
