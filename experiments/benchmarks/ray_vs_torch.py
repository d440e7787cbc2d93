"""Ray Train with one worker vs the same training loop in plain PyTorch, measured in the same run.

Both sides train the same model on the demo dataset's tar shards with the same config: the same
``make_train_loader`` settings, batch, steps per epoch, seeds, torch threads and optimiser.

  plain PyTorch  in this process: what ``pretrain.train_loop`` builds (model, loader, AdamW, schedule),
                 then ``engine.train_one_epoch`` per epoch, with no Ray, no MLflow, no checkpoints;
  Ray Train      ``mae_ray.jobs.pretrain.run(cfg)`` with ``ray.num_workers=1`` on a private local Ray that
                 this script starts before and shuts down after each run; per-epoch figures come from
                 the run's MLflow history (``images_per_s``, and the log timestamps for epoch wall time).

Steady state only: epoch 0 (loader start, allocator and thread-pool warm-up) is left out of every
run, and the last Ray epoch's wall time too (it writes the one checkpoint). The two sides run
interleaved, A B B A ..., so that drift in a shared machine's load hits both. Two throughputs:
``train_one_epoch``'s own images/s (the loop alone) and images / wall time between the ends of
consecutive epochs (also Ray's report and the MLflow write). Because the wall clock of a shared
machine is noisy, CPU time is also sampled from /proc (every 0.5 s) and split over the same steady
epochs into: the training process and its loader workers; Ray's own processes (raylet, GCS, Train
controller, ...); this driver; and everything else on the machine (other users' load).

Time to first step: wall time from starting ``python -m mae_ray pretrain ...`` until rank 0 prints
its "[pretrain] N worker(s), ... fresh start" line (model, loader and optimiser built, right before
the epoch loop; relayed to the driver's console by Ray), vs ``python -c`` importing torch and
building the same model, optimiser and loader ("ready"), then fetching the first batch. Example:

    python experiments/benchmarks/ray_vs_torch.py                 # defaults: ~7 minutes on 2 busy cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")  # our private heads stop at once
os.environ.pop("RAY_ADDRESS", None)  # never join someone else's cluster

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data_tools.demo_data import build_demo_dataset  # noqa: E402
from mae_ray.config import Config, load_config  # noqa: E402
from mae_ray.data.loader import make_train_loader  # noqa: E402
from mae_ray.model.mae import MaskedAutoencoderViT  # noqa: E402
from mae_ray.train import engine, optim, recipe  # noqa: E402

READY_LINE = re.compile(r"\[pretrain\] \d+ worker\(s\).*(fresh start|resumed from)")

PLAIN_STARTUP = """
import json, sys, time
t0 = time.perf_counter()
import torch
from mae_ray.train import optim
from mae_ray.data.loader import make_train_loader
from mae_ray.model.mae import build_model
p = json.loads(sys.argv[1])
torch.set_num_threads(p["threads"])
torch.manual_seed(0)
model = build_model(p["model"], img_size=p["img_size"], norm_pix_loss=True)
optimizer = optim.pretrain_optimizer(model, 1e-4, 0.05, torch.device("cpu"))
loader = make_train_loader(p["shards"], batch_size=p["batch"], transform="pretrain", img_size=p["img_size"],
                           num_workers=p["loader_workers"], samples_per_epoch=p["samples"], seed=0,
                           shuffle_buffer=p["shuffle_buffer"])
print("READY", flush=True)
imgs, _ = next(iter(loader))
print("FIRST_BATCH", tuple(imgs.shape), flush=True)
"""


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="demo dataset folder (built if missing)")
    parser.add_argument("--workdir", type=Path, default=None, help="outputs, MLflow db (default: a temp dir)")
    parser.add_argument("--num-train", type=int, default=2560, help="demo training images")
    parser.add_argument("--model", default="mae_vit_tiny_patch4")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples-per-epoch", type=int, default=768)
    parser.add_argument("--epochs", type=int, default=5, help="per run; epoch 0 is not counted")
    parser.add_argument("--repeats", type=int, default=4, help="plain/Ray pairs, interleaved A B, B A, ...")
    parser.add_argument("--threads", type=int, default=1, help="torch threads = ray.cpus_per_worker")
    parser.add_argument("--loader-workers", type=int, default=1, help="DataLoader processes (data.num_workers)")
    parser.add_argument("--shuffle-buffer", type=int, default=500)
    parser.add_argument("--ray-cpus", type=int, default=None, help="num_cpus of the private Ray (default: cores)")
    parser.add_argument("--startup-repeats", type=int, default=2, help="0: skip the time-to-first-step part")
    parser.add_argument("--startup-timeout", type=float, default=300)
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error("--epochs must be >= 3 (epoch 0 and the checkpointing last epoch are not counted for wall time)")
    return args


# --------------------------------------------------------------------------- setup
def machine_info() -> str:
    import ray

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = ""
    with contextlib.suppress(OSError, StopIteration, ValueError), open("/proc/meminfo") as f:
        mem = f", {int(next(ln for ln in f if ln.startswith('MemTotal')).split()[1]) / 2**20:.0f} GiB RAM"
    return (f"CPU {cpu}, {cores} usable cores{mem}; python {platform.python_version()}, torch {torch.__version__}, "
            f"ray {ray.__version__}; load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


def overrides(args, data: dict, workdir: Path, name: str, **extra) -> list[str]:
    """The ``--set`` list that both sides' config is built from."""
    values = {
        "model.name": args.model, "model.img_size": args.img_size, "model.norm_pix_loss": True,
        "data.train_shards": data["train"], "data.val_shards": data["val"],
        "data.num_workers": args.loader_workers, "data.samples_per_epoch": args.samples_per_epoch,
        "data.shuffle_buffer": args.shuffle_buffer,
        "train.batch_size": args.batch, "train.epochs": args.epochs, "train.warmup_epochs": 1,
        "train.checkpoint_every": args.epochs, "train.visualize_every": 0,
        "ray.num_workers": 1, "ray.cpus_per_worker": args.threads,
        "mlflow.tracking_uri": f"sqlite:///{workdir}/mlflow.db", "mlflow.experiment": "ray-vs-torch",
        "mlflow.run_name": name, "output_dir": str(workdir / name),
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


# --------------------------------------------------------------------------- CPU accounting
_TICK = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:  # the process has exited
        return ""


class CpuMonitor(threading.Thread):
    """Cumulative CPU seconds, sampled every ``interval`` s, of this process (``driver``), of its
    descendants under a Ray Train worker (``training``: the worker and its DataLoader processes), of
    its other descendants (``children``: Ray's daemons and actors, or plain PyTorch's loader workers)
    and of the whole machine (``machine``). Each process counts with its reaped children
    (cutime + cstime), so the loader workers that end with every epoch are not lost."""

    def __init__(self, interval: float = 0.5):
        super().__init__(daemon=True)
        self.interval, self.samples = interval, []
        self._done = threading.Event()

    def _walk(self, pid: int, kind: str, totals: dict[str, float]) -> None:
        stat = _read(f"/proc/{pid}/stat")
        if not stat:
            return
        if kind == "children" and _read(f"/proc/{pid}/cmdline").startswith("ray::RayTrainWorker"):
            kind = "training"
        fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
        totals[kind] += sum(int(x) for x in fields[11:15]) / _TICK  # utime, stime, cutime, cstime
        children = set()
        for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
            children.update(_read(f"/proc/{pid}/task/{task}/children").split())
        for child in children:
            self._walk(int(child), "children" if kind == "driver" else kind, totals)

    def sample(self) -> tuple[float, dict[str, float]]:
        totals = {"driver": 0.0, "training": 0.0, "children": 0.0}
        self._walk(os.getpid(), "driver", totals)
        cpu = [int(x) for x in _read("/proc/stat").split("\n", 1)[0].split()[1:]]
        totals["machine"] = (sum(cpu[:8]) - cpu[3] - cpu[4]) / _TICK  # all but idle and iowait
        return time.time(), totals

    def run(self) -> None:
        while not self._done.is_set():
            self.samples.append(self.sample())
            self._done.wait(self.interval)

    def finish(self) -> CpuMonitor:
        self._done.set()
        self.join()
        self.samples.append(self.sample())
        return self

    def at(self, t: float) -> dict[str, float]:
        """Cumulative values at wall time ``t``, interpolated between samples."""
        times = [x for x, _ in self.samples]
        i = max(1, min(len(times) - 1, next((k for k, x in enumerate(times) if x >= t), len(times) - 1)))
        (t0, a), (t1, b) = self.samples[i - 1], self.samples[i]
        w = 0.0 if t1 == t0 else min(1.0, max(0.0, (t - t0) / (t1 - t0)))
        return {k: a[k] + w * (b[k] - a[k]) for k in a}


def cpu_split(monitor: CpuMonitor, t0: float, t1: float, images: int, ray: bool) -> dict[str, float]:
    """CPU of the window [t0, t1]: ms per image by consumer, and cores busy elsewhere on the machine."""
    a, b = monitor.at(t0), monitor.at(t1)
    d = {k: b[k] - a[k] for k in a}
    ours = d["driver"] + d["training"] + d["children"]
    split = {
        "training": d["training"] if ray else d["driver"] + d["children"],
        "ray": d["children"] if ray else 0.0,
        "driver": d["driver"] if ray else 0.0,
    }
    out = {f"{k}_ms_per_image": 1e3 * v / images for k, v in split.items()}
    out["other_cores"] = max(0.0, d["machine"] - ours) / (t1 - t0)
    return out


# --------------------------------------------------------------------------- the two sides
def plain_run(cfg: Config) -> list[dict]:
    """``pretrain.train_loop``'s setup and epoch loop for rank 0 of 1, in this process, without Ray."""
    device = torch.device("cpu")
    torch.set_num_threads(max(1, int(cfg.ray.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    model = MaskedAutoencoderViT(**cfg.model.kwargs())
    loader = make_train_loader(
        cfg.data.train_shards, batch_size=cfg.train.batch_size, transform="pretrain",
        img_size=model.patch_embed.img_size[0], rank=0, world_size=1,
        num_workers=cfg.data.num_workers, samples_per_epoch=cfg.data.samples_per_epoch,
        seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
    )
    plan = engine.StepPlan(len(loader), cfg.train.accum_iter, cfg.train.epochs, cfg.train.warmup_epochs)
    lr = cfg.train.lr if cfg.train.lr is not None else recipe.for_job(cfg, "pretrain", 1).lr(
        cfg.train.blr)
    optimizer = optim.pretrain_optimizer(model.to(device), lr, cfg.train.weight_decay, device)
    scheduler = optim.build_scheduler(optimizer, plan, cfg.train.min_lr)
    precision = engine.Precision(cfg.train.amp, device)
    rows, last = [], time.perf_counter()
    for epoch in range(cfg.train.epochs):
        loader.set_epoch(epoch)
        torch.manual_seed(hash((cfg.train.seed, epoch, 0)) % 2**31)  # as train_loop does
        m = engine.train_one_epoch(model, loader, optimizer, scheduler, precision, epoch=epoch, plan=plan,
                                   mask_ratio=cfg.model.mask_ratio, device=device)
        now = time.perf_counter()
        rows.append({"epoch": epoch, "images_per_s": m["images_per_s"], "train_loss": m["train_loss"],
                     "images": m["batches"] * cfg.train.batch_size, "wall_s": now - last, "end": time.time()})
        last = now
    return rows


def ray_run(cfg: Config, num_cpus: int) -> list[dict]:
    """``pretrain.run`` on a private local Ray (started here, shut down here); per-epoch rows from MLflow."""
    import ray
    from mlflow import MlflowClient

    from mae_ray.cluster.launch import init_ray
    from mae_ray.jobs import pretrain

    if not init_ray(num_cpus=num_cpus):
        raise RuntimeError("Ray was already initialised in this process; refusing to share it")
    try:
        summary = pretrain.run(cfg)
    finally:
        ray.shutdown()
    client = MlflowClient(cfg.mlflow.tracking_uri)
    hist = {k: {m.step: m for m in client.get_metric_history(summary["mlflow_run_id"], k)}
            for k in ("images_per_s", "train_loss")}
    rows, steps = [], sorted(hist["images_per_s"])
    per_epoch = (cfg.data.samples_per_epoch // cfg.train.batch_size) * cfg.train.batch_size
    for e in steps:
        m = hist["images_per_s"][e]
        prev = hist["images_per_s"].get(e - 1)
        rows.append({"epoch": e, "images_per_s": m.value, "train_loss": hist["train_loss"][e].value,
                     "images": per_epoch, "wall_s": (m.timestamp - prev.timestamp) / 1e3 if prev else None,
                     "end": m.timestamp / 1e3})
    return rows


def steady(rows: list[dict], key: str, drop_last: bool = False) -> list[float]:
    """Values of epochs 1.. (and not the last, for wall times that include the final checkpoint)."""
    kept = rows[1:-1] if drop_last else rows[1:]
    if key == "wall":
        return [r["images"] / r["wall_s"] for r in kept if r["wall_s"]]
    return [r[key] for r in kept]


# --------------------------------------------------------------------------- time to first step
def timed_subprocess(cmd: list[str], markers: dict[str, re.Pattern], timeout: float, log: Path) -> dict:
    """Start ``cmd``; seconds until each marker's first line, and until exit. Output goes to ``log``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    found: dict[str, float] = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
    try:
        with open(log, "w") as out:
            for line in proc.stdout:
                out.write(line)
                for name, pattern in markers.items():
                    if name not in found and pattern.search(line):
                        found[name] = time.perf_counter() - start
                if time.perf_counter() - start > timeout:
                    raise TimeoutError(f"{cmd[:3]} ran over {timeout:g} s; log: {log}")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:  # only on timeout or error: stop the one process we started
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {**found, "exit_s": time.perf_counter() - start, "rc": proc.returncode}


def startup_commands(args, data: dict, workdir: Path, i: int) -> dict[str, list[str]]:
    sets = overrides(args, data, workdir, f"startup_{i}", **{"train.epochs": 1, "train.max_steps_per_epoch": 2,
                                                               "train.checkpoint_every": 1})
    ray_cmd = [sys.executable, "-m", "mae_ray", "pretrain"] + [x for s in sets for x in ("--set", s)]
    params = {"threads": args.threads, "model": args.model, "img_size": args.img_size, "shards": data["train"],
              "batch": args.batch, "loader_workers": args.loader_workers, "samples": args.samples_per_epoch,
              "shuffle_buffer": args.shuffle_buffer}
    return {"plain": [sys.executable, "-c", PLAIN_STARTUP, json.dumps(params)], "ray": ray_cmd}


# --------------------------------------------------------------------------- report
def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    args = parse_args()
    from mae_ray.cli import quiet_logs

    quiet_logs(False)
    print("command: python " + shlex.join(sys.argv), flush=True)
    print("machine: " + machine_info(), flush=True)
    num_cpus = args.ray_cpus or len(os.sched_getaffinity(0))
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ray_vs_torch_")
        args.workdir = Path(tmp.name)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = build_demo_dataset(args.data or workdir / "demo", num_train=args.num_train, num_val=256,
                              size=args.img_size, seed=0, maxcount=500)
    print(f"demo data: {data['num_train']} train images at {args.img_size} px in {data['train']} "
          f"({time.perf_counter() - started:.1f} s); model {args.model}, batch {args.batch}, "
          f"{args.samples_per_epoch // args.batch} steps/epoch, {args.epochs} epochs/run, {args.threads} torch "
          f"thread(s), {args.loader_workers} loader worker(s); private Ray with {num_cpus} CPUs", flush=True)

    # ---- steady-state throughput, interleaved A B, B A, ...
    runs: dict[str, list[list[dict]]] = {"plain": [], "ray": []}
    walls: dict[str, list[float]] = {"plain": [], "ray": []}
    cpu: dict[str, list[dict]] = {"plain": [], "ray": []}
    for rep in range(args.repeats):
        for side in ("plain", "ray") if rep % 2 == 0 else ("ray", "plain"):
            cfg = load_config(None, overrides(args, data, workdir, f"{side}_{rep}"))
            t0, monitor = time.perf_counter(), CpuMonitor()
            monitor.start()
            try:
                rows = plain_run(cfg) if side == "plain" else ray_run(cfg, num_cpus)
            finally:
                monitor.finish()
            walls[side].append(time.perf_counter() - t0)
            runs[side].append(rows)
            last = rows[-2] if side == "ray" else rows[-1]  # Ray's last epoch writes the checkpoint
            images = sum(r["images"] for r in rows[1 : rows.index(last) + 1])
            cpu[side].append(cpu_split(monitor, rows[0]["end"], last["end"], images, side == "ray"))
            print(f"[repeat {rep + 1}] {side:>5}: img/s per epoch "
                  + ", ".join(f"{r['images_per_s']:.1f}" for r in rows)
                  + "; epoch wall s " + ", ".join("-" if r["wall_s"] is None else f"{r['wall_s']:.2f}" for r in rows)
                  + f"; loss epoch 0 {rows[0]['train_loss']:.4f}, last {rows[-1]['train_loss']:.4f}"
                  + f"; whole run {walls[side][-1]:.1f} s; steady CPU ms/img "
                  + ", ".join(f"{k.removesuffix('_ms_per_image')} {v:.2f}" for k, v in cpu[side][-1].items()
                              if k.endswith("_ms_per_image"))
                  + f", other load {cpu[side][-1]['other_cores']:.2f} cores", flush=True)

    # ---- time to first step, interleaved
    startup: dict[str, list[dict]] = {"plain": [], "ray": []}
    markers = {"plain": {"ready": re.compile(r"^READY"), "first_batch": re.compile(r"^FIRST_BATCH")},
               "ray": {"ready": READY_LINE}}
    for i in range(args.startup_repeats):
        cmds = startup_commands(args, data, workdir, i)
        for side in ("plain", "ray") if i % 2 == 0 else ("ray", "plain"):
            res = timed_subprocess(cmds[side], markers[side], args.startup_timeout, workdir / f"startup_{side}_{i}.log")
            startup[side].append(res)
            print(f"[startup {i + 1}] {side:>5}: " + ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}"
                                                            for k, v in res.items()), flush=True)
            if res["rc"] != 0 or "ready" not in res:
                print(f"warning: {side} startup run did not finish cleanly; see {workdir}/startup_{side}_{i}.log")
    if args.startup_repeats:
        print("startup commands:\n  " + shlex.join(cmds["ray"]) + "\n  " + shlex.join(cmds["plain"][:2])
              + " '<script>' " + shlex.quote(cmds["plain"][3]))

    # ---- table
    def all_steady(side: str, key: str, drop_last: bool = False) -> list[float]:
        return [v for rows in runs[side] for v in steady(rows, key, drop_last)]

    loop = {s: med(all_steady(s, "images_per_s")) for s in runs}
    wall = {s: med(all_steady(s, "wall", drop_last=(s == "ray"))) for s in runs}
    paired = list(zip(runs["plain"], runs["ray"], strict=True))
    pairs = [med(steady(r, "images_per_s")) / med(steady(p, "images_per_s")) for p, r in paired]
    wall_pairs = [med(steady(r, "wall", True)) / med(steady(p, "wall")) for p, r in paired]
    best = {s: max(all_steady(s, "images_per_s")) for s in runs}
    print("\n| measure | plain PyTorch | Ray Train, 1 worker | Ray / plain |\n|---|---|---|---|")
    print(f"| img/s, train_one_epoch (median of {len(all_steady('plain', 'images_per_s'))} / "
          f"{len(all_steady('ray', 'images_per_s'))} steady epochs) | {loop['plain']:.1f} | {loop['ray']:.1f} "
          f"| {loop['ray'] / loop['plain']:.1%} |")
    print(f"| img/s, train_one_epoch, per repeat pair (median {med(pairs):.1%}) | | "
          f"| {', '.join(f'{x:.1%}' for x in pairs)} |")
    print(f"| img/s, best steady epoch | {best['plain']:.1f} | {best['ray']:.1f} | {best['ray'] / best['plain']:.1%} |")
    print(f"| img/s, epoch-end to epoch-end wall (Ray: + report + MLflow log) | {wall['plain']:.1f} "
          f"| {wall['ray']:.1f} | {wall['ray'] / wall['plain']:.1%} |")
    print(f"| same, per repeat pair (median {med(wall_pairs):.1%}) | | | {', '.join(f'{x:.1%}' for x in wall_pairs)} |")
    def cpu_col(side: str, key: str) -> str:
        vals = [c[key] for c in cpu[side]]
        return f"{med(vals):.2f} ({', '.join(f'{v:.2f}' for v in vals)})"

    for key, what in (("training", "training process + its loader workers"), ("ray", "Ray's own processes"),
                      ("driver", "driver process")):
        print(f"| CPU ms per image, {what} (median of runs) | {cpu_col('plain', key + '_ms_per_image')} "
              f"| {cpu_col('ray', key + '_ms_per_image')} | |")
    print(f"| other load on the machine during the steady epochs, cores | {cpu_col('plain', 'other_cores')} "
          f"| {cpu_col('ray', 'other_cores')} | |")
    loss0 = {s: [rows[0]["train_loss"] for rows in runs[s]] for s in runs}
    print(f"| loss after epoch 0 (same seeds) | {', '.join(f'{x:.4f}' for x in loss0['plain'])} "
          f"| {', '.join(f'{x:.4f}' for x in loss0['ray'])} | |")
    print(f"| whole {args.epochs}-epoch run, s (Ray: + start/stop Ray, MLflow run, checkpoint) "
          f"| {med(walls['plain']):.1f} | {med(walls['ray']):.1f} | +{med(walls['ray']) - med(walls['plain']):.1f} s |")
    if args.startup_repeats:
        def col(side: str, key: str) -> str:
            vals = [r[key] for r in startup[side] if key in r]
            return f"{med(vals):.1f} ({', '.join(f'{v:.1f}' for v in vals)})" if vals else "-"

        ready_p = med([r["ready"] for r in startup["plain"] if "ready" in r])
        ready_r = med([r["ready"] for r in startup["ray"] if "ready" in r])
        print(f"| command to 'ready' (model, optimiser, loader built), s | {col('plain', 'ready')} "
              f"| {col('ray', 'ready')} | +{ready_r - ready_p:.1f} s |")
        print(f"| command to first batch, s | {col('plain', 'first_batch')} | - | |")
        print(f"| command to exit, s (Ray: 1 epoch of 2 steps, checkpoint, Ray shutdown) | {col('plain', 'exit_s')} "
              f"| {col('ray', 'exit_s')} | |")
    print("\nload average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
          + f"; whole benchmark {time.perf_counter() - started:.0f} s")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
