"""The demo's results table: does MAE pre-training help on the offline demo dataset?

    python experiments/demo_eval.py [--data-dir data/demo] [--out FILE] [--pretrain-epochs N]
        [--linprobe-epochs N] [--finetune-epochs N] [--workers N] [--pools mean,cls] [--set KEY=VALUE ...]

On one local Ray instance (started once, shared by every job) and with MLflow's default store
(sqlite ``mlflow.db`` in the working directory, unless ``mlflow.tracking_uri`` or
``$MLFLOW_TRACKING_URI`` says otherwise):

1. builds the demo dataset if absent (``data_tools.demo_data``; 10 shape classes, 32 px);
2. pre-trains the demo MAE (``mae_ray.jobs.pretrain``, config ``mae_ray/shipped/configs/demo_cpu.yaml``);
3. linear-probes (``mae_ray.jobs.linprobe``, cached features) the MAE encoder and the same architecture at
   its random initialisation, once per ``--pools`` entry (``mean``: average of the patch tokens,
   ``cls``: the class token, the paper's choice);
4. linear-probes raw pixels, in this process: the flattened, normalised 32x32x3 image (the eval
   transform) through the same BatchNorm (no affine) + linear head, LARS, lr, schedule and batch;
5. fine-tunes (``mae_ray.jobs.finetune``) from the MAE encoder and from random init, the same budget;
6. prints the markdown table and writes it, with the settings and timings, to ``--out``
   (and ``results.json`` beside it).

Every evaluation is its own MLflow run in the config's experiment (``mae-demo``); the MAE ones are
children of the pre-training run. ``--pretrained CHECKPOINT_DIR`` skips step 2 and evaluates that
checkpoint instead (its saved architecture is used; pass the same ``--set model.*`` for the random rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:  # run as a script from anywhere in the checkout
    sys.path.insert(0, REPO)

DEFAULT_CONFIG = os.path.join(HERE, "..", "mae_ray", "shipped", "configs", "demo_cpu.yaml")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python experiments/demo_eval.py",
                                description=__doc__.split("\n")[0] if __doc__ else None)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="run config (default: the shipped demo_cpu)")
    p.add_argument("--data-dir", default="data/demo", help="demo dataset folder (built there if absent)")
    p.add_argument("--output-dir", default=None,
                   help="job outputs and checkpoints (default: outputs/demo_eval/<date-time>)")
    p.add_argument("--out", default=None, help="markdown results file (default: <output-dir>/results.md)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="default: the config's train.epochs")
    p.add_argument("--linprobe-epochs", type=int, default=None, help="default: the config's linprobe.epochs")
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="default: the config's finetune.epochs; 0 skips fine-tuning")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers per job (default: the config's)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--pools", default="mean,cls", help="linear-probe poolings, comma-separated: mean, cls")
    p.add_argument("--pretrained", default=None, help="evaluate this pre-training checkpoint instead of pre-training")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set train.blr=1e-3")
    p.add_argument("--verbose", action="store_true", help="Ray's and MLflow's own logs too")
    args = p.parse_args(argv)
    args.pools = [x.strip() for x in args.pools.split(",") if x.strip()]
    if not args.pools or any(x not in ("cls", "mean") for x in args.pools):
        p.error("--pools takes cls and/or mean")
    for name in ("pretrain_epochs", "linprobe_epochs", "workers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.finetune_epochs is not None and args.finetune_epochs < 0:
        p.error("--finetune-epochs must be >= 0")
    return args


# --------------------------------------------------------------------------- raw-pixel baseline
def pixel_features(shards: str, img_size: int) -> tuple[Any, Any]:
    """Every image of ``shards`` through the eval transform (normalised), flattened: ([N, 3*S*S], [N])."""
    import torch

    from mae_ray.data.loader import make_eval_loader

    xs, ys = [], []
    for x, y in make_eval_loader(shards, batch_size=256, transform="eval", img_size=img_size, num_workers=0):
        xs.append(x.flatten(1))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def raw_pixel_probe(cfg, num_classes: int, uri: str, world: int) -> dict[str, Any]:
    """The linear probe of ``mae_ray.jobs.linprobe`` (cached-features path) on raw pixels, in this process.

    Same head (BatchNorm1d without affine + linear, init std 0.01), LARS (momentum 0.9, trust ratio on
    the weight), lr = blr * effective batch / 256, warmup + cosine, epochs; the effective batch is
    ``linprobe.batch_size`` x ``world`` as in the Ray job (one process here, so one BatchNorm batch).
    """
    import torch
    from torch import nn

    from mae_ray import tracking
    from mae_ray.jobs.linprobe import CachedFeatures, LinearProbeHead
    from mae_ray.train import classify, engine, optim

    lp = cfg.linprobe
    img_size = cfg.model.kwargs()["img_size"]
    start = time.time()
    torch.manual_seed(cfg.train.seed)
    feats, labels = pixel_features(cfg.data.train_shards, img_size)
    vf, vy = pixel_features(cfg.data.val_shards, img_size)
    batch = lp.batch_size * world
    loader = CachedFeatures(feats, labels, batch, rank=0, world=1, seed=cfg.train.seed)
    val = [(vf[i : i + 256], vy[i : i + 256]) for i in range(0, vf.shape[0], 256)]
    head = LinearProbeHead(feats.shape[1], num_classes)
    plan = engine.StepPlan(len(loader), 1, lp.epochs, lp.warmup_epochs)
    lr = lp.blr * batch / 256
    optimizer = optim.linprobe_optimizer(head.fc, lr, lp.weight_decay)
    scheduler = optim.build_scheduler(optimizer, plan, lp.min_lr)
    device = torch.device("cpu")
    precision = engine.Precision("none", device)
    criterion = nn.CrossEntropyLoss()

    params = tracking.params_from_config(cfg.flatten())
    params.update({"eval.encoder": "raw pixels", "linprobe.features": f"pixels ({feats.shape[1]}-d)",
                   "linprobe.effective_batch": str(batch)})
    run_id = tracking.start_run(uri, cfg.mlflow.experiment, "linprobe-raw-pixels", params,
                                {**tracking.run_tags(), "mae_ray.job": "linprobe"})
    logger = tracking.EpochLogger(uri, run_id)
    print(f"[linprobe] raw pixels: {feats.shape[0]} x {feats.shape[1]} features, {plan.batches_per_epoch} "
          f"batches/epoch, lr {lr:.3g}, {lp.epochs} epochs", flush=True)
    try:
        for epoch in range(lp.epochs):
            loader.set_epoch(epoch)
            head.train()
            metrics = classify.train_epoch(head, loader, optimizer, scheduler, precision, criterion,
                                           epoch=epoch, plan=plan, device=device)
            head.eval()
            scores = classify.score(head, val, device)
            metrics.update(val_top1=scores["top1"], val_top5=scores["top5"])
            logger.log_epoch(epoch, metrics)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    logger.flush()
    final = {"linprobe_top1": scores["top1"], "linprobe_top5": scores["top5"]}
    tracking.log_values(uri, run_id, final)
    tracking.end_run(uri, run_id, "FINISHED")
    return {**final, "encoder": "raw pixels", "mlflow_run_id": run_id, "wall_time_s": round(time.time() - start, 1)}


# --------------------------------------------------------------------------- report
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_s(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| evaluation | encoder | top-1 (%) | top-5 (%) | wall time | MLflow run |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['evaluation']} | {r['encoder']} | {r['top1']:.1f} | {r['top5']:.1f} | "
                     f"{fmt_s(r['wall_time_s'])} | `{r['mlflow_run_id'][:8]}` |")
    return "\n".join(lines)


def settings_text(cfg, world: int, pre: dict[str, Any] | None) -> str:
    m, t, lp, ft = cfg.model.kwargs(), cfg.train, cfg.linprobe, cfg.finetune
    eff = t.batch_size * t.accum_iter * world
    lr = t.lr if t.lr is not None else t.blr * eff / 256
    lines = [
        f"- model: `{cfg.model.name}` (embed {m['embed_dim']}, depth {m['depth']}, heads {m['num_heads']}, "
        f"patch {m['patch_size']}, {m['img_size']} px; decoder {m['decoder_embed_dim']}-d x {m['decoder_depth']})",
        f"- pre-training: {t.epochs} epoch(s), effective batch {eff} ({world} workers x {t.batch_size}), "
        f"blr {t.blr:g} (lr {lr:.3g}), warmup {t.warmup_epochs:g} epoch(s), weight decay {t.weight_decay:g}, "
        f"mask ratio {cfg.model.mask_ratio:g}, norm_pix_loss {m['norm_pix_loss']}",
        f"- linear probe: {lp.epochs} epoch(s), effective batch {lp.batch_size * world}, LARS blr {lp.blr:g} "
        f"(lr {lp.blr * lp.batch_size * world / 256:.3g}), warmup {lp.warmup_epochs:g}, pool(s) as in the table, "
        f"cached features (eval transform, no augmentation): {lp.cache_features}",
        f"- fine-tune: {ft.epochs} epoch(s), effective batch {ft.batch_size * world}, AdamW blr {ft.blr:g} "
        f"(lr {ft.blr * ft.batch_size * world / 256:.3g}), warmup {ft.warmup_epochs:g}, layer decay "
        f"{ft.layer_decay:g}, drop path {ft.drop_path:g}, mixup {ft.mixup:g}, cutmix {ft.cutmix:g}, "
        f"label smoothing {ft.smoothing:g}, RandAugment + random erasing",
    ]
    if pre is not None and "metrics" in pre:
        loss = pre["metrics"].get("train_loss")
        if loss is not None:
            lines.append(f"- final pre-training loss: {loss:.4f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from mae_ray.cli import guarded, quiet_logs

    args = parse_args(argv)
    quiet_logs(args.verbose)
    return guarded(lambda: run(args, argv if argv is not None else sys.argv[1:]))  # a UserError: one line, exit 2


def run(args: argparse.Namespace, argv: list[str]) -> int:
    import ray

    from data_tools.demo_data import build_demo_dataset
    from mae_ray import tracking
    from mae_ray.cluster import launch
    from mae_ray.config import load_config
    from mae_ray.jobs import finetune, lifecycle, linprobe, pretrain
    from mae_ray.jobs.encoders import resolve_encoder

    t_start = time.time()
    root = os.path.abspath(args.output_dir or os.path.join("outputs", "demo_eval", time.strftime("%Y%m%d-%H%M%S")))
    out = os.path.abspath(args.out or os.path.join(root, "results.md"))
    print(f"[demo] demo dataset in {os.path.abspath(args.data_dir)} (built if absent)", flush=True)
    demo = build_demo_dataset(args.data_dir)

    overrides = [f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
                 "linprobe.cache_features=true"]
    for flag, key in (("pretrain_epochs", "train.epochs"), ("linprobe_epochs", "linprobe.epochs"),
                      ("finetune_epochs", "finetune.epochs"), ("workers", "ray.num_workers")):
        if getattr(args, flag):
            overrides.append(f"{key}={getattr(args, flag)}")
    base = load_config(args.config, [*overrides, *args.overrides, f"output_dir={root}"])
    world = max(1, base.ray.num_workers)
    do_finetune = args.finetune_epochs != 0
    uri = tracking.resolve_tracking_uri(base.mlflow.tracking_uri)

    def job_cfg(name: str, extra: list[str] = ()):
        return load_config(None, [f"output_dir={os.path.join(root, name)}", *extra], base=base.to_dict())

    started = launch.init_ray(base.ray.address, verbose=args.verbose, num_cpus=args.num_cpus)
    rows: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    pre = None
    try:
        # ---- pre-training
        if args.pretrained:
            checkpoint = os.path.abspath(args.pretrained)
        else:
            t0 = time.time()
            pre = pretrain.run(job_cfg("pretrain", ["mlflow.run_name=demo-pretrain"]), verbose=args.verbose)
            timings["pretrain"] = time.time() - t0
            checkpoint = pre["checkpoint"]
            print(f"[demo] pre-trained in {fmt_s(timings['pretrain'])}: {checkpoint}", flush=True)
        mae = resolve_encoder(checkpoint, base, uri)
        rand = resolve_encoder("random", base, uri)
        if mae.model_kwargs != rand.model_kwargs:
            print("[demo] warning: the checkpoint's architecture differs from the config's; pass the same "
                  "--set model.* so the random rows are the same model", flush=True)

        def evaluate(job, kind: str, label: str, source, extra: list[str]) -> dict[str, Any]:
            name = f"{kind}-{label.replace(' ', '-')}"
            cfg = job_cfg(name, [f"mlflow.run_name={name}", f"eval.checkpoint={source.label}", *extra])
            t0 = time.time()
            result = job.run(cfg, source=source, verbose=args.verbose)
            timings[name] = time.time() - t0
            print(f"[demo] {name}: top-1 {result[f'{kind}_top1']:.2f}  top-5 {result[f'{kind}_top5']:.2f}  "
                  f"({fmt_s(timings[name])})", flush=True)
            return result

        # ---- linear probes
        for pool in args.pools:
            for label, source, short in (("MAE", mae, "mae"), ("random init", rand, "random")):
                r = evaluate(linprobe, "linprobe", f"{short}-{pool}", source, [f"linprobe.pool={pool}"])
                rows.append({"evaluation": f"linear probe ({pool} pool)", "encoder": label,
                             "top1": r["linprobe_top1"], "top5": r["linprobe_top5"],
                             "wall_time_s": timings[f"linprobe-{short}-{pool}"], "mlflow_run_id": r["mlflow_run_id"]})
        t0 = time.time()
        r = raw_pixel_probe(job_cfg("linprobe-raw-pixels"), lifecycle.num_classes(base), uri, world)
        timings["linprobe-raw-pixels"] = time.time() - t0
        print(f"[demo] linprobe-raw-pixels: top-1 {r['linprobe_top1']:.2f}  top-5 {r['linprobe_top5']:.2f}  "
              f"({fmt_s(timings['linprobe-raw-pixels'])})", flush=True)
        rows.append({"evaluation": "linear probe", "encoder": "raw pixels", "top1": r["linprobe_top1"],
                     "top5": r["linprobe_top5"], "wall_time_s": timings["linprobe-raw-pixels"],
                     "mlflow_run_id": r["mlflow_run_id"]})

        # ---- fine-tuning
        if do_finetune:
            for label, source, short in (("MAE", mae, "mae"), ("scratch (random init)", rand, "scratch")):
                r = evaluate(finetune, "finetune", short, source, [])
                rows.append({"evaluation": "fine-tune", "encoder": label, "top1": r["finetune_top1"],
                             "top5": r["finetune_top5"], "wall_time_s": timings[f"finetune-{short}"],
                             "mlflow_run_id": r["mlflow_run_id"]})
    finally:
        if started:
            ray.shutdown()

    total = time.time() - t_start
    table = markdown(rows)
    by = {(r["evaluation"], r["encoder"]): r for r in rows}
    gaps = []
    for pool in args.pools:
        a, b = by[(f"linear probe ({pool} pool)", "MAE")], by[(f"linear probe ({pool} pool)", "random init")]
        gaps.append(f"linear probe ({pool}): MAE - random init = {a['top1'] - b['top1']:+.1f} top-1")
    if do_finetune:
        a, b = by[("fine-tune", "MAE")], by[("fine-tune", "scratch (random init)")]
        gaps.append(f"fine-tune: MAE - scratch = {a['top1'] - b['top1']:+.1f} top-1")
    command = "python experiments/demo_eval.py " + " ".join(shlex.quote(a) for a in argv)
    report = "\n".join([
        "# MAE demo: linear probe and fine-tune on the offline demo dataset", "",
        table, "",
        *[f"- {g}" for g in gaps], "",
        "## Settings", "",
        settings_text(base, world, pre),
        f"- data: {demo['num_train']} train / {demo['num_val']} val images, {demo['num_classes']} classes, "
        f"{demo['image_size']} px ({os.path.abspath(args.data_dir)})",
        f"- encoder: {checkpoint}" + (f" (MLflow run `{pre['mlflow_run_id']}`)" if pre else ""),
        f"- MLflow: {tracking.redact(uri)}, experiment `{base.mlflow.experiment}`", "",
        "## Command and machine", "",
        f"```\n{command}\n```", "",
        f"- machine: {os.cpu_count()} CPU cores ({cpu_model()}), {world} Ray Train worker(s) per job, no GPU",
        f"- wall time: {fmt_s(total)} in all"
        + (f"; pre-training {fmt_s(timings['pretrain'])}" if "pretrain" in timings else ""), "",
    ])
    print("\n" + table + "\n\n" + "\n".join(gaps), flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(report)
    with open(os.path.join(os.path.dirname(out), "results.json"), "w") as f:
        json.dump({"rows": rows, "timings_s": {k: round(v, 1) for k, v in timings.items()},
                   "total_s": round(total, 1), "checkpoint": checkpoint, "command": command,
                   "config": base.to_dict(), "pretrain": pre}, f, indent=2)
    print(f"\n[demo] done in {fmt_s(total)}; table and settings in {out}", flush=True)
    return 0



if __name__ == "__main__":
    sys.exit(main())
