"""A sweep trial's three jobs on Ray Train (one worker each) vs in the calling process (``ray.num_workers=0``),
measured in the same run.

Each round runs pre-training, the cached linear probe and fine-tuning of the demo config's tiny ViT, the same
budgets both ways, one private local Ray for the whole script; the two modes alternate A B B A ... so that drift
in the machine's load hits both. What differs is only how each job starts and reports: a TorchTrainer (its
controller, a worker actor, the report/checkpoint round trips) or the train loop called in this process
(``launch.InProcessRun``). Wall time of each job's ``run()``, from the call to its return.

    python experiments/benchmarks/in_process_jobs.py               # ~5 min on 2 cores
    python experiments/benchmarks/in_process_jobs.py --rounds 1 --samples 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.pop("RAY_ADDRESS", None)  # never join someone else's cluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def jobs(shards: dict, tmp: str, mode: str, samples: int, tag: str) -> dict[str, float]:
    from mae_ray.config import load_config
    from mae_ray.jobs import finetune, linprobe, pretrain

    workers = "0" if mode == "in_process" else "1"
    common = [f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}", "data.num_workers=1",
              f"data.samples_per_epoch={samples}", f"ray.num_workers={workers}", "ray.cpus_per_worker=1",
              f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "mlflow.experiment=bench"]
    config = os.path.join(ROOT, "mae_ray", "shipped", "configs", "demo_cpu.yaml")
    times = {}
    start = time.perf_counter()
    pre = pretrain.run(load_config(config, [*common, "train.epochs=2", "train.checkpoint_every=1",
                                            "train.visualize_every=0", f"output_dir={tmp}/{tag}/pre"]))
    times["pretrain"] = time.perf_counter() - start
    evaluate = [*common, f"eval.checkpoint={pre['checkpoint']}"]
    start = time.perf_counter()
    linprobe.run(load_config(config, [*evaluate, "linprobe.epochs=20", f"output_dir={tmp}/{tag}/probe"]))
    times["linprobe"] = time.perf_counter() - start
    start = time.perf_counter()
    finetune.run(load_config(config, [*evaluate, "finetune.epochs=1", "finetune.warmup_epochs=0",
                                      f"output_dir={tmp}/{tag}/ft"]))
    times["finetune"] = time.perf_counter() - start
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="A B pairs (each mode runs this many times)")
    p.add_argument("--samples", type=int, default=1024, help="pre-training images per epoch")
    args = p.parse_args()

    import ray

    from data_tools.demo_data import build_demo_dataset
    from mae_ray.cluster.launch import init_ray

    shards = build_demo_dataset(os.path.join(ROOT, "data", "demo"))
    init_ray(num_cpus=os.cpu_count())
    measured: dict[str, list[dict[str, float]]] = {"ray_train": [], "in_process": []}
    order = [m for i in range(args.rounds) for m in (("ray_train", "in_process") if i % 2 == 0
                                                      else ("in_process", "ray_train"))]
    try:
        with tempfile.TemporaryDirectory(prefix="bench-in-process-") as tmp:
            for i, mode in enumerate(order):
                measured[mode].append(jobs(shards, tmp, mode, args.samples, f"{mode}-{i}"))
    finally:
        ray.shutdown()

    print(f"\n{os.cpu_count()} CPUs, {args.rounds} round(s), order {' '.join(order)}; seconds per job (median)")
    print("| job | Ray Train, 1 worker | in-process | in-process / Ray Train |\n|---|---:|---:|---:|")
    for job in ("pretrain", "linprobe", "finetune"):
        ray_s = statistics.median(r[job] for r in measured["ray_train"])
        local_s = statistics.median(r[job] for r in measured["in_process"])
        print(f"| {job} | {ray_s:.1f} | {local_s:.1f} | {local_s / ray_s:.2f} |")
    ray_all = statistics.median(sum(r.values()) for r in measured["ray_train"])
    local_all = statistics.median(sum(r.values()) for r in measured["in_process"])
    print(f"| all three | {ray_all:.1f} | {local_all:.1f} | {local_all / ray_all:.2f} |")


if __name__ == "__main__":
    main()
