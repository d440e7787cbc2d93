"""Which encoder an evaluation judges (``eval.checkpoint``), resolved once on the driver.

- a mae-ray checkpoint directory (or its ``state.pt``), on disk or in a bucket (``s3://``): weights,
  architecture and the pre-training MLflow run come from the checkpoint itself;
- an official MAE ``.pth`` (``{"model": ...}``, encoder-only or full): architecture from ``model.*``;
- ``runs:/RUN_ID``: the encoder and config that pre-training run logged to MLflow;
- ``random``: the same architecture at its initialisation, the baseline every results table needs.

``model.img_size`` set explicitly in the evaluation config evaluates at that size; position
embeddings are interpolated (weights.load_mae_weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import yaml

from mae_ray.cluster import checkpoints
from mae_ray.config import Config, from_dict
from mae_ray.errors import ConfigError
from mae_ray.model.mae import MaskedAutoencoderViT, is_decoder_key
from mae_ray.model.weights import build_mae, state_dict_of
from mae_ray.tracking import redact, run_exists

_TAG_MAX = 5000  # MLflow's limit on a tag value's length (8000 on recent servers, 5000 on older ones)


@dataclass
class EncoderSource:
    state: dict[str, torch.Tensor] | None  # encoder weights (MAE names); None: random init
    model_kwargs: dict[str, object]
    parent_run_id: str | None  # the pre-training run the results belong to, if known and in this store
    label: str  # for params and messages
    saved_config: Config | None = None  # the pre-training config, when the source carries one
    origin_run_id: str | None = None  # the pre-training run the checkpoint names, in whichever store

    def tags(self) -> dict[str, str]:
        """Where the encoder came from, for the evaluation's run (credentials in URLs redacted)."""
        tags = {"mae_ray.encoder_source": str(redact(self.label))[:_TAG_MAX]}
        if self.origin_run_id:
            tags["mae_ray.encoder_run_id"] = self.origin_run_id
        return tags

    def build(self, seed: int = 0) -> MaskedAutoencoderViT:
        """The MAE with this encoder loaded (decoder left at init: evaluation never uses it)."""
        return build_mae(self.model_kwargs, self.state, seed, name=self.label or None)


def resolve_encoder(checkpoint: str, cfg: Config, tracking_uri: str) -> EncoderSource:
    """Read and check ``checkpoint`` (see module doc); raises CheckpointError/ConfigError with the reason."""
    checkpoint = (checkpoint or "").strip()
    if not checkpoint:
        raise ConfigError("eval.checkpoint is empty: give a checkpoint directory, an official .pth, "
                          "runs:/RUN_ID or random")
    if checkpoint == "random":
        source = EncoderSource(None, cfg.model.kwargs(), None, "random")
    elif checkpoint.startswith("runs:/"):
        source = _from_mlflow(checkpoint, cfg, tracking_uri)
    else:
        source = _from_path(checkpoint, cfg)
    source.build()  # fail here, on the driver, if the weights do not fit
    return in_store(source, tracking_uri)


def in_store(source: EncoderSource, tracking_uri: str) -> EncoderSource:
    """``source`` with its pre-training run as parent only if that run is in this tracking store.

    A checkpoint records the MLflow run of its pre-training, which may live in another store (copied
    checkpoints, another machine's sqlite file) or in none that still exists: the evaluation then gets
    no parent and logs nothing there, and its run keeps the original id (``origin_run_id``) as a tag.
    """
    source.origin_run_id = source.origin_run_id or source.parent_run_id
    if source.parent_run_id and not run_exists(tracking_uri, source.parent_run_id):
        print(f"[eval] the encoder's pre-training run {source.parent_run_id} is not in the tracking store "
              f"{redact(tracking_uri)}: the results go to the evaluation's own run only", flush=True)
        source.parent_run_id = None
    return source


def _from_path(path: str, cfg: Config) -> EncoderSource:
    """A checkpoint folder, ``.pth`` or ``.safetensors``, on disk or in a bucket (the driver reads it once, the
    workers get the weights through Ray's object store)."""
    obj = checkpoints.read_weights_source(path)
    parts = checkpoints.pretraining_parts(obj)
    if parts is not None:  # a mae-ray pre-training checkpoint: its own architecture and MLflow run
        config_text, model_state, run_id = parts
        saved = from_dict(Config, yaml.safe_load(config_text))
        return EncoderSource(_encoder_only(model_state), _with_eval_size(saved, cfg), run_id, path, saved)
    return EncoderSource(_encoder_only(state_dict_of(obj, path)), cfg.model.kwargs(), None, path)


def _from_mlflow(run_uri: str, cfg: Config, tracking_uri: str) -> EncoderSource:
    run_id = run_uri[len("runs:/"):].strip("/").split("/")[0]
    state, config_text = checkpoints.encoder_from_mlflow(run_id, tracking_uri)
    saved = from_dict(Config, yaml.safe_load(config_text)) if config_text is not None else None
    return EncoderSource(_encoder_only(state), _with_eval_size(saved or cfg, cfg), run_id, run_uri, saved)


def _encoder_only(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not is_decoder_key(k)}


def _with_eval_size(saved: Config, cfg: Config) -> dict[str, object]:
    """The saved architecture, at the evaluation's image size when one is set explicitly."""
    kwargs = saved.model.kwargs()
    if cfg.model.img_size is not None:
        kwargs["img_size"] = cfg.model.img_size
    return kwargs
