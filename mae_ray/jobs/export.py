"""``mae-ray export RUN_ID|CHECKPOINT --format timm|hf|release --out DIR``: a pre-trained encoder a user can take
anywhere, with a model card (``README.md``) that says what it is: its architecture, its pre-training recipe and
data, the accuracies its runs recorded, and the run it came from.

- ``release``: ``checkpoint.pth``, ``{"model": state_dict}`` under the MAE release's names (its ``main_finetune.py``
  and ``main_linprobe.py`` load it as they load the official weights);
- ``timm``: ``model.safetensors`` and timm's ``config.json``: ``timm.create_model("local-dir:DIR", pretrained=True)``;
- ``hf``: ``model.safetensors`` under Hugging Face's names and a ``ViTMAEConfig``: ``ViTMAEModel.from_pretrained``
  (the MAE encoder, masking as in pre-training) and ``ViTModel.from_pretrained`` (every patch: features) load it.
  Needs the ``[hf]`` extra (transformers).

The encoder is read as an evaluation reads it (``encoders.resolve_encoder``): a checkpoint folder or file, on disk
or in a bucket, or ``runs:/ID``. Nothing is written until it has loaded; the folder is written whole or not at all.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from mae_ray import tracking
from mae_ray.config import load_config
from mae_ray.errors import ConfigError, UserError
from mae_ray.jobs.encoders import EncoderSource, resolve_encoder
from mae_ray.model.mae import MaskedAutoencoderViT
from mae_ray.model.weights import encoder_state_dict, save_encoder, timm_vit_kwargs

FORMATS = ("timm", "hf", "release")
# the recipe settings the card lists, as the run recorded them
RECIPE = ("model.name", "model.mask_ratio", "model.norm_pix_loss", "model.mask_sampling", "model.target",
          "train.epochs", "train.warmup_epochs", "train.effective_batch", "train.batch_size", "train.lr", "train.blr",
          "train.weight_decay", "train.augment", "train.seed", "data.train_shards", "data.samples_per_epoch")
ACCURACIES = ("linprobe_top1", "finetune_top1", "knn_top1", "train_loss")


def run(source: str, fmt: str, out: str, *, config: str | None = None, overrides: list[str] | None = None
        ) -> dict[str, Any]:
    """Export the encoder of ``source`` to ``out`` in ``fmt``; returns what was written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} already exists and is not an empty folder: give a new --out")
    if fmt == "hf":
        _transformers()  # a missing extra is one line, before anything is read
    cfg = load_config(config, [*(overrides or []), f"eval.checkpoint={source}"])
    uri = tracking.resolve_tracking_uri(cfg.mlflow.tracking_uri)
    found = resolve_encoder(source, cfg, uri)
    if found.state is None:
        raise UserError("eval.checkpoint random has no pre-trained encoder to export")
    model = found.build()
    if fmt == "hf" and model.mask_token_in_encoder:
        raise UserError("--format hf: this encoder runs on mask tokens too (model.mask_token_in_encoder, Table 1c), "
                        "which Hugging Face's ViTMAE cannot express; export it as timm or release")
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(out)) or ".")
    try:
        written = {"timm": _timm, "hf": _hf, "release": _release}[fmt](model, tmp, found)
        card = model_card(found, model, fmt, uri)
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(card)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"format": fmt, "out": os.path.abspath(out), "files": sorted([*written, "README.md"]),
            "encoder": found.label, "run_id": found.origin_run_id}


# --------------------------------------------------------------------------- the formats
def _release(model: MaskedAutoencoderViT, folder: str, found: EncoderSource) -> list[str]:
    save_encoder(model, os.path.join(folder, "checkpoint.pth"))
    return ["checkpoint.pth"]


def _timm(model: MaskedAutoencoderViT, folder: str, found: EncoderSource) -> list[str]:
    kwargs = timm_vit_kwargs(model)
    size = kwargs["img_size"]
    config = {"architecture": "vit_base_patch16_224", "num_classes": 0, "model_args": kwargs,
              "pretrained_cfg": {"input_size": [kwargs["in_chans"], size, size], "num_classes": 0,
                                 "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "crop_pct": 0.875,
                                 "interpolation": "bicubic"}}
    _write_json(os.path.join(folder, "config.json"), config)
    save_file({k: v.contiguous() for k, v in encoder_state_dict(model).items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return ["config.json", "model.safetensors"]


def _hf(model: MaskedAutoencoderViT, folder: str, found: EncoderSource) -> list[str]:
    transformers = _transformers()
    k = timm_vit_kwargs(model)
    recipe = found.saved_config
    hidden = model.decoder_embed.out_features
    config = transformers.ViTMAEConfig(
        image_size=k["img_size"], patch_size=k["patch_size"], num_channels=k["in_chans"], hidden_size=k["embed_dim"],
        num_hidden_layers=k["depth"], num_attention_heads=k["num_heads"],
        intermediate_size=int(k["embed_dim"] * k["mlp_ratio"]), layer_norm_eps=1e-6, qkv_bias=True,
        hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        decoder_hidden_size=hidden, decoder_num_hidden_layers=len(model.decoder_blocks),
        decoder_num_attention_heads=model.decoder_blocks[0].attn.num_heads,
        decoder_intermediate_size=model.decoder_blocks[0].mlp.fc1.out_features,
        mask_ratio=recipe.model.mask_ratio if recipe else 0.75, norm_pix_loss=bool(model.norm_pix_loss))
    config.save_pretrained(folder)
    save_file(hf_encoder_state(encoder_state_dict(model)), os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    return ["config.json", "model.safetensors"]


def hf_encoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's tensors (the release's names) under Hugging Face's ``ViTMAEModel`` / ``ViTModel`` names
    (transformers 5: ``layers.N.attention.q_proj``, ...; the fused qkv split in three)."""
    rest, out = dict(state), {}
    singles = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
               "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
               "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
               "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for name, hf in singles.items():
        out[hf] = rest.pop(name)
    per_block = {"norm1": "layernorm_before", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
                 "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in rest:
        for part in ("weight", "bias"):
            q, kk, v = rest.pop(f"blocks.{i}.attn.qkv.{part}").chunk(3)
            for x, t in (("q", q), ("k", kk), ("v", v)):
                out[f"layers.{i}.attention.{x}_proj.{part}"] = t
            for name, hf in per_block.items():
                out[f"layers.{i}.{hf}.{part}"] = rest.pop(f"blocks.{i}.{name}.{part}")
        i += 1
    if rest:
        raise UserError(f"--format hf: encoder tensors with no Hugging Face name: {sorted(rest)[:5]}")
    return {k: v.contiguous() for k, v in out.items()}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("--format hf needs transformers: pip install 'mae-ray[hf]'") from None
    return transformers


# --------------------------------------------------------------------------- the model card
def model_card(found: EncoderSource, model: MaskedAutoencoderViT, fmt: str, uri: str) -> str:
    """``README.md``: what the encoder is, how it was made, how well it did, and how to load it."""
    k = timm_vit_kwargs(model)
    params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("decoder") and n != "mask_token")
    recipe = found.saved_config
    run = _run(uri, found.origin_run_id)
    lines = [f"# MAE ViT encoder ({recipe.model.name if recipe else 'mae-ray'})", "",
             "A Vision Transformer encoder pre-trained as a masked autoencoder (He et al. 2021) with mae-ray.", "",
             "## Architecture", "",
             f"ViT, patch {k['patch_size']}, image {k['img_size']} px, width {k['embed_dim']}, depth {k['depth']}, "
             f"{k['num_heads']} heads, MLP ratio {k['mlp_ratio']:g}, class token; {params / 1e6:.2f} M parameters "
             "(encoder only).", "", "## Pre-training recipe and data", ""]
    flat = recipe.flatten() if recipe else {}
    # a preset's own values where the run left a model key to it (None in its config)
    flat.update({f"model.{k}": v for k, v in found.model_kwargs.items() if flat.get(f"model.{k}") is None})
    lines += [f"- `{key}`: {tracking.redact(str(flat[key]))}" for key in RECIPE if flat.get(key) is not None] or [
        "- not recorded with this encoder"]
    for dataset in run["datasets"]:
        lines.append(f"- data ({dataset['context']}): {dataset['name']} (digest {dataset['digest']}), "
                     f"{dataset['profile']}")
    lines += ["", "## Recorded accuracies", ""]
    lines += [f"- `{key}`: {run['metrics'][key]:.2f}" for key in ACCURACIES if key in run["metrics"]] or [
        "- none recorded (no MLflow run of this encoder in the tracking store)"]
    lines += ["", "## Provenance", "", f"- source: `{tracking.redact(found.label)}`",
              f"- MLflow run: `{found.origin_run_id or 'unknown'}`", "", "## Loading", "", "```python",
              *LOADING[fmt], "```", ""]
    return "\n".join(lines)


LOADING = {
    "release": ['import torch',
                'state = torch.load("checkpoint.pth", weights_only=True)["model"]  # the release\'s names'],
    "timm": ['import timm', 'vit = timm.create_model("local-dir:.", pretrained=True)  # run in this folder'],
    "hf": ['from transformers import ViTMAEModel, ViTModel', 'mae = ViTMAEModel.from_pretrained(".")  # masks as in '
           'pre-training', 'vit = ViTModel.from_pretrained(".", add_pooling_layer=False)  # every patch: features'],
}


def _run(uri: str, run_id: str | None) -> dict[str, Any]:
    """The pre-training run's metrics and datasets, when it is in this tracking store."""
    if not run_id or not tracking.run_exists(uri, run_id):
        return {"metrics": {}, "datasets": []}
    run = MlflowClient(uri).get_run(run_id)
    datasets = [{"context": next((t.value for t in d.tags if t.key == "mlflow.data.context"), "?"),
                 "name": d.dataset.name, "digest": d.dataset.digest, "profile": d.dataset.profile}
                for d in (run.inputs.dataset_inputs if run.inputs else [])]
    return {"metrics": run.data.metrics, "datasets": datasets}


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)

