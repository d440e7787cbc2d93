"""Does a pre-training run's memory grow with epochs? RSS of every epoch of a tiny 20-epoch run.

Every job's rank 0 logs ``rss_mb`` each epoch (``loop.EpochLoop``: the worker's resident memory plus
its DataLoader processes). This script pre-trains the micro ViT on the demo shards for ``--epochs``
epochs on a private local Ray, then reads that history from MLflow and prints it, with the driver's
own RSS before and after. A leak shows as a steady rise after the first epochs (allocator and loader
warm-up); flat is what must hold.

    python experiments/benchmarks/memory_growth.py [--epochs 20] [--workers 2] [--every 5] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--samples-per-epoch", type=int, default=1024)
    p.add_argument("--every", type=int, default=5, help="checkpoint, kNN monitor and pictures every N epochs")
    p.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = p.parse_args()

    import psutil
    from mlflow import MlflowClient

    from data_tools.demo_data import build_demo_dataset
    from mae_ray.cli import quiet_logs
    from mae_ray.config import load_config
    from mae_ray.jobs import pretrain

    quiet_logs(False)
    out = args.out or tempfile.mkdtemp(prefix="mae_ray_memory_")
    demo = build_demo_dataset(os.path.join(out, "demo"), num_train=2000, num_val=200, size=32, seed=0)
    uri = f"sqlite:///{out}/mlflow.db"
    cfg = load_config(None, [
        "model.name=mae_vit_micro_patch4", "model.img_size=32",
        f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}", "data.num_workers=1",
        f"data.samples_per_epoch={args.samples_per_epoch}", "train.batch_size=32",
        f"train.epochs={args.epochs}", "train.lr=1e-3", "train.warmup_epochs=1",
        f"train.checkpoint_every={args.every}", f"train.visualize_every={args.every}", f"train.knn_every={args.every}",
        f"ray.num_workers={args.workers}", "ray.cpus_per_worker=1",
        f"mlflow.tracking_uri={uri}", "mlflow.experiment=memory", f"output_dir={out}/run",
    ])
    driver = psutil.Process()
    before = driver.memory_info().rss / 2**20
    summary = pretrain.run(cfg)
    after = driver.memory_info().rss / 2**20
    rss = sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "rss_mb"))
    print("\nepoch  rank-0 worker RSS (MiB, with its loader process)")
    for step, value in rss:
        print(f"{step + 1:5d}  {value:8.1f}")
    settled = [v for s, v in rss if s >= 2]  # after warm-up
    first, last = settled[0], settled[-1]
    print(f"\nepochs 3-{len(rss)}: {first:.1f} -> {last:.1f} MiB ({last - first:+.1f} MiB, "
          f"{(last / first - 1) * 100:+.1f}%), max {max(settled):.1f}, min {min(settled):.1f}")
    print(f"driver RSS: {before:.1f} MiB before the run, {after:.1f} MiB after")
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
