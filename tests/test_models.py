"""MaskedAutoencoderViT against the paper and the release: tests that catch a wrong MAE, not a crashing one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch

from mae_ray.errors import CheckpointError
from mae_ray.model.mae import MaskedAutoencoderViT, build_model, encoder_param_count, sincos_1d, sincos_2d
from mae_ray.model.presets import PRESETS
from mae_ray.model.weights import encoder_state_dict, load_mae_weights, save_encoder, timm_vit_kwargs

MICRO = "mae_vit_micro_patch4"


@pytest.fixture
def micro():
    torch.manual_seed(0)
    return build_model(MICRO).eval()


def images(n=2, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- shapes and presets
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build_with_official_shapes(name):
    with torch.device("meta"):
        m = build_model(name)
    k = {**PRESETS[name]}
    L = m.patch_embed.num_patches
    assert m.pos_embed.shape == (1, L + 1, k["embed_dim"])
    assert m.decoder_pos_embed.shape == (1, L + 1, k["decoder_embed_dim"])
    assert m.decoder_pred.out_features == k["patch_size"] ** 2 * 3
    assert len(m.blocks) == k["depth"] and len(m.decoder_blocks) == k["decoder_depth"]


@pytest.mark.parametrize(
    "name, millions",
    [("mae_vit_base_patch16", 85.8), ("mae_vit_large_patch16", 303.3), ("mae_vit_huge_patch14", 630.8)],
)
def test_encoder_parameter_counts_match_paper(name, millions):
    with torch.device("meta"):
        m = build_model(name)
    assert round(encoder_param_count(m) / 1e6, 1) == millions


def test_forward_shapes(micro):
    loss, pred, mask = micro(images(3), mask_ratio=0.75)
    L = micro.patch_embed.num_patches
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (3, L, 4 * 4 * 3)
    assert mask.shape == (3, L)


def test_overrides_change_the_preset():
    m = build_model(MICRO, img_size=48, decoder_embed_dim=64, decoder_depth=3)
    assert m.patch_embed.num_patches == (48 // 4) ** 2
    assert m.decoder_embed.out_features == 64 and len(m.decoder_blocks) == 3


def test_attention_is_timms_fused_sdpa(micro):
    assert isinstance(micro.blocks[0], timm.models.vision_transformer.Block)
    assert micro.blocks[0].attn.fused_attn


# ----------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.75, 0.9, 0.95])
def test_mask_keeps_exactly_int_L_times_1_minus_r(micro, ratio):
    x = micro.patch_embed(images(4)) + micro.pos_embed[:, 1:]
    L = x.shape[1]
    kept, mask, _ = micro.random_masking(x, ratio)
    assert kept.shape[1] == int(L * (1 - ratio))
    assert torch.all(mask.sum(1) == L - int(L * (1 - ratio)))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_ids_restore_inverts_the_shuffle_and_kept_are_smallest_noise(micro):
    x = torch.arange(16, dtype=torch.float32).repeat(2, 1).unsqueeze(-1)  # [2, 16, 1]: each patch its index
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(1))
    kept, mask, ids_restore = micro.random_masking(x, 0.75, noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(16).expand(2, 16))
    for i in range(2):
        smallest = set(torch.argsort(noise[i])[:4].tolist())
        assert set(kept[i, :, 0].long().tolist()) == smallest  # x holds its own index
        assert set(torch.nonzero(mask[i] == 0).flatten().tolist()) == smallest


def test_same_noise_same_mask_and_loss(micro):
    imgs = images(2)
    noise = torch.rand(2, micro.patch_embed.num_patches, generator=torch.Generator().manual_seed(3))
    a = micro(imgs, 0.75, noise=noise)
    b = micro(imgs, 0.75, noise=noise)
    c = micro(imgs, 0.75, noise=torch.rand_like(noise))
    assert torch.equal(a[2], b[2]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[2], c[2])


# ----------------------------------------------------------------------------------- loss
def test_loss_ignores_predictions_on_visible_patches(micro):
    imgs = images(2)
    _, pred, mask = micro(imgs, 0.75)
    target = micro.patch_targets(imgs)
    base = micro.forward_loss(imgs, pred, mask)
    tampered = torch.where(mask.unsqueeze(-1).bool(), pred, pred + 100.0)  # change visible ones only
    assert torch.allclose(micro.forward_loss(imgs, tampered, mask), base)
    perfect = torch.where(mask.unsqueeze(-1).bool(), target, pred)  # masked ones exact
    assert micro.forward_loss(imgs, perfect, mask).item() == pytest.approx(0.0, abs=1e-10)
    manual = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(base, manual)


def test_norm_pix_loss_targets_have_per_patch_zero_mean_unit_unbiased_std():
    m = build_model(MICRO, norm_pix_loss=True)
    imgs = images(2) * 3 + 5
    t = m.patch_targets(imgs)
    assert torch.allclose(t.mean(-1), torch.zeros(t.shape[:2]), atol=1e-5)
    raw = m.patchify(imgs)
    expected_std = (raw.var(-1, unbiased=True) / (raw.var(-1, unbiased=True) + 1e-6)).sqrt()
    assert torch.allclose(t.std(-1, unbiased=True), expected_std, atol=1e-4)


# ----------------------------------------------------------------------------------- patches
def test_patchify_unpatchify_round_trip_and_pqc_order(micro):
    imgs = images(2)
    patches = micro.patchify(imgs)
    assert torch.equal(micro.unpatchify(patches), imgs)
    p = micro.patch_size
    # patch 1 is row 0, column 1 (row-major); inside it, (row, col, channel) with channel fastest
    r, c, ch = 2, 3, 1
    assert patches[0, 1, (r * p + c) * 3 + ch] == imgs[0, ch, 0 * p + r, 1 * p + c]
    grid = micro.grid_size
    assert patches[1, grid, 0] == imgs[1, 0, p, 0]  # patch `grid` starts row 1


# ----------------------------------------------------------------------------------- position embeddings
def test_sincos_layout_first_half_column_second_half_row():
    d, g = 16, 4
    table = sincos_2d(d, g, cls_token=True)
    assert table.shape == (1 + g * g, d)
    assert torch.all(table[0] == 0)  # cls position is zeros
    row, col = 2, 3
    idx = 1 + row * g + col
    assert torch.allclose(table[idx, : d // 2], sincos_1d(d // 2, torch.tensor([col])).float()[0])
    assert torch.allclose(table[idx, d // 2 :], sincos_1d(d // 2, torch.tensor([row])).float()[0])
    # sin of every frequency first, then cos: at position 0, sin=0 and cos=1
    zero = sincos_1d(8, torch.tensor([0.0]))[0]
    assert torch.equal(zero, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1], dtype=zero.dtype))


def test_init_follows_release(micro):
    assert not micro.pos_embed.requires_grad and not micro.decoder_pos_embed.requires_grad
    assert torch.allclose(micro.pos_embed[0], sincos_2d(64, micro.grid_size, cls_token=True))
    for name, mod in micro.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert torch.all(mod.bias == 0), name
            bound = math.sqrt(6.0 / (mod.in_features + mod.out_features))
            assert mod.weight.abs().max() <= bound + 1e-6, name
        if isinstance(mod, torch.nn.LayerNorm):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0) and mod.eps == 1e-6
    assert 0.005 < micro.cls_token.std() < 0.05


# ----------------------------------------------------------------------------------- weights I/O
def test_official_key_names_round_trip(tmp_path, micro):
    names = set(micro.state_dict())
    for key in ["cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed.proj.weight",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.bias",
                "blocks.1.norm2.bias", "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "norm.weight",
                "decoder_embed.weight", "decoder_blocks.0.attn.qkv.bias", "decoder_norm.weight",
                "decoder_pred.bias"]:
        assert key in names, key
    path = tmp_path / "full.pth"
    torch.save({"model": micro.state_dict()}, path)  # the release's file layout
    other = build_model(MICRO)
    report = load_mae_weights(other, path, require_decoder=True)
    assert report == {"resized": [], "decoder_missing": []}
    for k, v in micro.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_encoder_only_file_loads_and_leaves_decoder(tmp_path, micro):
    path = save_encoder(micro, tmp_path / "enc.pth")
    other = build_model(MICRO)
    before = other.decoder_pred.weight.clone()
    report = load_mae_weights(other, path)
    assert "decoder_pred.weight" in report["decoder_missing"]
    assert torch.equal(other.decoder_pred.weight, before)
    assert torch.equal(other.blocks[1].mlp.fc2.weight, micro.blocks[1].mlp.fc2.weight)
    with pytest.raises(CheckpointError, match="missing keys: .*decoder"):
        load_mae_weights(build_model(MICRO), path, require_decoder=True)


def test_misfit_file_names_the_keys(tmp_path, micro):
    path = tmp_path / "wide.pth"
    torch.save({"model": build_model(MICRO, embed_dim=96, num_heads=2).state_dict()}, path)
    expected = r"shape mismatch \(file vs model\): blocks.0.attn.proj.bias \(96,\) vs \(64,\)"
    with pytest.raises(CheckpointError, match=expected):
        load_mae_weights(micro, path)
    state = dict(micro.state_dict(), extra_head=torch.zeros(1))
    del state["norm.weight"]
    with pytest.raises(CheckpointError, match="missing keys: norm.weight; unexpected keys: extra_head"):
        load_mae_weights(build_model(MICRO), state)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": _Evil()}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        load_mae_weights(build_model(MICRO), path)
    assert not (tmp_path / "pwned").exists()


class _Evil:
    def __reduce__(self):
        return (open, ("pwned", "w"))


def test_pos_embed_interpolated_for_other_image_size(tmp_path, micro):
    state = micro.state_dict()
    g = torch.Generator().manual_seed(0)  # random tables: a zero cls row would pass any cls handling
    tables = {k: torch.randn(state[k].shape, generator=g) for k in ("pos_embed", "decoder_pos_embed")}
    path = tmp_path / "m.pth"
    torch.save({"model": {**state, **tables}}, path)
    bigger = build_model(MICRO, img_size=48)
    report = load_mae_weights(bigger, path, require_decoder=True)
    assert report["resized"] == ["pos_embed", "decoder_pos_embed"]
    assert bigger.pos_embed.shape == (1, 1 + 12 * 12, 64)
    for key, src in tables.items():
        got = bigger.state_dict()[key]
        assert torch.equal(got[0, 0], src[0, 0])  # cls position kept as is
        # patch rows: bicubic on the 8x8 grid, as the release's interpolate_pos_embed (no antialias)
        grid = src[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
        want = torch.nn.functional.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False)
        assert torch.allclose(got[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 144, -1), atol=1e-5)
    loss, _, _ = bigger(images(1, 48))
    assert torch.isfinite(loss)


def test_timm_vit_loads_exported_encoder_and_gives_same_features(tmp_path, micro):
    path = save_encoder(micro, tmp_path / "enc.safetensors")
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, **timm_vit_kwargs(micro))
    from safetensors.torch import load_file

    vit.load_state_dict(load_file(path), strict=True)
    vit.eval()
    x = images(2)
    assert torch.allclose(vit.forward_features(x), micro.forward_features(x), atol=1e-5)
    assert set(encoder_state_dict(micro)) == set(vit.state_dict())


def test_mask_token_in_encoder_baseline_runs_encoder_on_all_tokens():
    m = build_model(MICRO, mask_token_in_encoder=True)
    seen = []
    m.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    loss, pred, mask = m(images(2), 0.75)
    L = m.patch_embed.num_patches
    assert seen == [L + 1] and pred.shape == (2, L, 48) and torch.all(mask.sum(1) == L - int(L * 0.25))
    loss.backward()
    assert m.mask_token.grad is not None and m.mask_token.shape[-1] == 64


# ----------------------------------------------------------------------------------- it learns
def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    m = MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2,
                             decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    imgs = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.95))
    first = None
    for _ in range(300):
        loss, _, _ = m(imgs, 0.75, noise=noise)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10


# --------------------------------------------------------------------------- mask sampling (Fig. 6, Table 1f)
def _neighbour_fraction(removed: torch.Tensor) -> float:
    """Of the removed patches, the fraction with a removed 4-neighbour to the right or below."""
    right = removed[:, :-1] & removed[:, 1:]
    down = removed[:-1, :] & removed[1:, :]
    return (right.sum() + down.sum()).item() / (2 * removed.sum().item())


@pytest.mark.parametrize("sampling, ratio", [("random", 0.75), ("block", 0.5), ("block", 0.75), ("grid", 0.75)])
def test_every_sampling_removes_exactly_the_ratio_and_is_repeatable(sampling, ratio):
    model = build_model("mae_vit_micro_patch4", mask_sampling=sampling)  # 8 x 8 patches
    imgs = torch.randn(16, 3, 32, 32)
    torch.manual_seed(3)
    loss, _, mask = model(imgs, mask_ratio=ratio)
    torch.manual_seed(3)
    _, _, again = model(imgs, mask_ratio=ratio)
    assert torch.equal(mask, again)  # drawn from torch's RNG: a seeded epoch gives the same masks
    assert (mask.sum(1) == 64 - int(64 * (1 - ratio))).all() and torch.isfinite(loss)


def test_grid_keeps_the_top_left_patch_of_every_2x2_cell():
    model = build_model("mae_vit_micro_patch4", mask_sampling="grid")
    _, _, mask = model(torch.randn(3, 3, 32, 32), mask_ratio=0.75)
    kept = (mask == 0).view(3, 8, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[::2, ::2] = True
    assert all(torch.equal(k, expected) for k in kept)
    with pytest.raises(ValueError, match="mask_ratio must be 0.75"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=0.5)


def test_block_masks_remove_large_blocks_random_masks_do_not():
    """BEiT-style blocks: nearly every removed patch has a removed neighbour, far more often than under
    uniform sampling at the same ratio (0.78 vs ~0.5 at 50 % on 8 x 8), and the blocks differ from sample to sample."""
    torch.manual_seed(0)
    masks = {s: build_model("mae_vit_micro_patch4", mask_sampling=s)(torch.randn(64, 3, 32, 32), mask_ratio=0.5)[2]
             for s in ("random", "block")}
    frac = {s: sum(_neighbour_fraction(m.view(8, 8).bool()) for m in ms) / len(ms) for s, ms in masks.items()}
    assert frac["block"] > 0.7 and frac["random"] < 0.6, frac
    assert len({tuple(m.tolist()) for m in masks["block"]}) > 60


def test_block_mask_follows_beits_generator():
    from mae_ray.model.mae import block_mask

    rng = np.random.default_rng(0)
    shortfalls = []
    for _ in range(200):
        m = block_mask(14, 98, rng)
        assert m.sum() <= 98  # never more than asked: a block is only taken if it fits
        shortfalls.append(98 - int(m.sum()))
    assert np.mean(shortfalls) < 2  # the few it leaves are removed at random by mask_noise


def test_unknown_mask_sampling_is_refused():
    with pytest.raises(ValueError, match="mask_sampling must be one of"):
        build_model("mae_vit_micro_patch4", mask_sampling="blocks")
