"""MaskedAutoencoderViT against implementations that are not ours (issue 11, "independent references").

- Hugging Face ``transformers``' ViTMAE (separate q/k/v projections, its own masking, decoder and loss):
  the same weights and the same noise must give the same loss, prediction, mask and latent;
- the MAE release's numpy sin-cos formula (``util/pos_embed.py``), rewritten here, and HF's own tables;
- timm's ``resample_abs_pos_embed``, the release's ``interpolate_pos_embed`` and HF's
  ``interpolate_pos_encoding`` for resizing position tables (random tables, so the cls row counts);
- a checkpoint in the release's layout and key set, built from the HF model, through our loaders.

The key mapping below follows transformers 5's in-memory module names (hence the ``<6`` pin in the
``dev`` extra). The ViT-B test is marked ``slow`` and runs only with ``MAE_RAY_SLOW=1``: about 12 s of CPU,
but 25-60 s of wall time on the shared 2-core machine.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae import modeling_vit_mae as hf_mae

from mae_ray.config import Config, ModelConfig
from mae_ray.jobs.encoders import resolve_encoder
from mae_ray.model.mae import MaskedAutoencoderViT, build_model, sincos_1d, sincos_2d
from mae_ray.model.presets import resolve_model_kwargs
from mae_ray.model.weights import load_mae_weights, resize_pos_embeds

MICRO = "mae_vit_micro_patch4"
BASE = "mae_vit_base_patch16"
ATOL = 1e-5
run_slow = pytest.mark.skipif(os.environ.get("MAE_RAY_SLOW") != "1", reason="ViT-B sized: set MAE_RAY_SLOW=1 to run")


# ----------------------------------------------------------------------------------- the HF reference
def hf_config(kw: dict, mask_ratio: float) -> ViTMAEConfig:
    """ViTMAEConfig of the same architecture; HF's defaults that differ from the release are set explicitly."""
    return ViTMAEConfig(
        image_size=kw["img_size"], patch_size=kw["patch_size"], num_channels=kw["in_chans"],
        hidden_size=kw["embed_dim"], num_hidden_layers=kw["depth"], num_attention_heads=kw["num_heads"],
        intermediate_size=int(kw["embed_dim"] * kw["mlp_ratio"]),
        decoder_hidden_size=kw["decoder_embed_dim"], decoder_num_hidden_layers=kw["decoder_depth"],
        decoder_num_attention_heads=kw["decoder_num_heads"],
        decoder_intermediate_size=int(kw["decoder_embed_dim"] * kw["mlp_ratio"]),
        layer_norm_eps=1e-6,  # HF's default is 1e-12; the release (and timm's MAE) use 1e-6
        qkv_bias=True, hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        mask_ratio=mask_ratio, norm_pix_loss=kw["norm_pix_loss"],
    )


def hf_sincos_tables(cfg: ViTMAEConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own fixed tables [1, 1+L, D] (encoder, decoder), made by its modules' initialize_weights.

    ``ViTMAEForPreTraining(config)`` in transformers 5 leaves both tables at zero (``from_pretrained``
    fills them from the file), so they are taken from freshly built modules instead.
    """
    emb = hf_mae.ViTMAEEmbeddings(cfg)
    emb.initialize_weights()
    dec = hf_mae.ViTMAEDecoder(cfg, num_patches=emb.patch_embeddings.num_patches)
    return emb.position_embeddings.detach().clone(), dec.decoder_pos_embed.detach().clone()


def hf_reference(kw: dict, mask_ratio: float = 0.75, seed: int = 0, random_pos: bool = False) -> ViTMAEForPreTraining:
    """An HF ViTMAE with random (non-trivial) weights everywhere and HF's sin-cos position tables.

    ``random_pos``: random position tables instead, cls rows included (sin-cos cls rows are zero, so a
    model that dropped the cls position would still agree with HF on sin-cos tables).
    """
    cfg = hf_config(kw, mask_ratio)
    hf = ViTMAEForPreTraining(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "layernorm" in name or "decoder_norm" in name:
                p.copy_(noise * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            else:  # matrices, biases, cls and mask tokens
                p.copy_(noise * 0.02)
        if random_pos:
            enc_pos = torch.randn(hf.vit.embeddings.position_embeddings.shape, generator=g) * 0.5
            dec_pos = torch.randn(hf.decoder.decoder_pos_embed.shape, generator=g) * 0.5
        else:
            enc_pos, dec_pos = hf_sincos_tables(cfg)
        hf.vit.embeddings.position_embeddings.copy_(enc_pos)
        hf.decoder.decoder_pos_embed.copy_(dec_pos)
    return hf


def hf_to_release(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ViTMAEForPreTraining tensors -> the release's models_mae.py names (q, k, v fused into qkv).

    Every HF tensor is used exactly once; an HF key the mapping does not know fails loudly.
    """
    rest = dict(hf_state)
    out: dict[str, torch.Tensor] = {}
    per_block = {"layernorm_before": "norm1", "attention.o_proj": "attn.proj", "layernorm_after": "norm2",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for hf_prefix, prefix in (("vit.layers.", "blocks."), ("decoder.decoder_layers.", "decoder_blocks.")):
        i = 0
        while f"{hf_prefix}{i}.attention.q_proj.weight" in rest:
            src, dst = f"{hf_prefix}{i}.", f"{prefix}{i}."
            for part in ("weight", "bias"):
                out[f"{dst}attn.qkv.{part}"] = torch.cat([rest.pop(f"{src}attention.{x}_proj.{part}") for x in "qkv"])
                for hf_name, name in per_block.items():
                    out[f"{dst}{name}.{part}"] = rest.pop(f"{src}{hf_name}.{part}")
            i += 1
    singles = {
        "vit.embeddings.cls_token": "cls_token",
        "vit.embeddings.position_embeddings": "pos_embed",
        "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "vit.layernorm.weight": "norm.weight",
        "vit.layernorm.bias": "norm.bias",
        "decoder.mask_token": "mask_token",
        "decoder.decoder_pos_embed": "decoder_pos_embed",
        "decoder.decoder_embed.weight": "decoder_embed.weight",
        "decoder.decoder_embed.bias": "decoder_embed.bias",
        "decoder.decoder_norm.weight": "decoder_norm.weight",
        "decoder.decoder_norm.bias": "decoder_norm.bias",
        "decoder.decoder_pred.weight": "decoder_pred.weight",
        "decoder.decoder_pred.bias": "decoder_pred.bias",
    }
    for hf_name, name in singles.items():
        out[name] = rest.pop(hf_name)
    assert not rest, f"HF keys the mapping does not know: {sorted(rest)}"
    return {k: v.detach() for k, v in out.items()}


def release_keys(depth: int, decoder_depth: int) -> tuple[set[str], set[str]]:
    """(encoder, decoder) key sets of the release's models_mae.MaskedAutoencoderViT, written out by hand.

    The encoder set is what ``mae_pretrain_vit_*.pth`` holds; encoder | decoder is the full pre-training file.
    """
    block = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
             for p in ("weight", "bias")]
    enc = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    enc |= {f"blocks.{i}.{b}" for i in range(depth) for b in block}
    dec = {"mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias",
           "decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"}
    dec |= {f"decoder_blocks.{i}.{b}" for i in range(decoder_depth) for b in block}
    return enc, dec


def inputs(kw: dict, n: int = 2, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Images and per-sample masking noise (one noise row per image, as both models take it)."""
    g = torch.Generator().manual_seed(seed)
    size, length = kw["img_size"], (kw["img_size"] // kw["patch_size"]) ** 2
    return torch.randn(n, kw["in_chans"], size, size, generator=g), torch.rand(n, length, generator=g)


def assert_same_pretraining(ours: MaskedAutoencoderViT, hf: ViTMAEForPreTraining, kw: dict, mask_ratio: float,
                            n: int = 2):
    imgs, noise = inputs(kw, n=n)
    with torch.no_grad():
        loss, pred, mask = ours(imgs, mask_ratio=mask_ratio, noise=noise)
        out = hf(pixel_values=imgs, noise=noise)
        latent, _, ids_restore = ours.forward_encoder(imgs, mask_ratio, noise)
        hf_enc = hf.vit(pixel_values=imgs, noise=noise)
    assert torch.equal(mask, out.mask)
    assert mask.sum(1).tolist() == [len(noise[0]) - int(len(noise[0]) * (1 - mask_ratio))] * len(imgs)
    assert torch.equal(ids_restore, hf_enc.ids_restore)
    torch.testing.assert_close(latent, hf_enc.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(pred, out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=ATOL, rtol=0)
    assert loss.item() > 0.1  # a real loss, not two zeros agreeing


def assert_same_features(ours: MaskedAutoencoderViT, hf: ViTMAEForPreTraining, kw: dict, n: int = 2):
    """forward_features (every token, patch order) vs HF's encoder with nothing masked and identity noise."""
    imgs, _ = inputs(kw, n=n, seed=2)
    length = (imgs.shape[-1] // kw["patch_size"]) ** 2
    identity = torch.arange(length, dtype=torch.float32).expand(n, -1)  # keeps the patch order
    cfg = hf.vit.embeddings.config
    ratio, cfg.mask_ratio = cfg.mask_ratio, 0.0
    try:
        with torch.no_grad():
            want = hf.vit(pixel_values=imgs, noise=identity).last_hidden_state
    finally:
        cfg.mask_ratio = ratio
    with torch.no_grad():
        got = ours.forward_features(imgs)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------- a. same model as HF's
SMALL_CONFIGS = {  # preset, overrides, mask ratio, random position tables
    "micro": (MICRO, {}, 0.75, False),
    "micro-normpix-randompos": (MICRO, {"norm_pix_loss": True}, 0.75, True),
    # another shape: 8 px patches on 48 px (6x6 grid), 4 heads, 2 decoder blocks, mlp_ratio 2, half masked
    "p8-48px-randompos": (MICRO, {"img_size": 48, "patch_size": 8, "num_heads": 4, "decoder_depth": 2,
                                  "mlp_ratio": 2.0}, 0.5, True),
}


@pytest.mark.parametrize("config", sorted(SMALL_CONFIGS))
def test_pretraining_forward_matches_hf_vitmae(config):
    name, overrides, mask_ratio, random_pos = SMALL_CONFIGS[config]
    kw = resolve_model_kwargs(name, overrides)
    hf = hf_reference(kw, mask_ratio, random_pos=random_pos)
    ours = build_model(name, **overrides).eval()
    ours.load_state_dict(hf_to_release(hf.state_dict()), strict=True)
    assert_same_pretraining(ours, hf, kw, mask_ratio)
    assert_same_features(ours, hf, kw)


# ----------------------------------------------------------------------------------- e. official-layout files
def write_official_files(tmp_path, hf: ViTMAEForPreTraining, kw: dict):
    """The release's two files from the HF weights: full pre-training state and encoder only (``{"model": ...}``)."""
    state = hf_to_release(hf.state_dict())
    enc_keys, dec_keys = release_keys(kw["depth"], kw["decoder_depth"])
    assert set(state) == enc_keys | dec_keys
    full, enc = tmp_path / "mae_pretrain_full.pth", tmp_path / "mae_pretrain_vit.pth"
    torch.save({"model": state}, full)
    torch.save({"model": {k: state[k] for k in enc_keys}}, enc)
    return full, enc, enc_keys


def test_official_layout_checkpoints_load_and_match_hf(tmp_path):
    kw = resolve_model_kwargs(MICRO)
    hf = hf_reference(kw, 0.75)
    full, enc, enc_keys = write_official_files(tmp_path, hf, kw)

    ours = build_model(MICRO).eval()
    assert load_mae_weights(ours, full, require_decoder=True) == {"resized": [], "decoder_missing": []}
    assert_same_pretraining(ours, hf, kw, 0.75)
    assert_same_features(ours, hf, kw)

    # the encoder-only file through the evaluation's resolver (eval.checkpoint = an official .pth)
    source = resolve_encoder(str(enc), Config(model=ModelConfig(name=MICRO)), tracking_uri="")
    assert set(source.state) == enc_keys
    assert_same_features(source.build().eval(), hf, kw)


# ----------------------------------------------------------------------------------- b. ViT-B
@pytest.mark.slow
@run_slow
def test_vit_base_matches_hf_vitmae_through_official_layout_files(tmp_path):
    """ViT-B/16 (86 M encoder + 8-block decoder): HF -> release-layout files -> our loader -> same outputs."""
    kw = resolve_model_kwargs(BASE)
    hf = hf_reference(kw, 0.75)
    full, enc, _ = write_official_files(tmp_path, hf, kw)

    ours = build_model(BASE).eval()
    assert load_mae_weights(ours, full, require_decoder=True) == {"resized": [], "decoder_missing": []}
    assert_same_pretraining(ours, hf, kw, 0.75, n=1)  # batches of 2 (per-sample masks) are checked small

    with torch.no_grad():  # wipe everything, then the encoder-only file must bring the encoder back
        for p in ours.parameters():
            p.zero_()
    report = load_mae_weights(ours, enc)
    assert "decoder_pred.weight" in report["decoder_missing"] and report["resized"] == []
    assert_same_features(ours, hf, kw, n=1)


# ----------------------------------------------------------------------------------- c. sin-cos tables
def release_1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """util/pos_embed.get_1d_sincos_pos_embed_from_grid of the MAE release, in numpy."""
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def release_2d_sincos(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """util/pos_embed.get_2d_sincos_pos_embed of the MAE release, in numpy (its names kept)."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, so grid[0] is the column index
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = release_1d_sincos(embed_dim // 2, grid[0])  # half the dims, from grid[0]
    emb_w = release_1d_sincos(embed_dim // 2, grid[1])  # the other half, from grid[1]
    emb = np.concatenate([emb_h, emb_w], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@pytest.mark.parametrize("embed_dim,grid", [(16, 4), (32, 8), (64, 8), (512, 14), (768, 14), (1280, 16)])
def test_sincos_2d_matches_release_formula_at_every_position(embed_dim, grid):
    ours = sincos_2d(embed_dim, grid, cls_token=True)
    want = torch.from_numpy(release_2d_sincos(embed_dim, grid, cls_token=True))
    assert ours.shape == want.shape == (1 + grid * grid, embed_dim)
    torch.testing.assert_close(ours.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(sincos_2d(embed_dim, grid), want[1:].float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("embed_dim", [8, 32, 256])
def test_sincos_1d_matches_release_formula(embed_dim):
    pos = np.concatenate([np.arange(20.0), np.random.default_rng(0).uniform(-50, 50, 30)])
    ours = sincos_1d(embed_dim, torch.from_numpy(pos))
    torch.testing.assert_close(ours, torch.from_numpy(release_1d_sincos(embed_dim, pos)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", [MICRO, BASE])
def test_position_tables_match_hf_vitmae(name):
    kw = resolve_model_kwargs(name)
    hf_enc, hf_dec = hf_sincos_tables(hf_config(kw, 0.75))
    grid = kw["img_size"] // kw["patch_size"]
    for table, dim in ((hf_enc, kw["embed_dim"]), (hf_dec, kw["decoder_embed_dim"])):
        torch.testing.assert_close(sincos_2d(dim, grid, cls_token=True), table[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.from_numpy(release_2d_sincos(dim, grid, True)).float(), table[0],
                                   atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------- d. resizing position tables
def random_tables(grid: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pos_embed": torch.randn(1, 1 + grid * grid, 64, generator=g),
            "decoder_pos_embed": torch.randn(1, 1 + grid * grid, 32, generator=g)}


def release_interpolate(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """util/pos_embed.interpolate_pos_embed of the MAE release (bicubic, align_corners=False, cls kept)."""
    extra, tokens = table[:, :1], table[:, 1:]
    old = int(tokens.shape[1] ** 0.5)
    tokens = tokens.reshape(-1, old, old, table.shape[-1]).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([extra, tokens.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("src_grid,dst_grid", [(8, 12), (8, 5), (14, 16)])
def test_resize_pos_embeds_matches_timm_and_release_on_random_tables(src_grid, dst_grid):
    """Up- and downsampling of random tables (random cls row too) against timm and the release's formula.

    timm is called with the release's settings (bicubic, no antialias): timm's default ``antialias=True``
    uses another cubic kernel even when upsampling and disagrees with the release by up to ~0.3 here.
    """
    model = build_model(MICRO, img_size=4 * dst_grid)
    original = random_tables(src_grid)
    state = {k: v.clone() for k, v in original.items()}
    assert resize_pos_embeds(state, model) == ["pos_embed", "decoder_pos_embed"]
    for key, src in original.items():
        assert state[key].shape == (1, 1 + dst_grid * dst_grid, src.shape[-1])
        assert torch.equal(state[key][:, 0], src[:, 0])  # the cls row, random here, kept as is
        want = resample_abs_pos_embed(src, [dst_grid, dst_grid], num_prefix_tokens=1, antialias=False)
        torch.testing.assert_close(state[key], want, atol=1e-6, rtol=0)
        torch.testing.assert_close(state[key], release_interpolate(src, dst_grid), atol=1e-6, rtol=0)


def test_resize_matches_hf_interpolate_pos_encoding_when_loading():
    """Upsampling through load_mae_weights equals HF's interpolate_pos_encoding of the same random table."""
    src_grid, dst_grid, p = 8, 12, 4
    kw = resolve_model_kwargs(MICRO)
    small = build_model(MICRO)
    tables = random_tables(src_grid, seed=3)
    state = dict(small.state_dict(), **tables)
    bigger = build_model(MICRO, img_size=p * dst_grid)
    assert load_mae_weights(bigger, state, require_decoder=True)["resized"] == ["pos_embed", "decoder_pos_embed"]
    emb = hf_mae.ViTMAEEmbeddings(hf_config(kw, 0.75))
    with torch.no_grad():
        emb.position_embeddings.copy_(tables["pos_embed"])
    want = emb.interpolate_pos_encoding(torch.zeros(1, 1 + dst_grid**2, 64), p * dst_grid, p * dst_grid)
    torch.testing.assert_close(bigger.pos_embed.detach(), want.detach(), atol=1e-5, rtol=0)
    assert torch.equal(bigger.pos_embed[0, 0], tables["pos_embed"][0, 0])
