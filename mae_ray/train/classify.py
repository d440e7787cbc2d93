"""Classification math shared by linear probing and fine-tuning: one training epoch, exact scoring; and the
plain logistic regression the linear-probe job is held to (docs/results.md).

Knows nothing of Ray or MLflow. ``score`` counts every validation sample exactly once across
ranks (the exact-once eval loader gives each rank its own samples; only the final counts are summed),
so the distributed accuracy equals the single-process one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mae_ray.errors import DataError
from mae_ray.train.engine import EpochControl, Precision, StepPlan, run_epoch


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
    control: EpochControl | None = None,
) -> dict[str, float]:
    """One classification epoch (``engine.run_epoch``: accumulation, per-update lr, DDP ``no_sync``) of
    ``criterion(forward(x), y)``, after ``mixup`` when given."""

    def loss_of(batch) -> tuple[torch.Tensor, int]:
        x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y)
        with precision.autocast():
            return criterion(forward(x), y), x.shape[0]

    metrics = run_epoch(loss_of, loader, optimizer, scheduler, precision, epoch=epoch, plan=plan, no_sync=no_sync,
                        control=control)
    return {k: metrics[k] for k in ("train_loss", "lr", "images_per_s", "data_wait_frac")}


@torch.no_grad()
def score(forward: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device) -> dict[str, float]:
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


def plain_probe_top1(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                     num_classes: int, steps: int = 1000) -> float:
    """Val top-1 (%) of a plain logistic regression on (features, labels) pairs: features standardised with
    the training set's statistics, one linear layer trained full-batch with AdamW (lr 1e-2, weight decay
    1e-4, seed 0; its val accuracy settles by 300-1000 steps). No BatchNorm, LARS, schedule or batches:
    what the linear-probe job's recipe should reach on the same features (issue 14)."""
    (xtr, ytr), (xva, yva) = train, val
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    with torch.random.fork_rng(devices=[]):  # seed 0 without touching the caller's generator
        torch.manual_seed(0)
        head = torch.nn.Linear(xtr.shape[1], num_classes, device=xtr.device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(xtr), ytr).backward()
            opt.step()
    with torch.no_grad():
        return (head(xva).argmax(1) == yva).float().mean().item() * 100
