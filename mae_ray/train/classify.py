"""Classification math shared by linear probing and fine-tuning: one training epoch, exact evaluation.

Knows nothing of Ray or MLflow. ``evaluate`` counts every validation sample exactly once across
ranks (the exact-once eval loader gives each rank its own samples; only the final counts are summed),
so the distributed accuracy equals the single-process one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from mae_ray.errors import DataError
from mae_ray.train.engine import NonFiniteLossError, Precision, StepPlan


def train_epoch(
    forward: Callable[[torch.Tensor], torch.Tensor],
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    precision: Precision,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epoch: int,
    plan: StepPlan,
    device: torch.device,
    mixup: Callable | None = None,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> dict[str, float]:
    """``plan.batches_per_epoch`` micro-batches of ``criterion(forward(x), y)``; the optimiser steps every
    ``plan.accum_iter`` of them, per-update lr from ``scheduler``.

    As in pre-training (``engine.train_one_epoch``), each micro-batch's loss is divided by ``accum_iter``, so
    k micro-batches of b give the gradient of one batch of k*b; ``no_sync`` (the DDP module's) skips the
    gradient all-reduce on all but the last micro-batch of each update.
    """
    accum = plan.accum_iter
    loss_sum, seen = 0.0, 0
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(loader):
        if i >= plan.batches_per_epoch:
            break
        if i % accum == 0:
            scheduler.step_update(epoch * plan.updates_per_epoch + i // accum)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        boundary = (i + 1) % accum == 0
        with contextlib.nullcontext() if boundary or no_sync is None else no_sync():
            with precision.autocast():
                loss = criterion(forward(x), y)
            value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteLossError(f"non-finite loss ({value}) at epoch {epoch}, batch {i}")
            precision.scaler.scale(loss / accum).backward()
        if boundary:
            precision.scaler.step(optimizer)
            precision.scaler.update()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += value * x.shape[0]
        seen += x.shape[0]
    elapsed = time.perf_counter() - start
    return {"train_loss": loss_sum / max(seen, 1), "lr": max(g["lr"] for g in optimizer.param_groups),
            "images_per_s": seen / max(elapsed, 1e-9)}


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 (percent) and the sample count over the whole validation set, all ranks together.

    A validation set with no readable sample raises DataError rather than scoring 0 %.
    """
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # correct@1, correct@5, total
    for x, y in loader:
        logits = forward(x.to(device, non_blocking=True)).float()
        y = y.to(device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y.unsqueeze(1)
        counts += torch.tensor([hit[:, :1].any(1).sum().item(), hit.any(1).sum().item(), y.numel()],
                               dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    c1, c5, total = counts.tolist()
    if total == 0:  # every rank sees the summed count, so all of them raise: no hang
        raise DataError("no readable validation samples: every one was skipped as unreadable (see data/skipped)")
    return {"top1": 100.0 * c1 / max(total, 1), "top5": 100.0 * c5 / max(total, 1), "count": total}
