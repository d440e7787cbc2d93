"""Linear probing on Ray Train: ``python -m mae_ray linprobe --config FILE [--set eval.checkpoint=...]``.

The paper's protocol: frozen encoder, cls-token features (``linprobe.pool=mean`` averages the patch
tokens instead), BatchNorm1d without affine (eps 1e-6) then a linear layer (init std 0.01), LARS
(momentum 0.9, no weight decay), lr = blr * batch / 256 with warmup + cosine, RandomResizedCrop + flip.

``linprobe.cache_features=true`` extracts features once from un-augmented images (the eval
transform) and trains the head on those: much faster, the path sweeps use, but not the paper's
protocol (no augmentation of the probe's inputs), so its numbers run a little lower or higher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mae_ray.cluster import checkpoints, launch
from mae_ray.cluster.worker_loop import EpochLoop
from mae_ray.cluster.worker_spec import WorkerSpec
from mae_ray.config import Config
from mae_ray.data.loader import epoch_batches, make_eval_loader, make_train_loader
from mae_ray.data.transforms import build_transform, eval_transform, normalize_batch
from mae_ray.errors import DataError
from mae_ray.jobs.eval_job import run_eval
from mae_ray.model.weights import build_mae
from mae_ray.train import classify, engine, optim, recipe
from mae_ray.train.knn import extract_features
from mae_ray.train.ranks import all_gather_rows


class LinearProbeHead(nn.Module):
    """BatchNorm1d(affine=False) + Linear, as in the release's main_linprobe.py.

    One change: the BN's running statistics are the cumulative average over every training batch
    (``momentum=None``), not an exponential average of the last few dozen. The encoder is frozen, so the
    features' statistics never change and the cumulative average is their exact estimate; the release's
    0.1 momentum tracks the last ~20 batches, whose noise moved the probe's validation accuracy by up to
    3 points from one epoch to the next after its lr had decayed to ~0 (small data, batches of 64).
    Training uses batch statistics either way: the head learns the same.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(x))


def pooled(encoder, x: torch.Tensor, pool: str) -> torch.Tensor:
    tokens = encoder.forward_features(x)  # [N, 1 + L, D], no grad
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


class CachedFeatures:
    """Training batches drawn from features held in memory: every rank the same number per epoch."""

    def __init__(self, feats: torch.Tensor, labels: torch.Tensor, batch_size: int, rank: int, world: int, seed: int,
                 batches: int | None = None):
        """``batches``: this rank's per epoch (an elastic group's share, ``StepPlan.rank_batches``); by default
        :meth:`planned` for ``world`` ranks."""
        self.feats, self.labels, self.batch_size = feats, labels, batch_size
        self.rank, self.world, self.seed, self.epoch, self.start = rank, world, seed, 0, 0
        self.batches = self.planned(feats.shape[0], world, batch_size) if batches is None else batches

    @staticmethod
    def planned(rows: int, world: int, batch_size: int) -> int:
        return max(1, rows // (world * batch_size))

    def set_epoch(self, epoch: int, start: int = 0, positions: list[int] | None = None) -> None:
        """The epoch's order, from its batch ``start`` on (``TrainLoader.set_epoch``'s; ``positions`` unused)."""
        self.epoch, self.start = epoch, start

    @property
    def positions(self) -> list[int]:
        return []

    def __len__(self) -> int:
        return self.batches

    def __iter__(self):
        order = torch.randperm(self.feats.shape[0], generator=torch.Generator().manual_seed(self.seed + self.epoch))
        mine = order[self.rank :: self.world].to(self.feats.device)
        start, self.start = self.start, 0  # a start holds for one iteration
        for i in range(start, len(self)):
            idx = mine[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.feats[idx], self.labels[idx]


def probe_forwards(encoder, head, ddp_head, pool: str, precision, *, cached: bool, normalize):
    """The probe's (training, evaluation) forward passes, both under the job's autocast.

    Training runs inside ``precision.autocast()`` (``classify.train_epoch``); evaluation is wrapped in the same
    here, so the frozen encoder's features - and so what the BatchNorm's running statistics are and what they
    are applied to - come from one precision: bf16 features in training and fp32 ones in evaluation would
    shift the normalised inputs of the very head being measured. Cached features are the encoder's output
    already (``extract_features``, the same for both splits). Training batches arrive as uint8
    (``normalize``d on the device); evaluation batches are normalised by the eval transform.
    """
    def train_forward(x):  # called under precision.autocast() by classify.train_epoch
        return ddp_head(x if cached else pooled(encoder, normalize(x), pool))

    def eval_forward(x):
        with precision.autocast():
            return head(x if cached else pooled(encoder, x, pool))

    return train_forward, eval_forward


def train_loop(spec: WorkerSpec) -> None:
    cfg = spec.config
    lp, settings = cfg.linprobe, cfg.run_settings("linprobe")
    rank, world = launch.enter_worker(spec)
    group = max(1, cfg.ray.num_workers)  # the configured group the epoch is planned for
    device = launch.device()
    if device.type != "cuda":  # as a Ray worker has (OMP_NUM_THREADS), also in-process: the same bits
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(settings.seed)
    encoder = build_mae(spec.model_kwargs, spec.encoder_state(), settings.seed).to(device).eval().requires_grad_(False)
    img_size = encoder.patch_embed.img_size[0]
    classes = spec.num_classes
    head = LinearProbeHead(encoder.cls_token.shape[-1], classes).to(device)
    val_kw = dict(batch_size=256, transform=eval_transform(cfg.data, img_size), img_size=img_size, rank=rank,
                  world_size=world, num_workers=cfg.data.num_workers, num_classes=classes)
    val_loader = make_eval_loader(cfg.data.val_shards, **val_kw)
    if lp.cache_features:  # features once, no augmentation; the train set gathered on every rank
        tr = make_eval_loader(cfg.data.train_shards, **{**val_kw, "batch_size": 256})
        feats, labels = extract_features(encoder, tr, device, pool=lp.pool)
        feats, labels = all_gather_rows(feats), all_gather_rows(labels)
        if feats.shape[0] == 0:  # the same on every rank (gathered)
            raise DataError(f"no readable training samples in {cfg.data.train_shards}")
        planned = CachedFeatures.planned(feats.shape[0], group, lp.batch_size)
        vf, vy = extract_features(encoder, val_loader, device, pool=lp.pool)  # this rank's exact share
        val_loader = [(vf[i : i + 256], vy[i : i + 256]) for i in range(0, vf.shape[0], 256)]
    else:
        planned = epoch_batches(cfg.data.train_shards, cfg.data.samples_per_epoch, group, lp.batch_size)
    batching = recipe.for_job(cfg, "linprobe")  # the configured group's; an elastic group splits its updates
    plan = engine.StepPlan(planned, batching.accum_iter, lp.epochs, lp.warmup_epochs, workers=group, live=world,
                           rank=rank)
    if lp.cache_features:
        loader = CachedFeatures(feats, labels, lp.batch_size, rank, world, settings.seed, plan.rank_batches)
    else:
        loader = make_train_loader(cfg.data.train_shards, batch_size=lp.batch_size,  # uint8: normalised below
                                   transform=build_transform("linprobe", img_size, normalize=False),
                                   rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                                   batches=plan.rank_batches, seed=settings.seed,
                                   shuffle_buffer=cfg.data.shuffle_buffer, num_classes=classes)
    lr = batching.lr(lp.blr)
    optimizer = optim.linprobe_optimizer(head.fc, lr, lp.weight_decay)
    scheduler = optim.build_scheduler(optimizer, plan, lp.min_lr)
    precision = engine.Precision(settings.amp, device)
    # Cached features: the whole head training takes seconds, but each checkpoint is a Ray report that
    # waits for the controller's 2 s health-check tick; so one checkpoint, at the end.
    every = lp.epochs if lp.cache_features else settings.checkpoint_every
    loop = EpochLoop("linprobe", spec, epochs=lp.epochs, checkpoint_every=every,
                     stateful={"head": head, "optimizer": optimizer, "scheduler": scheduler},
                     seed=settings.seed, plan=plan, report_every_epoch=not lp.cache_features)
    ddp_head = launch.prepare_model(head, move_to_device=False)
    train_forward, eval_forward = probe_forwards(encoder, head, ddp_head, lp.pool, precision,
                                                 cached=lp.cache_features, normalize=normalize_batch)
    loop.say(f"{loop.describe_group(batching)}, {plan.rank_batches} batches/epoch, lr {lr:.3g}, pool {lp.pool}, "
             f"{'cached features' if lp.cache_features else 'augmented images'}; {loop.describe_start()}")
    criterion = nn.CrossEntropyLoss()
    for epoch in loop.remaining():
        control = loop.begin(epoch, loader)
        head.train()
        metrics = classify.train_epoch(train_forward, loader, optimizer, scheduler, precision, criterion,
                                       epoch=epoch, plan=plan, device=device,
                                       no_sync=getattr(ddp_head, "no_sync", None), control=control)
        head.eval()
        scores = classify.score(eval_forward, val_loader, device)
        metrics.update(val_top1=scores["top1"], val_top5=scores["top5"])
        loop.end_epoch(epoch, metrics, {checkpoints.HEAD_FILE: lambda p: torch.save(head.state_dict(), p)})
    loop.finish()


def run(cfg: Config, *, source=None, verbose: bool = False, resume_from: str | None = None) -> dict[str, Any]:
    """Linear-probe the encoder ``cfg.eval.checkpoint`` (or ``source``); returns what result.json holds."""
    return run_eval("linprobe", cfg, train_loop, source=source, verbose=verbose, resume_from=resume_from)
