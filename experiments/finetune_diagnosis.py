"""Why does MAE initialisation fine-tune worse than random init on the demo data? (issue 14, item 7)

    python experiments/finetune_diagnosis.py --encoder CHECKPOINT_DIR [--encoder ...] [--epochs 2]
        [--heads release,keep_norm] [--config demo_cpu] [--data-dir data/demo]

In this process (no Ray, one worker: the recipe's effective batch on one process), fine-tunes each encoder
and random init with the demo config's recipe (``mae_ray/jobs/finetune.py``'s classifier, transforms,
optimiser and schedule) under each head variant, and prints the val top-1 after every epoch:

- ``release``: the MAE release's (and the fine-tuning job's) head: the last block's patch tokens averaged,
  then a fresh LayerNorm (``fc_norm``) and the linear head; the encoder's own final norm is dropped;
- ``keep_norm``: the encoder's pre-trained final norm applied to every token, then averaged, then the head;
- ``cls``: the encoder's pre-trained final norm, then the class token (the paper's linear-probe feature);
- ``bn``: the release's, with ``fc_norm`` a BatchNorm without affine (the linear probe's normalisation), which
  removes what every image's feature has in common: the job's ``finetune.head_norm=batch``.

Also prints, per encoder, what the head sees at the start: the size of the last block's tokens and how
much of the pooled feature is the same for every image.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import torch  # noqa: E402


def classifier(encoder, head: str, num_classes: int, drop_path: float):
    import timm

    from mae_ray.jobs.finetune import build_classifier
    from mae_ray.model.weights import encoder_state_dict, timm_vit_kwargs

    if head in ("release", "bn"):
        return build_classifier(encoder, num_classes, drop_path, "batch" if head == "bn" else "layer")
    kwargs = {**timm_vit_kwargs(encoder), "num_classes": num_classes, "fc_norm": False, "drop_path_rate": drop_path,
              "global_pool": {"keep_norm": "avg", "cls": "token"}[head]}
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs)
    missing, unexpected = vit.load_state_dict(encoder_state_dict(encoder), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected, (missing, unexpected)
    torch.nn.init.trunc_normal_(vit.head.weight, std=2e-5)
    torch.nn.init.zeros_(vit.head.bias)
    return vit


@torch.no_grad()
def start_stats(vit, x: torch.Tensor) -> str:
    tokens = vit.forward_features(x)[:, 1:]  # [N, L, D]; the release head: norm is Identity here
    pooled = tokens.mean(1)  # [N, D]
    common = pooled.mean(0)
    share = (common - common.mean()).pow(2).sum() / (pooled - pooled.mean(1, keepdim=True)).pow(2).sum(1).mean()
    norms = tokens.norm(dim=-1)  # [N, L]
    return (f"token norm mean {norms.mean():.1f} / max {norms.max():.1f} (per image, max over mean "
            f"{(norms.max(1).values / norms.mean(1)).mean():.1f}x), pooled |mean| {common.abs().mean():.2f} vs "
            f"spread {pooled.std(0).mean():.2f}, sample-independent share of the pooled feature {share:.2f}")


def fine_tune(cfg, encoder, head: str, epochs: int, classes: int) -> list[float]:
    from timm.loss import LabelSmoothingCrossEntropy

    from mae_ray.data.loader import make_eval_loader, make_train_loader
    from mae_ray.data.transforms import eval_transform
    from mae_ray.train import classify, engine, optim

    ft, cpu = cfg.finetune, torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    vit = classifier(encoder, head, classes, ft.drop_path)
    img = encoder.patch_embed.img_size[0]
    batch = ft.batch_size * max(1, cfg.ray.num_workers)  # the job's effective batch, on one process
    loader = make_train_loader(cfg.data.train_shards, batch_size=batch, transform="finetune", img_size=img,
                               num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                               samples_per_epoch=cfg.data.samples_per_epoch,
                               shuffle_buffer=cfg.data.shuffle_buffer, num_classes=classes)
    val = make_eval_loader(cfg.data.val_shards, batch_size=256, transform=eval_transform(cfg.data, img),
                           img_size=img, num_workers=cfg.data.num_workers, num_classes=classes)
    plan = engine.StepPlan(len(loader), 1, epochs, ft.warmup_epochs)
    opt = optim.finetune_optimizer(vit, ft.blr * batch / 256, ft.weight_decay, ft.layer_decay, cpu)
    sched = optim.build_scheduler(opt, plan, ft.min_lr)
    curve = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        vit.train()
        classify.train_epoch(vit, loader, opt, sched, engine.Precision("none", cpu),
                             LabelSmoothingCrossEntropy(smoothing=ft.smoothing), epoch=epoch, plan=plan, device=cpu)
        vit.eval()
        curve.append(round(classify.score(vit, val, cpu)["top1"], 1))
    return curve


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python experiments/finetune_diagnosis.py", description=__doc__.split("\n")[0])
    p.add_argument("--encoder", action="append", default=[], help="a pre-training checkpoint folder (repeatable)")
    p.add_argument("--config", default=os.path.join(HERE, "..", "mae_ray", "shipped", "configs", "demo_cpu.yaml"))
    p.add_argument("--data-dir", default="data/demo")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--heads", default="release,keep_norm,bn")
    p.add_argument("--samples", type=int, default=None, help="images per training epoch (default: all)")
    p.add_argument("--no-random", action="store_true", help="skip the random-init rows")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override, e.g. finetune.blr=1.6e-2 (repeatable)")
    args = p.parse_args(argv)

    from data_tools.demo_data import build_demo_dataset
    from mae_ray.config import load_config
    from mae_ray.data.loader import make_eval_loader
    from mae_ray.data.transforms import eval_transform
    from mae_ray.jobs.encoders import resolve_encoder

    demo = build_demo_dataset(args.data_dir)
    cfg = load_config(args.config, [f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
                                     f"data.samples_per_epoch={args.samples or 'null'}", *args.set])
    x, _ = next(iter(make_eval_loader(cfg.data.val_shards, batch_size=256, transform=eval_transform(cfg.data, 32),
                                      img_size=32, num_workers=0)))
    print(f"recipe: {cfg.finetune.epochs} -> {args.epochs} epoch(s), blr {cfg.finetune.blr:g}, layer decay "
          f"{cfg.finetune.layer_decay:g}, drop path {cfg.finetune.drop_path:g}; {torch.get_num_threads()} threads")
    for spec in ([] if args.no_random else ["random"]) + args.encoder:
        store = "sqlite:///" + os.path.join(tempfile.mkdtemp(), "unused.db")  # no MLflow run is made
        encoder = resolve_encoder(spec, cfg, store).build(cfg.train.seed)
        label = "random init" if spec == "random" else spec
        print(f"{label}: {start_stats(classifier(encoder, 'release', 10, 0.0).eval(), x)}", flush=True)
        for head in args.heads.split(","):
            t0 = time.time()
            curve = fine_tune(cfg, encoder, head, args.epochs, demo["num_classes"])
            print(f"  head {head:<9} val top-1 per epoch {curve}  ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
