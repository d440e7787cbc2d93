"""The analytic FLOP count against torch's FlopCounterMode, Table 1c's ratio, and the GPU peak table."""

from __future__ import annotations

import pytest
import torch

from mae_ray.model import flops
from mae_ray.model.mae import MaskedAutoencoderViT
from mae_ray.model.presets import resolve_model_kwargs

MICRO = "mae_vit_micro_patch4"


@pytest.mark.parametrize("in_encoder", [False, True], ids=["mae", "mask_token_in_encoder"])
def test_analytic_count_equals_flop_counter(in_encoder):
    kwargs = resolve_model_kwargs(MICRO, {"mask_token_in_encoder": in_encoder, "mlp_ratio": 3.0})
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(**kwargs).train()
    imgs = torch.randn(2, 3, 32, 32)

    for ratio in (0.75, 0.6):  # 16 or 25 of 64 patches kept
        assert flops.counted_flops(model, imgs, ratio, backward=False) == flops.forward_flops(kwargs, ratio)
    assert flops.counted_flops(model, imgs, 0.75) == flops.train_flops_per_image(kwargs, 0.75)
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))  # switched back on


def test_breakdown_and_token_counts():
    kwargs = resolve_model_kwargs("mae_vit_base_patch16")
    assert flops.num_patches(kwargs) == 196
    assert flops.encoder_tokens(kwargs, 0.75) == 50
    assert flops.encoder_tokens({**kwargs, "mask_token_in_encoder": True}, 0.75) == 197
    parts = flops.forward_flops_breakdown(kwargs)
    assert sum(parts.values()) == flops.forward_flops(kwargs)
    assert flops.train_flops_per_image(kwargs) == 3 * flops.forward_flops(kwargs) - parts["patch_embed"]
    # missing keywords take the release's defaults (ViT-L/16 encoder, 512-d x 8 decoder)
    assert flops.forward_flops({}) == flops.forward_flops(resolve_model_kwargs("mae_vit_large_patch16"))
    with pytest.raises(KeyError):
        flops.forward_flops({"width": 3})


def test_vit_large_table_1c_ratio():
    """Paper, Table 1c: with the mask token in the encoder, ViT-L (decoder depth 8) costs 3.3x the FLOPs."""
    mae = resolve_model_kwargs("mae_vit_large_patch16", {"decoder_depth": 8})
    base = {**mae, "mask_token_in_encoder": True}
    assert 3.2 <= flops.train_flops_per_image(base) / flops.train_flops_per_image(mae) <= 3.3
    assert 3.2 <= flops.forward_flops(base) / flops.forward_flops(mae) <= 3.3
    assert flops.train_flops_per_image(mae) == pytest.approx(124.2e9, rel=1e-3)


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("Tesla T4", None),
        ("Some Future GPU", None),
    ],
)
def test_peak_flops_by_name(name, peak):
    assert flops.peak_flops_for_name(name) == peak


def test_peak_flops_is_none_on_cpu():
    assert flops.peak_flops("cpu") is None
    assert flops.peak_flops(torch.device("cpu")) is None
