"""The first-GPU check: every job on CUDA and the data path's speed, in one command of at most 8 minutes.

    python experiments/gpu_check.py                 # one GPU, 16 CPU cores: results under $OUT (or --out)
    python experiments/gpu_check.py --dry-run       # this CPU machine: the same steps, tiny (CI runs it)

Each step is its own process with a time box (its own limit, and never past the whole check's budget), so a
failure or a hang of one leaves the others running; what each step saw goes to ``logs/<step>.log``, and the
results to ``gpu_check.json`` and ``gpu_check.md`` (one row per step: passed / failed / timed out / skipped,
its seconds, its figures, the first error line), both rewritten after every step.

Steps: demo JPEG shards; pre-training on Ray Train (``ray.use_gpu``, bf16, ``torch.compile``, 1 worker, the kNN
monitor every epoch); the same with its worker SIGKILLed after epoch 1's checkpoint and retried; the linear
probe and fine-tuning of that encoder on CUDA; a two-trial sweep whose trials share the GPU (0.5 each, each
trial's jobs in its process); ``benchmarks/gpu_pretrain.py`` (ours eager and compiled, transformers' ViTMAE
as the peer row, the mask token in the encoder) and ``benchmarks/gpu_loader.py`` (the real loader from the JPEG
shards, 14 loader processes, CPU vs GPU decoding). ``--dry-run``: the micro ViT on 32 px images, on the CPU,
no compile, the benchmarks' own dry runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Step:
    name: str
    what: str
    limit_s: float
    command: Callable[[Check], list[str]]
    check: Callable[[Check], dict[str, Any]]  # figures; raises AssertionError when the step did not do its job
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Check:
    out: Path
    dry: bool

    @property
    def data(self) -> Path:
        return self.out / "data"

    def sets(self, job: str, *extra: str) -> list[str]:
        """``--set`` arguments of a job of this check."""
        if self.dry:
            size = ["model.name=mae_vit_micro_patch4", "model.img_size=32", "data.samples_per_epoch=256",
                    "train.batch_size=32", "ray.use_gpu=false", "ray.cpus_per_worker=1", "data.num_workers=1"]
        else:
            size = ["model.name=mae_vit_base_patch16", "model.img_size=224", "data.samples_per_epoch=4096",
                    "train.batch_size=128", "train.amp=bf16", "ray.use_gpu=true", "ray.cpus_per_worker=8",
                    "data.num_workers=6", "linprobe.batch_size=256", "finetune.batch_size=64"]
        common = [*size, f"data.train_shards={self.data}/shards/train", f"data.val_shards={self.data}/shards/val",
                  f"mlflow.tracking_uri=sqlite:///{self.out}/mlflow.db", "mlflow.experiment=gpu-check",
                  "train.effective_batch=null", "linprobe.effective_batch=null", "finetune.effective_batch=null",
                  "eval.knn_train_samples=1000", "eval.knn_val_samples=500", f"output_dir={self.out}/{job}"]
        return [a for item in [*common, *extra] for a in ("--set", item)]

    def result(self, job: str) -> dict[str, Any]:
        path = self.out / job / "result.json"
        assert path.is_file(), f"no {path}"
        return json.loads(path.read_text())


def _history(check: Check, run_id: str, key: str) -> list[float]:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{check.out}/mlflow.db")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# --------------------------------------------------------------------------- the steps
def data_command(c: Check) -> list[str]:
    n, size = (256, 32) if c.dry else (4096, 224)
    return [PY, "-m", "data_tools.demo_data", "--output", str(c.data), "--num-train", str(n),
            "--num-val", str(n // 4), "--size", str(size), "--maxcount", str(n // 4), "--workers", "4"]


def data_check(c: Check) -> dict[str, Any]:
    shards = sorted((c.data / "shards" / "train").glob("*.tar"))
    assert shards, "no training shards written"
    return {"train_shards": len(shards)}


def pretrain_sets(c: Check, job: str, *extra: str) -> list[str]:
    return c.sets(job, "train.epochs=3", "train.warmup_epochs=1", "train.checkpoint_every=1", "train.knn_every=1",
                  "train.visualize_every=3", "ray.num_workers=1", f"train.compile={str(not c.dry).lower()}", *extra)


def pretrain_check(c: Check, job: str = "pretrain") -> dict[str, Any]:
    result = c.result(job)
    metrics, run_id = result["metrics"], result["mlflow_run_id"]
    assert math.isfinite(metrics["train_loss"]) and "knn_top1" in metrics, metrics
    figures = {"train_loss": round(metrics["train_loss"], 4), "knn_top1": metrics["knn_top1"]}
    for key in ("images_per_s", "data_wait_frac", *(() if c.dry else ("mfu",))):
        values = _history(c, run_id, key)
        assert len(values) == 3, f"{key}: {values} (one per epoch expected in MLflow)"
        figures[key] = round(values[-1], 4)
    return figures


def kill_check(c: Check) -> dict[str, Any]:
    from mae_ray.cluster.checkpoints import load_state

    result = c.result("kill")
    assert (c.out / "kill" / ".fault-kill-after_report-0-0").exists(), "the worker was not killed"
    attempts = load_state(result["checkpoint"])["attempts"]
    assert [a["start_epoch"] for a in attempts] == [0, 1], attempts  # retried from epoch 0's checkpoint
    return {"attempts": len(attempts), "train_loss": round(result["metrics"]["train_loss"], 4)}


def evaluate_command(c: Check) -> list[str]:
    checkpoint = c.result("pretrain")["checkpoint"]
    return [PY, "-m", "mae_ray", "evaluate", "--run", checkpoint,
            *c.sets("evaluate", "ray.num_workers=1", "linprobe.epochs=3", "linprobe.cache_features=true",
                    "linprobe.warmup_epochs=0", "finetune.epochs=1", "finetune.warmup_epochs=0")]


def evaluate_check(c: Check) -> dict[str, Any]:
    result = c.result("evaluate")
    assert {"linprobe_top1", "finetune_top1"} <= set(result), result
    return {k: result[k] for k in ("linprobe_top1", "finetune_top1")}


def sweep_command(c: Check) -> list[str]:
    import yaml

    base = c.out / "pretrain" / "config.yaml"
    spec = {"base": str(base), "name": "gpu-check", "output_dir": str(c.out / "sweep"),
            "overrides": {"train.epochs": 1, "train.compile": False, "train.knn_every": 1, "ray.num_workers": 0,
                          "ray.gpus_per_worker": 0.5, "ray.cpus_per_worker": 1 if c.dry else 4,
                          "linprobe.epochs": 2, "linprobe.cache_features": True, "linprobe.warmup_epochs": 0},
            "search": {"model.mask_ratio": {"grid": [0.6, 0.75]}}, "max_concurrent_trials": 2,
            "scheduler": {"type": "none"}, "finetune": False, "random_baseline": False}
    path = c.out / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return [PY, "-m", "mae_ray", "sweep", "--config", str(path)]


def sweep_check(c: Check) -> dict[str, Any]:
    import pyarrow.parquet as pq

    rows = pq.read_table(c.out / "sweep" / "gpu-check" / "sweep_results.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["finished", "finished"], rows
    return {"linprobe_top1": [r["linprobe_top1"] for r in rows]}


def bench_command(script: str, *args: str) -> Callable[[Check], list[str]]:
    def command(c: Check) -> list[str]:
        return [PY, str(ROOT / "experiments" / "benchmarks" / script), *args, *(["--dry-run"] if c.dry else []),
                "--out", str(c.out / script.replace(".py", ".json"))]

    return command


def gpu_pretrain_check(c: Check) -> dict[str, Any]:
    payload = json.loads((c.out / "gpu_pretrain.json").read_text())
    assert payload["status"] != "failed", payload.get("results")
    summary = payload.get("summary", {})
    return {k: summary[k] for k in ("best_mae", "speedup_over_hf_vitmae", "compile_speedup_mae",
                                    "mae_speedup_eager") if k in summary}


def gpu_loader_check(c: Check) -> dict[str, Any]:
    payload = json.loads((c.out / "gpu_loader.json").read_text())
    rows = {r["decode"]: r for r in payload["results"]}
    assert all("error" not in r for r in rows.values()), rows
    return {f"{mode}_{k}": r[k] for mode, r in rows.items() for k in ("images_per_s", "gpu_busy_frac")}


STEPS = [
    Step("data", "demo JPEG shards", 90, data_command, data_check),
    Step("pretrain", "pre-training on Ray Train: GPU, bf16, torch.compile, kNN monitor", 180,
         lambda c: [PY, "-m", "mae_ray", "pretrain", *pretrain_sets(c, "pretrain")], pretrain_check),
    Step("kill", "its worker SIGKILLed after epoch 1's checkpoint, Ray Train retries", 150,
         lambda c: [PY, "-m", "mae_ray", "pretrain", *pretrain_sets(c, "kill", "train.epochs=2", "train.compile=false",
                                                                     "ray.failure_max_retries=1")],
         kill_check, env={"MAE_RAY_FAULTS": "kill:rank=0:after_report=0"}),
    Step("evaluate", "linear probe and fine-tuning on CUDA", 150, evaluate_command, evaluate_check),
    Step("sweep", "two trials sharing the GPU (0.5 each)", 150, sweep_command, sweep_check),
    Step("gpu_pretrain", "ours eager/compiled vs transformers' ViTMAE, mask token in encoder", 200,
         bench_command("gpu_pretrain.py", "--peer", "--baseline", "--time-budget-s", "150"), gpu_pretrain_check),
    Step("gpu_loader", "the real loader, 14 processes: CPU vs GPU decoding", 150,
         bench_command("gpu_loader.py", "--shards", "{data}"), gpu_loader_check),
]


# --------------------------------------------------------------------------- running them
def run_step(step: Step, c: Check, deadline: float) -> dict[str, Any]:
    row: dict[str, Any] = {"step": step.name, "what": step.what}
    left = deadline - time.monotonic()
    if left < 10:
        return {**row, "status": "skipped", "error": "the check's time budget is spent"}
    limit = min(step.limit_s, left)
    log = c.out / "logs" / f"{step.name}.log"
    start = time.monotonic()
    try:
        command = [a.replace("{data}", str(c.data / "shards" / "train")) for a in step.command(c)]
    except Exception as e:  # e.g. an earlier step's result missing
        return {**row, "status": "failed", "error": f"not started: {_first_line(e)}"}
    with open(log, "w") as f:
        f.write("$ " + " ".join(command) + "\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **step.env, "PYTHONPATH": str(ROOT)})
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the step and everything it started (its Ray, its loaders)
            proc.wait()
            return {**row, "status": "timed out", "seconds": round(time.monotonic() - start, 1),
                    "error": f"no end after {limit:.0f} s (log: {log})"}
    row["seconds"] = round(time.monotonic() - start, 1)
    if code != 0:
        return {**row, "status": "failed", "error": f"exit {code}: {_last_error(log)}"}
    try:
        return {**row, "status": "passed", "figures": step.check(c)}
    except Exception as e:
        return {**row, "status": "failed", "error": f"ran, but {_first_line(e)}"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _last_error(log: Path) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "Error" in ln]
    return (errors or lines or ["(no output)"])[-1][:300]


def write_report(c: Check, rows: list[dict], meta: dict) -> None:
    (c.out / "gpu_check.json").write_text(json.dumps({**meta, "steps": rows}, indent=2))
    lines = [f"# GPU check {meta['started']} ({'dry run, CPU' if c.dry else meta.get('device', '')})", "",
             "| step | what | status | seconds | figures / error |", "|---|---|---|---:|---|"]
    for r in rows:
        detail = json.dumps(r["figures"]) if r.get("figures") else r.get("error", "")
        lines.append(f"| {r['step']} | {r['what']} | {r['status']} | {r.get('seconds', '')} | {detail} |")
    (c.out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu_check"), help="results folder (default $OUT)")
    p.add_argument("--budget-s", type=float, default=480, help="the whole check's time box (default 8 min)")
    p.add_argument("--steps", default=",".join(s.name for s in STEPS), help="comma-separated subset, in order")
    p.add_argument("--dry-run", action="store_true", help="tiny, on the CPU: the code paths, not the speed")
    args = p.parse_args(argv)
    c = Check(Path(args.out).resolve(), args.dry_run)
    (c.out / "logs").mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "dry_run": c.dry,
                            "command": " ".join([PY, *sys.argv])}
    if not c.dry:
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device: run this on the GPU machine, or check it here with --dry-run",
                  file=sys.stderr)
            return 2
        meta["device"] = f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, {os.cpu_count()} CPUs"
    wanted = args.steps.split(",")
    deadline, rows = time.monotonic() + args.budget_s, []
    for step in (s for s in STEPS if s.name in wanted):
        row = run_step(step, c, deadline)
        rows.append(row)
        print(f"[gpu_check] {row['step']}: {row['status']} {row.get('seconds', '')} s "
              f"{row.get('figures') or row.get('error', '')}", flush=True)
        write_report(c, rows, meta)
    print(f"[gpu_check] results: {c.out / 'gpu_check.md'}, {c.out / 'gpu_check.json'}")
    return 0 if all(r["status"] == "passed" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
