"""Where does MAE pre-training start to pay off? The gain of MAE initialisation over random init, for the
linear probe and for fine-tuning, over pre-training length and fine-tuning length (issue 14, item 7).

    python experiments/gain_curve.py [--pretrain-epochs 2,5,10,20] [--finetune-epochs 2,6]
        [--config demo_cpu] [--data-dir data/demo] [--output-dir DIR] [--set KEY=VALUE ...]

On one local Ray instance and the config's MLflow store, with the demo config's recipe unchanged:

1. random init (pre-training length 0): the linear probe (mean pool, cached features) and one fine-tuning
   run per ``--finetune-epochs`` entry;
2. for each ``--pretrain-epochs`` entry, a pre-training run of its own (its own warmup + cosine schedule, as
   the paper's Fig. 7 runs each length separately), then the same linear probe and fine-tuning runs.

Beside each linear probe, the yardstick it is held to: a plain logistic regression on the same frozen
features (``train/classify.plain_probe_top1``, in this process).

Every job is the real one (``mae_ray/jobs/pretrain`` / ``linprobe`` / ``finetune`` on Ray Train, one MLflow run
each, experiment ``mae-gain-curve``). Writes ``results.json`` after every job (so a stopped run keeps what it
measured), then ``results.md`` (the table, the gains, each fine-tuning run's per-epoch val top-1) and
``gain_curve.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, HERE):  # run as a script from anywhere in the checkout; demo_eval's helpers
    if path not in sys.path:
        sys.path.insert(0, path)

import demo_eval  # noqa: E402


def int_list(text: str) -> list[int]:
    try:
        values = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python experiments/gain_curve.py", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=demo_eval.DEFAULT_CONFIG)
    p.add_argument("--data-dir", default="data/demo", help="demo dataset folder (built there if absent)")
    p.add_argument("--output-dir", default=None, help="default: outputs/gain_curve/<date-time>")
    p.add_argument("--pretrain-epochs", type=int_list, default=[2, 5, 10, 20])
    p.add_argument("--finetune-epochs", type=int_list, default=[2, 6])
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="an earlier run's output folder: its measurements are kept, only missing ones run")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def plain_probe(encoder, cfg) -> float:
    """The yardstick the probe job is held to: a plain logistic regression on the same frozen features (the
    eval transform, the probe's pooling, every training and validation image)."""
    from mae_ray.data.loader import make_eval_loader
    from mae_ray.data.transforms import eval_transform
    from mae_ray.train.classify import plain_probe_top1
    from mae_ray.train.knn import extract_features

    size = encoder.patch_embed.img_size[0]

    def features(shards: str):
        loader = make_eval_loader(shards, batch_size=256, transform=eval_transform(cfg.data, size), img_size=size,
                                  rank=0, world_size=1, num_workers=0, num_classes=cfg.data.num_classes)
        return extract_features(encoder, loader, "cpu", pool=cfg.linprobe.pool)

    train = features(cfg.data.train_shards)
    return plain_probe_top1(train, features(cfg.data.val_shards), int(train[1].max()) + 1)


def val_history(uri: str, run_id: str) -> list[float]:
    """The run's val_top1 after each epoch, from MLflow."""
    from mlflow.tracking import MlflowClient

    points = MlflowClient(uri).get_metric_history(run_id, "val_top1")
    return [round(m.value, 2) for m in sorted(points, key=lambda m: m.step)]


def report(rows: list[dict[str, Any]], ft_epochs: list[int], command: str, settings: str) -> str:
    by = {r["pretrain_epochs"]: r for r in rows}
    base = by.get(0)
    head = ["pre-training epochs", "linear probe top-1", "plain logistic regression",
            *[f"fine-tune {f} ep top-1" for f in ft_epochs]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in sorted(by):
        r = by[p]
        cells = [("0 (random init)" if p == 0 else str(p))]
        keys = ["linprobe", "plain", *[f"finetune_{f}" for f in ft_epochs]]
        for k in keys:
            if k not in r:
                cells.append("-")
                continue
            gain = "" if p == 0 or not base or k not in base else f" ({r[k] - base[k]:+.1f})"
            cells.append(f"{r[k]:.1f}{gain}")
        lines.append("| " + " | ".join(cells) + " |")
    curves = ["| init | fine-tune epochs | val top-1 after each epoch |", "|---|---:|---|"]
    for p in sorted(by):
        for f in ft_epochs:
            hist = by[p].get(f"finetune_{f}_history")
            if hist:
                init = "random" if p == 0 else f"MAE {p} ep"
                curves.append(f"| {init} | {f} | {', '.join(f'{v:.1f}' for v in hist)} |")
    return "\n".join(["# MAE vs random init over pre-training and fine-tuning length", "",
                      "Top-1 (%) on the demo val set; in brackets the gain over random init (the first row).", "",
                      *lines, "", "## Fine-tuning curves", "", *curves, "", "## Settings", "", settings, "",
                      "## Command", "", f"```\n{command}\n```", ""])


def plot(rows: list[dict[str, Any]], ft_epochs: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {r["pretrain_epochs"]: r for r in rows}
    if 0 not in by:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = sorted(p for p in by if p > 0)
    for key, label in [("linprobe", "linear probe"), *[(f"finetune_{f}", f"fine-tune {f} ep") for f in ft_epochs]]:
        pts = [(p, by[p][key] - by[0][key]) for p in xs if key in by[p] and key in by[0]]
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("MAE pre-training epochs")
    ax.set_ylabel("top-1 gain over random init (points)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    from mae_ray.jobs import finetune, linprobe, pretrain
    from mae_ray.jobs.encoders import resolve_encoder

    t_start = time.time()
    root = os.path.abspath(args.output_dir or os.path.join("outputs", "gain_curve", time.strftime("%Y%m%d-%H%M%S")))
    demo = build_demo_dataset(args.data_dir)
    base = load_config(args.config, [f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
                                      "linprobe.cache_features=true", "linprobe.pool=mean",
                                      "mlflow.experiment=mae-gain-curve", *args.overrides, f"output_dir={root}"])
    uri = tracking.resolve_tracking_uri(base.mlflow.tracking_uri)
    command = "python experiments/gain_curve.py " + " ".join(shlex.quote(a) for a in argv)
    os.makedirs(root, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.reuse:  # measurements made before (same recipe) are kept; only the missing ones run
        with open(os.path.join(args.reuse, "results.json")) as f:
            rows = json.load(f)["rows"]
    by_length = {r["pretrain_epochs"]: r for r in rows}

    def save() -> None:
        with open(os.path.join(root, "results.json"), "w") as f:
            json.dump({"rows": rows, "command": command, "config": base.to_dict(),
                       "total_s": round(time.time() - t_start, 1)}, f, indent=2)

    def job_cfg(name: str, extra: list[str]):
        return load_config(None, [f"output_dir={os.path.join(root, name)}", f"mlflow.run_name={name}", *extra],
                           base=base.to_dict())

    def evaluate(row: dict[str, Any], source, tag: str) -> None:
        if "plain" not in row:
            row["plain"] = round(plain_probe(source.build(base.train.seed), base), 1)
            print(f"[gain] {tag}: plain logistic regression {row['plain']:.1f}", flush=True)
            save()
        if "linprobe" not in row:
            t0 = time.time()
            r = linprobe.run(job_cfg(f"linprobe-{tag}", [f"eval.checkpoint={source.label}"]), source=source,
                             verbose=args.verbose)
            row["linprobe"], row["linprobe_s"] = r["linprobe_top1"], round(time.time() - t0, 1)
            print(f"[gain] {tag}: linear probe {r['linprobe_top1']:.2f}", flush=True)
            save()
        for f in args.finetune_epochs:
            if f"finetune_{f}" in row:
                continue
            t0 = time.time()
            r = finetune.run(job_cfg(f"finetune{f}-{tag}", [f"eval.checkpoint={source.label}", f"finetune.epochs={f}"]),
                             source=source, verbose=args.verbose)
            row[f"finetune_{f}"], row[f"finetune_{f}_s"] = r["finetune_top1"], round(time.time() - t0, 1)
            row[f"finetune_{f}_history"] = val_history(uri, r["mlflow_run_id"])
            print(f"[gain] {tag}: fine-tune {f} epochs {r['finetune_top1']:.2f} "
                  f"(per epoch {row[f'finetune_{f}_history']})", flush=True)
            save()

    started = launch.init_ray(base.ray.address, verbose=args.verbose, num_cpus=args.num_cpus)
    try:
        if 0 not in by_length:
            rows.append(by_length.setdefault(0, {"pretrain_epochs": 0}))
        evaluate(by_length[0], resolve_encoder("random", base, uri), "random")
        for p in args.pretrain_epochs:
            row = by_length.get(p)
            if row is None:
                t0 = time.time()
                pre = pretrain.run(job_cfg(f"pretrain-{p}ep", [f"train.epochs={p}"]), verbose=args.verbose)
                row = {"pretrain_epochs": p, "pretrain_s": round(time.time() - t0, 1),
                       "pretrain_loss": pre["metrics"].get("train_loss"), "checkpoint": pre["checkpoint"]}
                rows.append(row)
                by_length[p] = row
                print(f"[gain] pre-trained {p} epochs (loss {row['pretrain_loss']:.4f})", flush=True)
                save()
            evaluate(row, resolve_encoder(row["checkpoint"], base, uri), f"mae{p}ep")
    finally:
        if started:
            ray.shutdown()
    save()
    world = max(1, base.ray.num_workers)
    settings = demo_eval.settings_text(base, world, None)
    settings = re.sub(r"(- (pre-training|fine-tune): )\d+ epoch\(s\)", r"\1epochs as in the table", settings)
    text = report(rows, args.finetune_epochs, command, settings)
    with open(os.path.join(root, "results.md"), "w") as f:
        f.write(text)
    plot(rows, args.finetune_epochs, os.path.join(root, "gain_curve.png"))
    print(text, flush=True)
    print(f"[gain] done in {demo_eval.fmt_s(time.time() - t_start)}: {root}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
