"""Every job's optimiser and schedule, as the paper's appendix gives them (../shared/reference/mae-paper.md).

| job | optimiser | weight decay | lr |
|---|---|---|---|
| pre-training (A.1) | AdamW (0.9, 0.95) | on weights, not on biases and norms | blr x effective / 256 |
| fine-tuning (A.2) | AdamW (0.9, 0.999) | the same, with layer-wise lr decay | blr x effective / 256 |
| linear probe (A.3) | LARS, momentum 0.9, trust ratio on the weight | 0 by default | blr x effective / 256 |

Each schedule: linear warmup from 0, then half-cosine to ``min_lr``, stepped once per optimiser update.
The lr rule itself (effective batch) is ``recipe``'s; this module gets the lr it computed.
Knows nothing of Ray or MLflow.
"""

from __future__ import annotations

import torch
from timm.optim import Lars, param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler


def pretrain_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device):
    """AdamW (0.9, 0.95); no decay on biases and norm weights (timm's grouping); fused (:func:`fused`)."""
    groups = param_groups_weight_decay(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused(device))


def finetune_optimizer(vit, lr: float, weight_decay: float, layer_decay: float, device: torch.device):
    """AdamW (0.9, 0.999) over timm's layer-decay groups: block i of L gets lr x layer_decay^(L + 1 - i)
    (``lr_scale``, applied by the scheduler); no decay on biases, norms, position table and cls token."""
    groups = param_groups_layer_decay(vit, weight_decay, no_weight_decay_list=vit.no_weight_decay(),
                                      layer_decay=layer_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused(device))


def fused(device: torch.device) -> bool:
    """AdamW's fused kernel on CUDA and on CPU: one pass over all parameters, not a loop of small ops per tensor
    (the quickstart's ViT: the optimiser's share of an update on one core 18 -> 5 ms,
    experiments/benchmarks/fused_adamw.py)."""
    return device.type in ("cuda", "cpu")


def linprobe_optimizer(fc: torch.nn.Linear, lr: float, weight_decay: float):
    """LARS (momentum 0.9) on the probe's linear layer; the trust ratio on the weight only, as released."""
    groups = [{"params": [fc.weight], "always_adapt": True}, {"params": [fc.bias]}]
    return Lars(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, plan, min_lr: float) -> CosineLRScheduler:
    """Linear warmup from 0, then half-cosine to ``min_lr``; stepped once per optimiser update
    (``plan``: an ``engine.StepPlan``). Each param group's ``lr_scale`` (layer decay) is applied."""
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, plan.total_updates - plan.warmup_updates),
        lr_min=min_lr,
        warmup_t=plan.warmup_updates,
        warmup_lr_init=0.0,
        warmup_prefix=True,  # the cosine starts where warmup ends, as in the release
        t_in_epochs=False,
    )
