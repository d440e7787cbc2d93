"""Pre-training fed by the real loader from JPEG shards on local disk: CPU decoding vs GPU decoding.

The training step is a job's (``engine.train_one_epoch``, bf16, fused AdamW; ``pretrain.on_device``), the
batches come from ``make_train_loader`` with ``--workers`` loader processes, either decoding and cropping in
those processes (``data.decode: cpu``) or shipping the JPEG bytes for the training process to decode and crop
on the GPU (``data.decode: gpu``, ``mae_ray/data/device_decode.py``). Per mode: one warm-up epoch, then the
median of ``--repeats`` epochs of ``--steps`` steps: images/s, and the share of each epoch the step spent
waiting for its batch (``data_wait_frac``); the GPU's busy fraction is 1 minus that (each step ends with
``loss.item()``, so the GPU is idle while the host waits). With a synthetic batch already on the device
(``gpu_pretrain.py``) as the ceiling, this says whether the data path keeps up.

    python experiments/benchmarks/gpu_loader.py --shards DIR          # ViT-B/16, batch 256, 14 workers
    python experiments/benchmarks/gpu_loader.py --shards DIR --dry-run  # CPU, micro model: the code paths
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from mae_ray.data.loader import make_train_loader
from mae_ray.data.transforms import build_transform
from mae_ray.jobs.pretrain import on_device
from mae_ray.model.mae import MaskedAutoencoderViT
from mae_ray.model.presets import resolve_model_kwargs
from mae_ray.train import engine, optim, recipe


def run_mode(args, decode: str, device: torch.device) -> dict:
    kwargs = resolve_model_kwargs(args.model, {})
    size = kwargs["img_size"]
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**kwargs).to(device)
    epochs = args.repeats + 1
    plan = engine.StepPlan(args.steps, 1, epochs, warmup_epochs=1)
    optimizer = optim.pretrain_optimizer(model, recipe.Batching(args.batch, 1, 1).lr(1.5e-4), 0.05, device)
    scheduler = optim.build_scheduler(optimizer, plan, 0.0)
    precision = engine.Precision(args.amp, device)
    loader = make_train_loader(args.shards, batch_size=args.batch, num_workers=args.workers,
                               transform=build_transform("pretrain", size, normalize=False),
                               samples_per_epoch=args.batch * args.steps, raw=decode == "gpu",
                               pin_memory=device.type == "cuda" and decode == "cpu")
    rows = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches = on_device(loader, device, size, decode == "gpu")
        m = engine.train_one_epoch(model, batches, optimizer, scheduler, precision, epoch=epoch, plan=plan,
                                   mask_ratio=0.75, device=device)
        rows.append(m)
    timed = rows[1:]  # the first epoch starts the loader processes
    return {"decode": decode, "images_per_s": round(statistics.median(r["images_per_s"] for r in timed), 1),
            "data_wait_frac": round(statistics.median(r["data_wait_frac"] for r in timed), 3),
            "gpu_busy_frac": round(1 - statistics.median(r["data_wait_frac"] for r in timed), 3),
            "skipped": loader.skipped}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", required=True, help="JPEG tar shards (a folder, pattern or list)")
    p.add_argument("--model", default=None, help="preset (default mae_vit_base_patch16; dry run: micro)")
    p.add_argument("--batch", type=int, default=None, help="images per step (default 256; dry run: 8)")
    p.add_argument("--steps", type=int, default=None, help="steps per timed epoch (default 30; dry run: 2)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=14, help="loader processes (dry run: 1)")
    p.add_argument("--modes", default="cpu,gpu", help="comma-separated decode modes")
    p.add_argument("--amp", default="bf16")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_loader.json"))
    p.add_argument("--dry-run", action="store_true", help="CPU, micro model: the code paths, not the speed")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.model = args.model or ("mae_vit_micro_patch4" if dry else "mae_vit_base_patch16")
    args.batch, args.steps = args.batch or (8 if dry else 256), args.steps or (2 if dry else 30)
    if dry:
        args.workers, device = min(args.workers, 1), torch.device("cpu")
    elif not torch.cuda.is_available():
        print("error: no CUDA device: this benchmark needs a GPU (check it on CPU with --dry-run)", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        engine.configure_cuda()
    results, start = [], time.perf_counter()
    for mode in args.modes.split(","):
        try:
            row = run_mode(args, mode, device)
        except Exception as e:  # one mode failing is a result; the other still runs
            row = {"decode": mode, "status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
        results.append(row)
        print(f"[{time.perf_counter() - start:6.1f} s] decode={mode}: {row}", flush=True)
    payload = {"command": "python " + " ".join(sys.argv), "model": args.model, "batch": args.batch,
               "workers": args.workers, "device": str(device), "results": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print("\n| decode | images/s | data wait | GPU busy |\n|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['decode']} | {r.get('images_per_s', '-')} | {r.get('data_wait_frac', '-')} | "
              f"{r.get('gpu_busy_frac', '-')} |")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
