"""Calibrate the MAE-vs-random linear-probe margin of tests/test_evaluation.py at the test's own budget.

    python experiments/probe_margin.py [--seeds 0,1,2,3,4] [--ray] [--out DIR]

For each seed (``train.seed``; the probe's seed and the random initialisation follow it, as in the test's
fixtures, so one seed changes the pre-training run, its data order and masks, the random-init weights and
the probe's data order), on the test's demo data (the ``demo_data`` fixture's parameters):

1. pre-trains with the test's ``LEARN_PRETRAIN`` budget (the ``pretrained`` fixture),
2. linear-probes that encoder with ``LEARN_PROBE`` (the probe half of the ``evaluated`` fixture),
3. linear-probes the same architecture at its random initialisation (the ``random_probe`` fixture),

and prints the table of top-1 (300 val images) and MAE - random. The configs are the test's own
(``eval_config`` and the ``LEARN_*`` tuples are imported from it), so the budget cannot drift from it.

Default: every job in this process (``ray.num_workers=0``) with each worker's batch times the test's
``ray.num_workers`` (2 workers x 32 -> 1 x 64 for pre-training, 2 x 64 -> 1 x 128 for the probe): the same
images, updates, learning rates and schedule, without a Ray Train start-up per job: exactly what the test's
fixtures run (their ``IN_PROCESS``). ``--ray``: eval_config's 2 Ray Train workers instead (slower: three Ray
Train start-ups per seed; a seed then draws other masks and orders, per rank).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
for path in (REPO, os.path.join(REPO, "tests")):  # run as a script; the test module is the budget's owner
    if path not in sys.path:
        sys.path.insert(0, path)


def run_seed(seed: int, demo: dict, root: str, on_ray: bool) -> dict[str, float]:
    from test_evaluation import LEARN_PRETRAIN, LEARN_PROBE, eval_config

    from mae_ray.jobs import linprobe, pretrain

    base = eval_config(demo, root)  # the test's config, for its worker count and batch sizes
    extra = [f"train.seed={seed}"]
    if not on_ray:
        w = base.ray.num_workers
        extra += ["ray.num_workers=0", f"train.batch_size={base.train.batch_size * w}",
                  f"linprobe.batch_size={base.linprobe.batch_size * w}"]
    start = time.time()
    pre = pretrain.run(eval_config(demo, root, *LEARN_PRETRAIN, *extra, f"output_dir={root}/pre"))
    mid = time.time()
    mae = linprobe.run(eval_config(demo, root, f"eval.checkpoint={pre['checkpoint']}", *LEARN_PROBE, *extra,
                                   f"output_dir={root}/lp_mae"))
    rnd = linprobe.run(eval_config(demo, root, "eval.checkpoint=random", *LEARN_PROBE, *extra,
                                   f"output_dir={root}/lp_random"))
    return {"seed": seed, "mae": mae["linprobe_top1"], "random": rnd["linprobe_top1"],
            "knn": pre["metrics"].get("knn_top1", float("nan")), "loss": pre["metrics"]["train_loss"],
            "pretrain_s": mid - start, "probes_s": time.time() - mid}


def table(rows: list[dict[str, float]]) -> str:
    lines = ["| seed | probe, MAE encoder | probe, random init | MAE - random | kNN (cls) | final loss | "
             "pre-train s | probes s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['mae']:.1f} | {r['random']:.1f} | {r['mae'] - r['random']:+.1f} | "
                     f"{r['knn']:.1f} | {r['loss']:.3f} | {r['pretrain_s']:.0f} | {r['probes_s']:.0f} |")
    gaps = [r["mae"] - r["random"] for r in rows]
    lines.append(f"\nMAE - random over {len(rows)} seeds: min {min(gaps):+.1f}, mean {sum(gaps) / len(gaps):+.1f}, "
                 f"max {max(gaps):+.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python experiments/probe_margin.py", description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="train.seed values, comma-separated")
    p.add_argument("--ray", action="store_true", help="the test's Ray Train workers, not in-process jobs")
    p.add_argument("--out", default=None, help="working folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]

    from data_tools.demo_data import build_demo_dataset
    from mae_ray.cluster.launch import init_ray

    os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    with tempfile.TemporaryDirectory(prefix="probe-margin-", dir=args.out) as root:
        # the demo_data fixture's parameters (tests/conftest.py)
        demo = build_demo_dataset(os.path.join(root, "demo"), num_train=1200, num_val=300, size=32, seed=0,
                                  maxcount=250)
        init_ray(num_cpus=2)  # one local Ray for every job (the test module's local_ray)
        rows = []
        for seed in seeds:
            rows.append(run_seed(seed, demo, os.path.join(root, f"seed{seed}"), args.ray))
            print(f"seed {seed}: {rows[-1]}", flush=True)
        import ray

        ray.shutdown()
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
