"""End-to-end fine-tuning on Ray Train: ``python -m mae_ray finetune --config FILE [--set eval.checkpoint=...]``.

The release's recipe: timm ``VisionTransformer`` with global average pooling + fc_norm, initialised
from the MAE encoder; layer-wise lr decay (timm's param groups), drop path, mixup/cutmix with label
smoothing (timm ``Mixup`` + soft-target loss), RandAugment and random erasing (timm
``create_transform``), AdamW (0.9, 0.999), warmup + cosine, evaluation every epoch.
``finetune.trainable_blocks=k`` trains only the last k blocks and the head (the paper's Figure 9;
0 = the head alone); ``finetune.head_norm=batch`` normalises the pooled feature as the linear probe does.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from mae_ray.cluster import checkpoints, launch
from mae_ray.cluster.worker_loop import EpochLoop
from mae_ray.cluster.worker_spec import WorkerSpec
from mae_ray.config import Config
from mae_ray.data.loader import epoch_batches, make_eval_loader, make_train_loader
from mae_ray.data.transforms import eval_transform
from mae_ray.errors import CheckpointError
from mae_ray.jobs.eval_job import run_eval
from mae_ray.model.weights import build_mae, encoder_state_dict, timm_vit_kwargs
from mae_ray.train import classify, engine, optim, recipe

# A global-pool ViT has fc_norm instead of the encoder's final norm, and a new head.
EXPECTED_MISSING = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
EXPECTED_UNUSED = {"norm.weight", "norm.bias"}


def build_classifier(encoder, num_classes: int, drop_path: float, head_norm: str = "layer"):
    """timm ViT (global pool) with the MAE encoder's weights; the head as the release initialises it.
    ``head_norm="batch"``: fc_norm is a BatchNorm without affine (the linear probe's), which removes the part of
    the pooled feature every image shares; a LayerNorm per image keeps it (docs/results.md: on small data MAE's
    pre-training makes that part ~90 % of the feature, and a short fine-tuning spends itself working around it)."""
    kwargs = {**timm_vit_kwargs(encoder), "num_classes": num_classes, "global_pool": "avg",
              "drop_path_rate": drop_path}
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)  # kwargs set the size
    missing, unexpected = vit.load_state_dict(encoder_state_dict(encoder), strict=False)
    if set(missing) != EXPECTED_MISSING or not set(unexpected) <= EXPECTED_UNUSED:
        raise CheckpointError(f"encoder does not fit the classifier: missing {sorted(missing)}, "
                              f"unexpected {sorted(unexpected)}")
    if head_norm == "batch":
        vit.fc_norm = torch.nn.BatchNorm1d(vit.embed_dim, affine=False)
    torch.nn.init.trunc_normal_(vit.head.weight, std=2e-5)
    torch.nn.init.zeros_(vit.head.bias)
    return vit


def freeze_for_partial(vit, trainable_blocks: int | None) -> None:
    """Train only the last ``trainable_blocks`` blocks (+ fc_norm) and the head; None trains everything."""
    if trainable_blocks is None:
        return
    vit.requires_grad_(False)
    if trainable_blocks > 0:
        for blk in vit.blocks[len(vit.blocks) - trainable_blocks :]:
            blk.requires_grad_(True)
        vit.fc_norm.requires_grad_(True)
    vit.head.requires_grad_(True)


def train_loop(spec: WorkerSpec) -> None:
    cfg = spec.config
    ft, settings = cfg.finetune, cfg.run_settings("finetune")
    rank, world = launch.enter_worker(spec)
    device = launch.device()
    if device.type == "cuda":
        engine.configure_cuda()
    else:  # as a Ray worker has (OMP_NUM_THREADS), also in-process: the same sums, the same bits
        torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(settings.seed)
    encoder = build_mae(spec.model_kwargs, spec.encoder_state(), settings.seed)
    classes = spec.num_classes
    vit = build_classifier(encoder, classes, ft.drop_path, ft.head_norm).to(device)
    freeze_for_partial(vit, ft.trainable_blocks)
    img_size = encoder.patch_embed.img_size[0]
    del encoder

    group, samples = max(1, cfg.ray.num_workers), ft.samples_per_epoch or cfg.data.samples_per_epoch
    batching = recipe.for_job(cfg, "finetune")  # the configured group's; an elastic group splits its updates
    plan = engine.StepPlan(epoch_batches(cfg.data.train_shards, samples, group, ft.batch_size), batching.accum_iter,
                           ft.epochs, ft.warmup_epochs, workers=group, live=world, rank=rank)
    loader = make_train_loader(cfg.data.train_shards, batch_size=ft.batch_size, transform="finetune",
                               img_size=img_size, rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                               batches=plan.rank_batches, seed=settings.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                               num_classes=classes)
    val_loader = make_eval_loader(cfg.data.val_shards, batch_size=256, transform=eval_transform(cfg.data, img_size),
                                  img_size=img_size, rank=rank, world_size=world, num_workers=cfg.data.num_workers,
                                  num_classes=classes)
    lr = batching.lr(ft.blr)
    optimizer = optim.finetune_optimizer(vit, lr, ft.weight_decay, ft.layer_decay, device)
    scheduler = optim.build_scheduler(optimizer, plan, ft.min_lr)  # applies each group's lr_scale
    precision = engine.Precision(settings.amp, device)
    mixup = None
    if ft.mixup > 0 or ft.cutmix > 0:
        mixup = Mixup(mixup_alpha=ft.mixup, cutmix_alpha=ft.cutmix, label_smoothing=ft.smoothing, num_classes=classes)
        criterion = SoftTargetCrossEntropy()
    elif ft.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=ft.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()

    loop = EpochLoop("finetune", spec, epochs=ft.epochs, checkpoint_every=settings.checkpoint_every,
                     stateful={"model": vit, "optimizer": optimizer, "scheduler": scheduler,
                               "scaler": precision.scaler},
                     seed=settings.seed, plan=plan)
    model = launch.prepare_model(vit, move_to_device=False)
    trainable = sum(p.numel() for p in vit.parameters() if p.requires_grad)
    loop.say(f"{loop.describe_group(batching)}, {plan.rank_batches} batches/epoch, lr {lr:.3g}, "
             f"{trainable / 1e6:.2f} M trainable parameters; {loop.describe_start()}")
    final_files = {checkpoints.FINETUNED_FILE: lambda p: torch.save({"model": vit.state_dict()}, p)}  # release layout
    for epoch in loop.remaining():  # drop path, mixup draws: seeded per (seed, epoch, rank, micro-batch)
        control = loop.begin(epoch, loader)
        model.train()
        batches = loop.batches(loader, epoch, plan.rank_batches)
        metrics = classify.train_epoch(model, batches, optimizer, scheduler, precision, criterion, epoch=epoch,
                                       plan=plan, device=device, mixup=mixup,
                                       no_sync=getattr(model, "no_sync", None),  # DDP only with 2+ workers
                                       control=control)
        vit.eval()
        scores = classify.score(vit, val_loader, device)
        metrics.update(val_top1=scores["top1"], val_top5=scores["top5"])
        loop.end_epoch(epoch, metrics, final_files)
    loop.finish()


def run(cfg: Config, *, source=None, verbose: bool = False, resume_from: str | None = None) -> dict[str, Any]:
    """Fine-tune the encoder ``cfg.eval.checkpoint`` (or ``source``); returns what result.json holds."""
    return run_eval("finetune", cfg, train_loop, source=source, verbose=verbose, resume_from=resume_from)
