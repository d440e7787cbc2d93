"""The training math of pre-training: the step plan, mixed precision, accumulation, one epoch.

Knows nothing of Ray or MLflow: the caller hands in a model (maybe DDP-wrapped), a loader and the
device, and gets back the epoch's metrics. The optimiser and schedule are ``optim``'s, the lr rule
``recipe``'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.scheduler import CosineLRScheduler


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training cannot go on from here."""


@dataclass(frozen=True)
class StepPlan:
    """How many loader batches and optimiser updates an epoch has, and the schedule's lengths.

    The recipe's plan is stated for the configured group of ``workers`` ranks: ``batches_per_epoch``
    micro-batches each, an update every ``accum_iter`` of them. The epoch's last update may hold fewer (the
    trailing partial cycle), and is stepped on the gradient of the samples it holds: no batch is computed for
    nothing. An epoch shorter than one whole update is refused: it would change the recipe's effective batch
    (the driver refuses it before Ray starts, ``recipe.check_epoch``; this is the workers' backstop).

    Elastic groups (``ray.min_workers``): the same updates, split over the ``live`` ranks running now. Update
    ``u`` holds ``M_u`` micro-batches over all ranks (``accum_iter x workers``, or fewer for the trailing one);
    rank ``r`` of ``live`` takes ``M_u // live`` of them, plus one when ``r < M_u % live``. Each micro-batch's
    loss is divided by ``M_u / live`` (DDP then averages over the ``live`` ranks), so every update steps on
    the mean gradient of its ``M_u`` micro-batches whatever the group size: the effective batch, the number
    of updates, the lr at every update and the epoch's samples are the configured group's. Ranks that take
    one micro-batch more than others are the only cost of a group size that does not divide ``M_u``.
    """

    batches_per_epoch: int  # per rank of the configured group
    accum_iter: int  # per rank of the configured group
    epochs: int
    warmup_epochs: float
    workers: int = 1  # the configured group (ray.num_workers)
    live: int | None = None  # the group running now (an elastic group's size); None: ``workers``
    rank: int = 0

    def __post_init__(self):
        if self.batches_per_epoch < self.accum_iter:
            raise ValueError(f"an epoch of {self.batches_per_epoch} micro-batch(es) is shorter than one update "
                             f"({self.accum_iter} micro-batches): the optimiser would never step")
        if not 1 <= self.group <= self.workers or not 0 <= self.rank < self.group:
            raise ValueError(f"rank {self.rank} of a live group of {self.group} (configured {self.workers})")

    @property
    def group(self) -> int:
        return self.workers if self.live is None else self.live

    @property
    def updates_per_epoch(self) -> int:
        return -(-self.batches_per_epoch // self.accum_iter)  # a trailing partial cycle is an update too

    def update_size(self, update: int) -> int:
        """Micro-batches of the epoch's update ``update``, over all ranks."""
        full = self.accum_iter * self.workers
        return full if update < self.updates_per_epoch - 1 else self.workers * self.batches_per_epoch - update * full

    def share(self, update: int) -> int:
        """This rank's micro-batches of update ``update``."""
        size = self.update_size(update)
        return size // self.group + (self.rank < size % self.group)

    @property
    def rank_batches(self) -> int:
        """This rank's micro-batches per epoch (``batches_per_epoch`` when the configured group runs)."""
        last = self.updates_per_epoch - 1
        return last * self.share(0) + self.share(last)

    def batches_before(self, update: int) -> int:
        """This rank's micro-batches in the epoch's first ``update`` updates (where a resume at ``update`` starts)."""
        return self.rank_batches if update >= self.updates_per_epoch else update * self.share(0)

    @property
    def accumulation(self) -> float:
        """Micro-batches per rank in a full update, on average over the ranks (the recorded accumulation)."""
        return self.accum_iter * self.workers / self.group

    def update_of(self, batch: int) -> tuple[int, bool]:
        """(the epoch's update that this rank's micro-batch ``batch`` belongs to, whether it is its last)."""
        per_full, last = self.share(0), self.updates_per_epoch - 1
        update = min(batch // per_full, last)
        end = (update + 1) * per_full if update < last else self.rank_batches
        return update, batch + 1 == end

    def loss_divisor(self, update: int) -> float | int:
        """What each micro-batch's loss of update ``update`` is divided by: ``M_u / live`` (an int when it
        divides, so that a fixed group computes exactly what it always did)."""
        size = self.update_size(update)
        return size // self.group if size % self.group == 0 else size / self.group

    def micro_batches_of_update(self, batch: int) -> int | float:
        """The loss divisor of the update that micro-batch ``batch`` of this rank belongs to."""
        return self.loss_divisor(self.update_of(batch)[0])

    @property
    def total_updates(self) -> int:
        return self.updates_per_epoch * self.epochs

    @property
    def warmup_updates(self) -> int:
        return min(int(round(self.warmup_epochs * self.updates_per_epoch)), self.total_updates - 1)


@dataclass
class Progress:
    """Where an epoch stands on this rank: the updates done, and the sums its loss is the mean of."""

    updates: int = 0
    loss_sum: float = 0.0
    seen: int | float = 0


@dataclass
class EpochControl:
    """How the loop that owns the epochs (``cluster.worker_loop.EpochLoop``) steers :func:`run_epoch`: where
    the epoch starts (a checkpoint taken inside it), the seeding of every micro-batch, and a call after every
    update (which may take a checkpoint there)."""

    start: Progress = dataclasses.field(default_factory=Progress)
    reseed: Callable[[int], None] | None = None  # micro-batch index -> seed every RNG for it
    after_update: Callable[[Progress], None] | None = None


class Precision:
    """Autocast + loss scaling for the chosen ``amp`` mode; full precision on CPU."""

    def __init__(self, amp: str, device: torch.device):
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp) if device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def configure_cuda() -> None:
    """TF32 matmuls and convolutions: free speed on Ampere and newer, harmless in MAE's numerics."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def run_epoch(
    loss_of: Callable[[Any], tuple[torch.Tensor, int]],
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler: CosineLRScheduler,
    precision: Precision,
    *,
    epoch: int,
    plan: StepPlan,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    control: EpochControl | None = None,
) -> dict[str, float]:
    """The update loop every training job shares: ``plan.rank_batches`` micro-batches, the optimiser
    stepping after the last of each update's (``plan.update_of``), the lr set per update from ``scheduler``.

    ``loss_of(batch)`` -> (the micro-batch's mean loss, its sample count), computed under autocast by the
    caller. Each loss is divided by its update's micro-batch count, so k micro-batches of b give the gradient
    of one batch of k*b; the epoch's trailing partial cycle of m < k micro-batches steps on the mean over its
    m*b samples (the loaders' micro-batches are all of ``batch_size``). ``no_sync`` (a DDP module's) skips the
    gradient all-reduce on all but the last micro-batch of an update. A NaN/inf loss raises
    NonFiniteLossError naming where; a loader that ends early raises rather than drop an update's gradients.

    ``control``: the epoch starts after ``control.start.updates`` updates (the loader then yields the rest of
    the epoch); every RNG is seeded for micro-batch i before its batch is fetched (``control.reseed``), so what
    it draws - in-process augmentations, device crops, masks, drop path, mixup - is the same whichever update
    the epoch started at; ``control.after_update`` is called after every optimiser step.
    """
    control = control or EpochControl()
    progress = dataclasses.replace(control.start)
    seen_now, batches, waited = 0, 0, 0.0
    start = ready = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    first, total = plan.batches_before(progress.updates), plan.rank_batches
    batches_in = iter(loader)
    for i in range(first, total):
        if control.reseed is not None:
            control.reseed(i)
        batch = next(batches_in, None)
        waited += time.perf_counter() - ready  # the loader's share: the step before has finished (loss.item())
        if batch is None:
            break
        in_epoch, boundary = plan.update_of(i)
        update = epoch * plan.updates_per_epoch + in_epoch
        if i == first or plan.update_of(i - 1)[1]:  # the update's first micro-batch on this rank
            scheduler.step_update(update)
        with contextlib.nullcontext() if boundary or no_sync is None else no_sync():
            loss, count = loss_of(batch)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(f"non-finite loss ({value}) at epoch {epoch}, batch {i}, update {update}")
            precision.scaler.scale(loss / plan.loss_divisor(in_epoch)).backward()
        progress.loss_sum += value * count
        progress.seen += count
        seen_now += count
        batches += 1
        if boundary:
            precision.scaler.step(optimizer)
            precision.scaler.update()
            optimizer.zero_grad(set_to_none=True)
            progress.updates = in_epoch + 1
            if control.after_update is not None:
                control.after_update(progress)
        if on_step is not None:
            on_step(i, value)
        ready = time.perf_counter()
    if first + batches < total and batches and not plan.update_of(first + batches - 1)[1]:
        raise RuntimeError(f"the loader ended after {first + batches} of the epoch's {total} batches, in "
                           "the middle of an update: its gradients would be dropped")
    elapsed = time.perf_counter() - start
    return {"train_loss": progress.loss_sum / max(1, progress.seen),
            "lr": max(g["lr"] for g in optimizer.param_groups),
            "images_per_s": seen_now / max(elapsed, 1e-9), "epoch_time_s": elapsed, "batches": batches,
            # time spent waiting for batches: near 1, the data path (not the model) sets the speed
            "data_wait_frac": waited / max(elapsed, 1e-9)}


def train_one_epoch(model: torch.nn.Module, loader, optimizer, scheduler, precision: Precision, *,
                    mask_ratio: float, device: torch.device, **loop) -> dict[str, float]:
    """One pre-training epoch (:func:`run_epoch`): MAE's reconstruction loss of each batch of images.
    ``loop``: :func:`run_epoch`'s keywords (epoch, plan, on_step, control), passed through."""
    model.train()

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        imgs = batch[0].to(device, non_blocking=True)
        with precision.autocast():
            loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        return loss, imgs.shape[0]

    no_sync = getattr(model, "no_sync", None)  # DDP's: no gradient all-reduce on an update's first micro-batches
    metrics = run_epoch(loss_of, loader, optimizer, scheduler, precision, no_sync=no_sync, **loop)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return metrics


def seed_everything(seed: int, epoch: int, rank: int, batch: int | None = None) -> None:
    """Seed every RNG of this process (python, numpy, torch, CUDA) from ``(seed, epoch, rank)``, and with
    ``batch`` from that micro-batch's index too.

    ``EpochLoop`` seeds at the start of every epoch and :func:`run_epoch` before every micro-batch, so what a
    micro-batch draws (masks, drop path, mixup) depends on nothing that happened before it: a run resumed at
    any update draws exactly what the uninterrupted run drew there, on every rank, with no RNG state to carry
    in the checkpoint. Loader worker processes seed each sample's augmentations from its place in their own
    stream (``data.loader._TrainStream``).
    """
    text = f"mae-ray/{seed}/{epoch}/{rank}" + ("" if batch is None else f"/{batch}")
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % 2**63
    random.seed(value)
    np.random.seed(value % 2**32)
    # not torch.manual_seed: before CUDA is initialised (a CPU run) it queues a lazy CUDA seeding, with a formatted
    # stack, per call (~0.2 ms, and a list that grows by one per micro-batch)
    torch.default_generator.manual_seed(value)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(value)


def param_fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """One int64 per parameter: the sum of its values' bit patterns, so any bit that differs shows.

    Computed where the parameters are (no copy to the host); ranks compare these to prove that
    data-parallel training kept every replica identical.
    """
    sums = []
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        bits = flat.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
        sums.append(bits.to(torch.int64).sum())
    return torch.stack(sums)
