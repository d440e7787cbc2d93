"""Weights in and out of ``MaskedAutoencoderViT``: official ``.pth`` files, resizing, timm export.

Released files are dicts with the weights under ``model``: encoder-only (``mae_pretrain_vit_*``) or
encoder + decoder (``*_full``, ``mae_visualize_*``). Everything is read with
``torch.load(weights_only=True)``: a file that needs unpickling of arbitrary objects is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from timm.layers import resample_abs_pos_embed

from mae_ray.errors import CheckpointError
from mae_ray.model.mae import MaskedAutoencoderViT, is_decoder_key

POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt`` file (``{"model": ...}`` or a bare state_dict) or ``.safetensors``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for pickled objects, RuntimeError for non-torch files
        raise CheckpointError(unreadable_checkpoint(path, e)) from None
    return state_dict_of(obj, path)


def state_dict_of(obj: object, path: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded weights file (``{"model": ...}`` or a bare state_dict); ``path`` for the error."""
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state_dict (expected a dict of tensors, or one under 'model')")
    return dict(state)


def unreadable_checkpoint(path: str, error: Exception) -> str:
    """One line on why ``torch.load(path, weights_only=True)`` failed.

    torch's own first line advises loading with ``weights_only=False`` (arbitrary code execution);
    the reason that matters is in its "WeightsUnpickler error" part.
    """
    text = str(error).strip()
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please |\n\n|$)", text, re.S)
    reason = " ".join(found.group(1).split()) if found else (text.splitlines() or [type(error).__name__])[0]
    return (f"cannot read {path} as a weights-only checkpoint (a torch file of tensors only; "
            f"pickled objects are refused): {reason}")


def resize_pos_embeds(state: dict[str, torch.Tensor], model: torch.nn.Module) -> list[str]:
    """Interpolate position tables in ``state`` to the model's grid (bicubic, cls kept). Returns keys changed.

    Same values as the release's ``interpolate_pos_embed`` (and HF ViTMAE's): plain bicubic, no antialias.
    timm's default ``antialias=True`` switches to another cubic kernel, up to 0.05 off on ViT-B's 224->256 table.
    """
    own = model.state_dict()
    changed = []
    for key in POS_EMBED_KEYS:
        if key in state and key in own and state[key].shape != own[key].shape:
            src, dst = state[key], own[key]
            if src.shape[-1] != dst.shape[-1]:
                continue  # a width mismatch is an architecture mismatch: reported by the caller
            grid = int((dst.shape[1] - 1) ** 0.5)
            state[key] = resample_abs_pos_embed(src, [grid, grid], num_prefix_tokens=1, antialias=False)
            changed.append(key)
    return changed


def build_mae(model_kwargs: Mapping[str, object], encoder: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
              name: str | None = None) -> MaskedAutoencoderViT:
    """The MAE of ``model_kwargs`` initialised from ``seed``, with ``encoder`` (MAE names) loaded when given: what an
    evaluation judges (its decoder stays at init; evaluation never uses it). ``name``: the weights' source, for
    errors."""
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(**model_kwargs)
    if encoder is not None:
        load_mae_weights(model, encoder, name=name)
    return model


def load_mae_weights(
    model: MaskedAutoencoderViT,
    source: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    require_decoder: bool = False,
    name: str | None = None,
) -> dict[str, list[str]]:
    """Load official or mae-ray weights into ``model``, checking that the file fits.

    An encoder-only file leaves the decoder at its initialisation unless ``require_decoder``.
    Position tables of another image size are interpolated. Anything else that does not fit
    (unexpected keys, missing encoder keys, other shapes) raises CheckpointError naming the keys
    (and the file: ``source``, or ``name`` when ``source`` is a state_dict read from one).
    """
    state = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    resized = resize_pos_embeds(state, model)
    own = model.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and (require_decoder or not is_decoder_key(k)))
    shapes = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    )
    if unexpected or missing or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatch (file vs model): {_short(shapes)}")
        name = name or (source if not isinstance(source, Mapping) else "state_dict")
        raise CheckpointError(f"weights in {name} do not fit this model; " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return {"resized": resized, "decoder_missing": sorted(k for k in own if k not in state)}


def encoder_state_dict(model: MaskedAutoencoderViT) -> dict[str, torch.Tensor]:
    """The encoder's tensors under timm ViT names (identical to the release's): no decoder, no mask token."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not is_decoder_key(k)}


def save_encoder(model: MaskedAutoencoderViT, path: str | os.PathLike) -> str:
    """Write the encoder as ``{"model": state_dict}`` (.pth, the release's layout) or safetensors."""
    path = os.fspath(path)
    state = encoder_state_dict(model)
    tmp = path + ".tmp"
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, tmp)
    else:
        torch.save({"model": state}, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the real name
    return path


def timm_vit_kwargs(model: MaskedAutoencoderViT) -> dict[str, object]:
    """``timm.create_model`` keywords giving a ViT whose encoder matches ``model`` (cls-token pooling)."""
    blk = model.blocks[0]
    return {
        "img_size": model.patch_embed.img_size[0],
        "patch_size": model.patch_size,
        "in_chans": model.in_chans,
        "embed_dim": model.cls_token.shape[-1],
        "depth": len(model.blocks),
        "num_heads": blk.attn.num_heads,
        "mlp_ratio": blk.mlp.fc1.out_features / blk.mlp.fc1.in_features,
        "qkv_bias": True,
        "num_classes": 0,
        "global_pool": "token",
    }


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
