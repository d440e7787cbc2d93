"""MAE pre-training speed on one GPU: images/s and MFU, eager vs torch.compile (about 3-5 minutes).

Runs our training step exactly as a job does (``engine.train_one_epoch``: bf16 autocast, fused AdamW,
the cosine schedule, a ``loss.item()`` finiteness check per step; TF32 on via
``engine.configure_cuda``) on ``build_model(--model)``, fed one synthetic batch that already lies
on the GPU, so data loading costs nothing. Per variant: one untimed warm-up epoch of ``--warmup``
steps (it includes compilation), then ``--repeats`` timed epochs of ``--steps`` steps each; the
epoch time ends with ``torch.cuda.synchronize``. The median epoch is reported.

    MFU = images/s x train FLOPs per image (mae_ray.model.flops) / dense bf16 peak of the GPU

``--baseline`` also runs Table 1c's mask token in the encoder, for the real MAE speed-up on a GPU.
``--peer`` also runs Hugging Face ``transformers``' ViTMAE of the same architecture (sdpa attention, the
same bf16 autocast, optimiser, schedule and step): the peer row; our goal is 1.2x its images/s.
A compile (or any) failure of one variant is reported in the table and the JSON and the others
still run. Results go to ``--out`` (default ``$OUT/gpu_pretrain.json`` when $OUT is set, else
``./gpu_pretrain.json``), rewritten after each variant. ``--dry-run`` checks the script on CPU
(micro model, batch 4, 2 steps, compile with the ``eager`` backend). Examples:

    python experiments/benchmarks/gpu_pretrain.py                 # ViT-B/16, batch 256, eager + compile
    python experiments/benchmarks/gpu_pretrain.py --baseline      # + mask token in encoder
    python experiments/benchmarks/gpu_pretrain.py --baseline --peer  # + transformers' ViTMAE
    python experiments/benchmarks/gpu_pretrain.py --dry-run --baseline --peer
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from mae_ray.model.flops import encoder_tokens, peak_flops, train_flops_per_image
from mae_ray.model.mae import MaskedAutoencoderViT
from mae_ray.model.presets import resolve_model_kwargs
from mae_ray.train import engine, optim, recipe

GOAL_IMAGES_PER_S = 3000  # on one H100, ViT-B/16 MAE, batch 256
GOAL_MFU = 0.40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="preset (default mae_vit_base_patch16; dry run: micro)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 256; dry run: 4)")
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps incl. compile (default 10)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 30)")
    parser.add_argument("--repeats", type=int, default=None, help="timed epochs per variant (default 3)")
    parser.add_argument("--modes", default="eager,compile", help="comma-separated: eager, compile")
    parser.add_argument("--baseline", action="store_true", help="also the mask token in the encoder (Table 1c)")
    parser.add_argument("--peer", action="store_true", help="also transformers' ViTMAE (sdpa), the peer row")
    parser.add_argument("--amp", choices=["bf16", "fp16", "none"], default="bf16")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, for a GPU not in the table")
    parser.add_argument("--time-budget-s", type=float, default=300, help="skip variants not started by then")
    parser.add_argument("--out", default=None, help="JSON results (default $OUT/gpu_pretrain.json or ./)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="CPU check of the script: micro model, 2 steps")
    args = parser.parse_args(argv)
    dry = args.dry_run
    defaults = {
        "model": "mae_vit_micro_patch4" if dry else "mae_vit_base_patch16",
        "batch": 4 if dry else 256,
        "warmup": 1 if dry else 10,
        "steps": 2 if dry else 30,
        "repeats": 1 if dry else 3,
        "compile_backend": "eager" if dry else "inductor",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = set(args.modes) - {"eager", "compile"}
    if bad or not args.modes:
        parser.error(f"--modes: choose from eager, compile (got {sorted(bad) or 'nothing'})")
    if min(args.batch, args.warmup, args.steps, args.repeats) < 1:
        parser.error("--batch, --warmup, --steps and --repeats must be >= 1")
    if args.out is None:
        args.out = os.path.join(os.environ.get("OUT") or ".", "gpu_pretrain.json")
    return args


def environment(device: torch.device) -> dict[str, Any]:
    import timm

    env: dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "cuda": torch.version.cuda, "cpu_cores": os.cpu_count(), "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=torch.cuda.get_device_name(device), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    return env


class SyntheticLoader:
    """``steps`` batches of the same images, already on the device: no decoding, no copies."""

    def __init__(self, imgs: torch.Tensor, steps: int):
        self.imgs, self.steps = imgs, steps
        self.labels = torch.zeros(imgs.shape[0], dtype=torch.long, device=imgs.device)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.imgs, self.labels


class HFViTMAE(torch.nn.Module):
    """transformers' ViTMAEForPreTraining (sdpa attention) behind our model's call: (loss, pred, mask)."""

    def __init__(self, kwargs: dict, mask_ratio: float):
        super().__init__()
        from transformers import ViTMAEConfig, ViTMAEForPreTraining

        k = kwargs
        config = ViTMAEConfig(
            image_size=k["img_size"], patch_size=k["patch_size"], num_channels=k["in_chans"],
            hidden_size=k["embed_dim"], num_hidden_layers=k["depth"], num_attention_heads=k["num_heads"],
            intermediate_size=int(k["embed_dim"] * k["mlp_ratio"]), decoder_hidden_size=k["decoder_embed_dim"],
            decoder_num_hidden_layers=k["decoder_depth"], decoder_num_attention_heads=k["decoder_num_heads"],
            decoder_intermediate_size=int(k["decoder_embed_dim"] * k["mlp_ratio"]), layer_norm_eps=1e-6,
            qkv_bias=True, mask_ratio=mask_ratio, norm_pix_loss=k["norm_pix_loss"], attn_implementation="sdpa")
        self.hf = ViTMAEForPreTraining(config)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75):
        out = self.hf(pixel_values=imgs)
        return out.loss, out.logits, out.mask


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def run_variant(args, variant: str, kwargs: dict, mode: str, device: torch.device, peak: float | None) -> dict:
    """Warm-up epoch, then ``args.repeats`` timed epochs of ``engine.train_one_epoch``; the row of results."""
    flops = train_flops_per_image(kwargs, args.mask_ratio)
    row: dict[str, Any] = {
        "variant": variant, "mode": mode, "encoder_tokens": encoder_tokens(kwargs, args.mask_ratio),
        "train_flops_per_image": flops, "status": "ok",
    }
    try:
        torch.manual_seed(args.seed)
        model = (HFViTMAE(kwargs, args.mask_ratio) if variant == "hf-vitmae" else MaskedAutoencoderViT(**kwargs))
        model = model.to(device)
        plan = engine.StepPlan(args.steps, 1, args.repeats + 1, warmup_epochs=1)
        lr = recipe.Batching(args.batch, 1, 1).lr(1.5e-4)
        optimizer = optim.pretrain_optimizer(model, lr, 0.05, device)  # fused AdamW on CUDA
        scheduler = optim.build_scheduler(optimizer, plan, 0.0)
        precision = engine.Precision(args.amp, device)
        runner = model
        if mode == "compile":
            runner = torch.compile(model, backend=args.compile_backend, mode=args.compile_mode)
        size = kwargs["img_size"]
        imgs = torch.randn(args.batch, kwargs["in_chans"], size, size, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        common = dict(scheduler=scheduler, precision=precision, mask_ratio=args.mask_ratio, device=device)

        start = time.perf_counter()
        warm = engine.StepPlan(args.warmup, 1, args.repeats + 1, warmup_epochs=1)
        engine.train_one_epoch(runner, SyntheticLoader(imgs, args.warmup), optimizer, epoch=0, plan=warm, **common)
        row["warmup_s"] = round(time.perf_counter() - start, 2)  # includes compilation

        rates, losses = [], []
        for epoch in range(1, args.repeats + 1):
            m = engine.train_one_epoch(runner, SyntheticLoader(imgs, args.steps), optimizer, epoch=epoch,
                                       plan=plan, **common)
            rates.append(m["images_per_s"])
            losses.append(m["train_loss"])
        rate = statistics.median(rates)
        row.update(
            images_per_s=round(rate, 1), images_per_s_repeats=[round(r, 1) for r in rates],
            step_ms=round(1e3 * args.batch / rate, 2), tflops_per_s=round(rate * flops / 1e12, 2),
            mfu=round(rate * flops / peak, 4) if peak else None, final_loss=round(losses[-1], 4),
        )
        if device.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    except Exception as e:  # a failed compile (or OOM) is a result too; the other variants go on
        row.update(status="failed", error=_first_line(e))
    return row


def release(device: torch.device) -> None:
    """Forget compiled graphs and cached blocks, so that each variant starts from the same state."""
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = ("| variant | mode | enc tokens | GFLOPs/img (fwd+bwd) | img/s | step ms | TFLOP/s | MFU "
              "| peak mem GiB | warm-up s (incl. compile) | status |")
    print("\n" + header + "\n|" + "|".join("---" for _ in header.split("|")[1:-1]) + "|")
    for r in rows:
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}"
        mfu = None if r.get("mfu") is None else f"{100 * r['mfu']:.1f} %"
        print(f"| {r['variant']} | {r['mode']} | {r['encoder_tokens']} | {r['train_flops_per_image'] / 1e9:.2f} "
              f"| {_fmt(r.get('images_per_s'), '.1f')} | {_fmt(r.get('step_ms'), '.1f')} "
              f"| {_fmt(r.get('tflops_per_s'), '.1f')} | {mfu or '-'} | {_fmt(r.get('peak_memory_gib'), '.1f')} "
              f"| {_fmt(r.get('warmup_s'), '.1f')} | {status} |")


def summarize(rows: list[dict], flops_ratio: float | None) -> dict[str, Any]:
    ok = {(r["variant"], r["mode"]): r for r in rows if r["status"] == "ok"}
    out: dict[str, Any] = {}
    for mode in ("eager", "compile"):
        if ("mae", mode) in ok and ("mask-token-in-encoder", mode) in ok:
            out[f"mae_speedup_{mode}"] = round(
                ok[("mae", mode)]["images_per_s"] / ok[("mask-token-in-encoder", mode)]["images_per_s"], 3)
    if ("mae", "eager") in ok and ("mae", "compile") in ok:
        eager, compiled = ok[("mae", "eager")]["images_per_s"], ok[("mae", "compile")]["images_per_s"]
        out["compile_speedup_mae"] = round(compiled / eager, 3)
    if flops_ratio:
        out["flops_ratio_baseline_over_mae"] = round(flops_ratio, 3)
    peer = [r for (v, _), r in ok.items() if v == "hf-vitmae"]
    mae_rows = [r for (v, _), r in ok.items() if v == "mae"]
    if peer and mae_rows:  # our best against the peer's best: the goal is >= 1.2
        out["speedup_over_hf_vitmae"] = round(max(r["images_per_s"] for r in mae_rows)
                                              / max(r["images_per_s"] for r in peer), 3)
    mae = [r for (v, _), r in ok.items() if v == "mae"]
    if mae:
        best = max(mae, key=lambda r: r["images_per_s"])
        out["best_mae"] = {"mode": best["mode"], "images_per_s": best["images_per_s"], "mfu": best.get("mfu")}
    return out


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python " + shlex.join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    print("command: " + command, flush=True)
    payload: dict[str, Any] = {"command": command, "args": dict(vars(args))}
    if args.dry_run:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        msg = ("no CUDA device (torch.cuda.is_available() is False): this benchmark needs one GPU "
               "(H100/H200). Check the script on CPU with --dry-run.")
        print(f"error: {msg}", file=sys.stderr)
        write_json(args.out, {**payload, "status": "no_cuda", "error": msg})
        return 2
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        engine.configure_cuda()  # TF32, as the training jobs do

    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device)
    env = environment(device)
    payload.update(environment=env, peak_flops=peak, status="running", results=[])
    print("machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    print(f"peak (dense bf16): {f'{peak / 1e12:.0f} TFLOP/s' if peak else 'unknown: MFU not computed'}")

    variants = {"mae": resolve_model_kwargs(args.model, {"mask_token_in_encoder": False})}
    if args.baseline:
        variants["mask-token-in-encoder"] = resolve_model_kwargs(args.model, {"mask_token_in_encoder": True})
    flops = {v: train_flops_per_image(k, args.mask_ratio) for v, k in variants.items()}
    ratio = flops["mask-token-in-encoder"] / flops["mae"] if args.baseline else None
    if args.peer:  # the same matrix products (HF splits q, k, v: the same FLOPs)
        variants["hf-vitmae"] = variants["mae"]
        flops["hf-vitmae"] = flops["mae"]
    precision = engine.Precision(args.amp, device).dtype or torch.float32
    print(f"model {args.model}, batch {args.batch}, mask ratio {args.mask_ratio}, amp {args.amp} "
          f"({str(precision).removeprefix('torch.')} on {device.type}), {args.warmup} warm-up + "
          f"{args.repeats} x {args.steps} timed steps per variant; "
          + ", ".join(f"{v} {f / 1e9:.2f} GFLOPs/img" for v, f in flops.items()), flush=True)

    start = time.perf_counter()
    for variant, kwargs in variants.items():
        for mode in args.modes:
            if time.perf_counter() - start > args.time_budget_s:
                row = {"variant": variant, "mode": mode, "encoder_tokens": encoder_tokens(kwargs, args.mask_ratio),
                       "train_flops_per_image": flops[variant], "status": "skipped",
                       "error": f"time budget of {args.time_budget_s:g} s spent"}
            else:
                row = run_variant(args, variant, kwargs, mode, device, peak)
                release(device)
            payload["results"].append(row)
            shown = (f"{row['images_per_s']:.1f} img/s, warm-up {row['warmup_s']:.1f} s" if row["status"] == "ok"
                     else f"{row['status']}: {row.get('error')}")
            print(f"[{time.perf_counter() - start:6.1f} s] {variant} / {mode}: {shown}", flush=True)
            payload["summary"] = summarize(payload["results"], ratio)
            write_json(args.out, payload)

    print_table(payload["results"])
    summary = payload["summary"]
    for mode in ("eager", "compile"):
        if f"mae_speedup_{mode}" in summary:
            print(f"MAE speed-up over mask token in encoder ({mode}): {summary[f'mae_speedup_{mode}']:.2f}x "
                  f"(FLOP ratio {ratio:.2f}x)")
    if "compile_speedup_mae" in summary:
        print(f"torch.compile speed-up (MAE): {summary['compile_speedup_mae']:.2f}x")
    if "speedup_over_hf_vitmae" in summary:
        print(f"our MAE over transformers' ViTMAE (best mode each): {summary['speedup_over_hf_vitmae']:.2f}x "
              "(goal 1.2x)")
    best = summary.get("best_mae")
    if best and not args.dry_run:
        mfu = best["mfu"]
        payload["goals"] = {
            "images_per_s": {"goal": GOAL_IMAGES_PER_S, "met": best["images_per_s"] >= GOAL_IMAGES_PER_S},
            "mfu": {"goal": GOAL_MFU, "met": None if mfu is None else mfu >= GOAL_MFU},
        }
        print(f"goals (ViT-B/16, batch 256, one H100): >= {GOAL_IMAGES_PER_S} img/s: "
              f"{'met' if payload['goals']['images_per_s']['met'] else 'NOT met'} ({best['images_per_s']:.0f}, "
              f"{best['mode']}); >= {GOAL_MFU:.0%} MFU: "
              + ("unknown" if mfu is None else f"{'met' if mfu >= GOAL_MFU else 'NOT met'} ({mfu:.1%})"))
    failed = [r for r in payload["results"] if r["status"] != "ok"]
    payload["status"] = "ok" if not failed else ("partial" if len(failed) < len(payload["results"]) else "failed")
    write_json(args.out, payload)
    print(f"results: {os.path.abspath(args.out)} (status {payload['status']})")
    return 0 if payload["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
