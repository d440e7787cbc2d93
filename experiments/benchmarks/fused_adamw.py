"""AdamW's three CPU implementations on the quickstart's model: the per-tensor loop (torch's CPU default), foreach,
and the fused kernel (what ``train/optim.fused`` picks, on CPU too since 2026-12-07). One pre-training update at
a time (forward, backward, optimiser step), one torch thread as a quickstart trial has, the three alternated in
rounds; the median of each part's time per update.
Usage: ``python experiments/benchmarks/fused_adamw.py [--rounds 3] [--steps 30]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from timm.optim import param_groups_weight_decay

from mae_ray.model.presets import resolve_model_kwargs
from mae_ray.model.weights import build_mae

KINDS = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def one(model, images, kind: str, steps: int, warm: int = 5) -> dict[str, float]:
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-3, betas=(0.9, 0.95), **KINDS[kind])
    parts = {"forward": [], "backward": [], "step": []}
    for i in range(warm + steps):
        t0 = time.perf_counter()
        loss, _, _ = model(images, mask_ratio=0.75)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if i >= warm:
            for part, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                parts[part].append(dt)
    return {part: statistics.median(v) * 1e3 for part, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mae_vit_tiny_patch4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_mae(resolve_model_kwargs(args.model))
    images = torch.randn(args.batch, 3, model.patch_embed.img_size[0], model.patch_embed.img_size[1])
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in KINDS}
    for _ in range(args.rounds):
        for kind in KINDS:
            runs[kind].append(one(model, images, kind, args.steps))
    print(f"| AdamW on CPU ({args.model}, batch {args.batch}, 1 thread) | forward ms | backward ms | step ms |"
          " update ms | update / loop |")
    print("|---|---:|---:|---:|---:|---:|")
    total = {k: statistics.median(sum(r.values()) for r in v) for k, v in runs.items()}
    for kind, rows in runs.items():
        med = {part: statistics.median(r[part] for r in rows) for part in rows[0]}
        print(f"| {kind} | {med['forward']:.1f} | {med['backward']:.1f} | {med['step']:.1f} | {total[kind]:.1f} "
              f"| {total[kind] / total['loop']:.3f} |")


if __name__ == "__main__":
    main()
