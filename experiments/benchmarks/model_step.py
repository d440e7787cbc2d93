"""Forward + backward speed of MAE vs the "mask token in encoder" baseline (paper Table 1c), same run.

Both variants of one preset are built side by side and timed in interleaved repeats (A B B A ...,
so slow drift of a noisy machine hits both alike); medians are reported. The measured speed-up is
printed beside the one predicted from matmul FLOPs, counted two ways:

  analytic  mae_ray.model.flops.train_flops_per_image: per block 2 * tokens * (linear weights) + 4 * tokens^2
            * width (QK^T and AV), plus the patch embedding, decoder embedding (encoder tokens), decoder
            blocks and prediction head (1 + L tokens); forward + backward = 3 x forward, less the patch
            embedding's input gradient;
  counted   torch.utils.flop_counter.FlopCounterMode on one step (with timm's fused attention switched
            off for that step, since the counter does not see the CPU flash-attention kernel).

The AdamW step is timed on its own: it is the same for both variants. Examples:

    python experiments/benchmarks/model_step.py --model mae_vit_large_patch16 --batch 4 --steps 3 --warmup 1
    python experiments/benchmarks/model_step.py --model mae_vit_base_patch16 --batch 8 --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shlex
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mae_ray.model.flops import encoder_tokens, set_fused_attention, train_flops_per_image
from mae_ray.model.mae import build_model
from mae_ray.model.presets import resolve_model_kwargs

VARIANTS = {"mae": False, "mask-token-in-encoder": True}  # name -> mask_token_in_encoder


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16", help="preset name (mae_ray.model.presets)")
    parser.add_argument("--img-size", type=int, default=None, help="default: the preset's")
    parser.add_argument("--decoder-depth", type=int, default=None, help="default: the preset's")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--steps", type=int, default=3, help="timed fwd+bwd steps per variant per repeat")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of both variants")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant (after the counted one)")
    parser.add_argument("--opt-steps", type=int, default=3, help="timed AdamW steps (after one untimed)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def machine_info(device: str) -> str:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = f"CPU {cpu}, {cores} usable cores; torch {torch.__version__}, {torch.get_num_threads()} threads"
    info += "; load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if device == "cuda":
        info += f"; GPU {torch.cuda.get_device_name()}"
    return info


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(model: nn.Module, imgs: torch.Tensor, args: argparse.Namespace) -> None:
    model.zero_grad(set_to_none=True)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext()
    with autocast:
        loss = model(imgs, mask_ratio=args.mask_ratio)[0]
    loss.backward()
    sync(args.device)


def counted_flops(model: nn.Module, imgs: torch.Tensor, args: argparse.Namespace) -> float:
    """FlopCounterMode total of one forward + backward, per image (unfused attention, so it is seen)."""
    set_fused_attention(model, False)
    try:
        with FlopCounterMode(display=False) as counter:
            fwd_bwd(model, imgs, args)
    finally:
        set_fused_attention(model, True)
    return counter.get_total_flops() / imgs.shape[0]


def time_optimizer(model: nn.Module, imgs: torch.Tensor, args: argparse.Namespace) -> float:
    """Median seconds of one AdamW step over all of the model's parameters."""
    fwd_bwd(model, imgs, args)
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05, fused=args.device == "cuda")
    opt.step()  # allocates the moments
    times = []
    for _ in range(args.opt_steps):
        sync(args.device)
        start = time.perf_counter()
        opt.step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    del opt
    return statistics.median(times)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print("command: python " + shlex.join(sys.argv))
    print("machine: " + machine_info(args.device))

    overrides = {"img_size": args.img_size, "decoder_depth": args.decoder_depth}
    kwargs = {
        name: resolve_model_kwargs(args.model, {**overrides, "mask_token_in_encoder": flag})
        for name, flag in VARIANTS.items()
    }
    models = {name: build_model(args.model, **kw).to(args.device).train() for name, kw in kwargs.items()}
    mae = models["mae"]
    size = mae.patch_embed.img_size[0]
    imgs = torch.randn(args.batch, mae.in_chans, size, size, device=args.device)
    params = sum(p.numel() for p in mae.parameters()) / 1e6
    print(
        f"model: {args.model}, {size} px, {mae.patch_embed.num_patches} patches, decoder depth "
        f"{len(mae.decoder_blocks)}, {params:.1f} M parameters; batch {args.batch}, mask ratio {args.mask_ratio}, "
        f"{args.dtype} on {args.device}; {args.repeats} repeats x {args.steps} timed steps per variant"
    )

    flops = {n: train_flops_per_image(kw, args.mask_ratio) for n, kw in kwargs.items()}
    counted = {n: counted_flops(m, imgs, args) for n, m in models.items()}  # also the first warm-up step
    for model in models.values():
        for _ in range(args.warmup):
            fwd_bwd(model, imgs, args)

    times: dict[str, list[float]] = {n: [] for n in models}
    cpu_times: dict[str, list[float]] = {n: [] for n in models}  # process CPU seconds, all threads
    for rep in range(args.repeats):
        order = list(models) if rep % 2 == 0 else list(models)[::-1]  # A B, B A, ...
        for name in order:
            for _ in range(args.steps):
                start, cpu_start = time.perf_counter(), time.process_time()
                fwd_bwd(models[name], imgs, args)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
        print(
            f"repeat {rep + 1}: "
            + ", ".join(f"{n} {', '.join(f'{t:.3f}' for t in times[n][-args.steps :])} s" for n in order)
        )

    for name, model in models.items():  # drop the other's gradients before AdamW allocates its moments
        if name != "mae":
            model.zero_grad(set_to_none=True)
    opt_s = time_optimizer(mae, imgs, args)

    step = {n: statistics.median(t) for n, t in times.items()}
    base = "mask-token-in-encoder"
    header = (
        f"| {'variant':<22} | enc tokens | GFLOPs/img analytic | GFLOPs/img counted | img/s fwd+bwd "
        f"| speed ratio | predicted ratio | measured/predicted | AdamW step ms | img/s incl. AdamW |"
    )
    print("\n" + header + "\n|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for name in models:
        measured, predicted = step[base] / step[name], flops[base] / flops[name]
        print(
            f"| {name:<22} | {encoder_tokens(kwargs[name], args.mask_ratio):>10} | {flops[name] / 1e9:>19.4g} "
            f"| {counted[name] / 1e9:>18.4g} | {args.batch / step[name]:>13.2f} | {measured:>10.2f}x "
            f"| {predicted:>14.2f}x | {measured / predicted:>18.2f} | {opt_s * 1e3:>13.0f} "
            f"| {args.batch / (step[name] + opt_s):>17.2f} |"
        )
    spread = ", ".join(f"{n} {min(t):.3f}-{max(t):.3f} s" for n, t in times.items())
    spread += f"; speed-up of the fastest steps {min(times[base]) / min(times['mae']):.2f}x"
    print("\nfwd+bwd step medians: " + ", ".join(f"{n} {s:.3f} s" for n, s in step.items()) + f" (range: {spread})")
    cpu = {n: statistics.median(t) for n, t in cpu_times.items()}
    print(
        "process CPU s/step medians: "
        + ", ".join(f"{n} {c:.3f}" for n, c in cpu.items())
        + f"; speed-up by CPU time {cpu[base] / cpu['mae']:.2f}x (less sensitive to other load on the machine)"
    )
    full = (step[base] + opt_s) / (step["mae"] + opt_s)
    print(f"full training step (fwd+bwd+AdamW) speed-up of MAE: {full:.2f}x; paper (ViT-L, 128 TPU-v3): 2.8x")
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
