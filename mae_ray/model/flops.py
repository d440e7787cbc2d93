"""Matmul FLOPs of MAE pre-training, counted analytically, and the peak a GPU can do (for MFU).

Only matrix products are counted (as ``torch.utils.flop_counter.FlopCounterMode`` does, so the two
agree exactly): a multiply-add is 2 FLOPs; LayerNorm, GELU, softmax, residual adds, gathers and the
loss are left out. For one image of ``L`` patches of width ``p*p*C``:

  patch embedding     2 * L * D * (p*p*C)                   (a stride-p convolution = one linear map)
  encoder block       2 * T * (linear weights) + 4 * T^2 * D (QK^T and AV),  T = 1 + kept patches,
                      or 1 + L when the mask token goes through the encoder (Table 1c's baseline)
  decoder embedding   2 * T * D * Dd
  decoder block       as an encoder block on 1 + L tokens of width Dd
  prediction head     2 * (1 + L) * Dd * (p*p*C)

Training is forward + backward; the backward of each product costs twice its forward, except that
the images need no gradient, so the patch embedding's input gradient is never computed:
``train = 3 * forward - patch embedding``. Functions take ``MaskedAutoencoderViT`` constructor
keywords (a preset's via ``mae_ray.model.presets.resolve_model_kwargs``; missing keys take the release's
defaults) and import no torch, except the measuring helpers at the end.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from mae_ray.model.presets import MODEL_DEFAULTS, default_pca_components

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets.
# Matched in order against the words of torch.cuda.get_device_name(): more specific names first.
PEAK_BF16_FLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H100", "PCIe"), 756e12),
    (("H100", "NVL"), 835e12),
    (("H200", "NVL"), 835e12),
    (("GH200",), 989e12),
    (("H100",), 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (("H200",), 989e12),  # SXM
    (("B200",), 2250e12),
    (("A100",), 312e12),  # SXM and PCIe alike
    (("L40S",), 362e12),
    (("L40",), 181e12),
    (("L4",), 121e12),
    (("A10",), 125e12),
]


def _kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - set(MODEL_DEFAULTS)
    if unknown:
        raise KeyError(f"unknown model keyword(s) {sorted(unknown)}; valid: {', '.join(MODEL_DEFAULTS)}")
    return {**MODEL_DEFAULTS, **{k: v for k, v in kwargs.items() if v is not None}}


def num_patches(kwargs: Mapping[str, Any]) -> int:
    k = _kwargs(kwargs)
    return (k["img_size"] // k["patch_size"]) ** 2


def encoder_tokens(kwargs: Mapping[str, Any], mask_ratio: float = 0.75) -> int:
    """Tokens through each encoder block: cls + the kept patches (cls + all L with the mask token in it)."""
    k = _kwargs(kwargs)
    length = num_patches(k)
    return 1 + (length if k["mask_token_in_encoder"] else int(length * (1 - mask_ratio)))


def _block(tokens: int, width: int, mlp_ratio: float) -> int:
    hidden = int(width * mlp_ratio)  # timm's Mlp rounds the same way
    weights = width * 3 * width + width * width + 2 * width * hidden  # qkv, proj, fc1, fc2
    return 2 * tokens * weights + 4 * tokens**2 * width


def forward_flops_breakdown(kwargs: Mapping[str, Any], mask_ratio: float = 0.75) -> dict[str, int]:
    """Forward matmul FLOPs per image, by part: patch_embed, encoder, decoder_embed, decoder, decoder_pred."""
    k = _kwargs(kwargs)
    length, patch_dim = num_patches(k), k["patch_size"] ** 2 * k["in_chans"]
    t_enc, t_dec = encoder_tokens(k, mask_ratio), length + 1
    dim, ddim = k["embed_dim"], k["decoder_embed_dim"]
    outputs = patch_dim  # what the decoder predicts per patch: its pixels, or target=pca's coefficients
    if k["target"] == "pca":
        outputs = k["pca_components"] or default_pca_components(k["patch_size"], k["in_chans"])
    return {
        "patch_embed": 2 * length * dim * patch_dim,
        "encoder": k["depth"] * _block(t_enc, dim, k["mlp_ratio"]),
        "decoder_embed": 2 * t_enc * dim * ddim,
        "decoder": k["decoder_depth"] * _block(t_dec, ddim, k["mlp_ratio"]),
        "decoder_pred": 2 * t_dec * ddim * outputs,
    }


def forward_flops(kwargs: Mapping[str, Any], mask_ratio: float = 0.75) -> int:
    """Matmul FLOPs of one forward pass, per image."""
    return sum(forward_flops_breakdown(kwargs, mask_ratio).values())


def train_flops_per_image(kwargs: Mapping[str, Any], mask_ratio: float = 0.75) -> int:
    """Matmul FLOPs of one training step (forward + backward), per image: 3 x forward, less the patch
    embedding's input gradient, which autograd never computes (the images need no gradient)."""
    parts = forward_flops_breakdown(kwargs, mask_ratio)
    return 3 * sum(parts.values()) - parts["patch_embed"]


def peak_flops_for_name(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its name (``torch.cuda.get_device_name``); None if unknown."""
    words = set(re.split(r"[\s\-_/]+", device_name.upper()))
    for needed, peak in PEAK_BF16_FLOPS:
        if all(w.upper() in words for w in needed):
            return peak
    return None


def peak_flops(device: Any = None) -> float | None:
    """Dense bf16 peak FLOP/s of ``device`` (a CUDA device, index or name; None: the current one),
    for MFU. None on CPU, without CUDA, or for a GPU not in ``PEAK_BF16_FLOPS``."""
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            return None
        device = device.index
    if not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


# --------------------------------------------------------------------------- measuring (imports torch)
def set_fused_attention(model, fused: bool) -> None:
    """Switch timm's fused SDPA attention on or off in every block (FlopCounterMode does not see the
    CPU flash-attention kernel, so counting needs the unfused q @ k^T and attn @ v)."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused


def counted_flops(model, imgs, mask_ratio: float = 0.75, backward: bool = True) -> float:
    """``FlopCounterMode``'s total for one forward (+ backward) of ``model`` on ``imgs``, per image.

    Fused attention is off during the count and on again afterwards; gradients are left in ``model``.
    """
    set_fused_attention(model, False)
    try:
        with FlopCounterMode(display=False) as counter:
            if backward:
                model(imgs, mask_ratio=mask_ratio)[0].backward()
            else:
                with torch.no_grad():
                    model(imgs, mask_ratio=mask_ratio)
    finally:
        set_fused_attention(model, True)
    return counter.get_total_flops() / imgs.shape[0]
