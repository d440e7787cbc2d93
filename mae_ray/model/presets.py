"""Model presets: constructor keywords of ``MaskedAutoencoderViT`` by name.

Kept free of torch so that config validation can resolve a preset (and check, say, that
``img_size`` divides by ``patch_size``) before anything heavy is imported.
The three official names and sizes are the paper's (Table in ../shared/reference/mae-paper.md);
the small ones exist so that a 2-core CPU can train in minutes.
"""

from __future__ import annotations

# Every constructor keyword of MaskedAutoencoderViT, with the release's defaults.
MODEL_DEFAULTS: dict[str, object] = {
    "img_size": 224,
    "patch_size": 16,
    "in_chans": 3,
    "embed_dim": 1024,
    "depth": 24,
    "num_heads": 16,
    "decoder_embed_dim": 512,
    "decoder_depth": 8,
    "decoder_num_heads": 16,
    "mlp_ratio": 4.0,
    "norm_pix_loss": False,
    "mask_token_in_encoder": False,
    "mask_sampling": "random",  # random | block | grid (Fig. 6)
    "target": "pixel",  # pixel | pca (Table 1d): what the decoder predicts of each patch
    "pca_components": None,  # target=pca: leading coefficients predicted; None: default_pca_components()
}

MASK_SAMPLINGS = ("random", "block", "grid")
TARGETS = ("pixel", "pca")


def default_pca_components(patch_size: int, in_chans: int) -> int:
    """One in eight of a patch's dimensions: the paper's 96 of a 16x16x3 patch's 768.

    A share rather than a fixed 96: a 4x4x3 patch has only 48 dimensions, and all of them would make
    the PCA target a mere rotation of the pixels (the same squared error), not the ablation.
    """
    return max(1, patch_size**2 * in_chans // 8)


_DECODER_512_8 = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}

PRESETS: dict[str, dict[str, object]] = {
    # The paper's models (decoder 512-d, 8 blocks).
    "mae_vit_base_patch16": {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **_DECODER_512_8},
    "mae_vit_large_patch16": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16, **_DECODER_512_8},
    "mae_vit_huge_patch14": {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16, **_DECODER_512_8},
    # Small models for CPU work; widths follow timm's ViT-Ti/S, decoders shrunk to match.
    "mae_vit_small_patch16": {
        "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
        "decoder_embed_dim": 256, "decoder_depth": 4, "decoder_num_heads": 8,
    },
    "mae_vit_tiny_patch16": {
        "patch_size": 16, "embed_dim": 192, "depth": 12, "num_heads": 3,
        "decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4,
    },
    # For 32-64 px demo images: 4 px patches give 64 patches at 32 px.
    "mae_vit_tiny_patch4": {
        "img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3,
        "decoder_embed_dim": 128, "decoder_depth": 2, "decoder_num_heads": 4,
    },
    # For unit tests: as small as a ViT can be while still being one.
    "mae_vit_micro_patch4": {
        "img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
        "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
    },
}

# timm model names whose ViT has the same encoder (used by export and tests).
TIMM_NAMES: dict[str, str] = {
    "mae_vit_base_patch16": "vit_base_patch16_224",
    "mae_vit_large_patch16": "vit_large_patch16_224",
    "mae_vit_huge_patch14": "vit_huge_patch14_224",
    "mae_vit_small_patch16": "vit_small_patch16_224",
    "mae_vit_tiny_patch16": "vit_tiny_patch16_224",
}


def resolve_model_kwargs(name: str, overrides: dict[str, object] | None = None) -> dict[str, object]:
    """Preset ``name`` with ``overrides`` (keys whose value is None are ignored) applied on top."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
    kwargs = {**MODEL_DEFAULTS, **PRESETS[name]}
    for key, value in (overrides or {}).items():
        if key not in MODEL_DEFAULTS:
            raise KeyError(f"unknown model keyword {key!r}; valid: {', '.join(MODEL_DEFAULTS)}")
        if value is not None:
            kwargs[key] = value
    return kwargs
