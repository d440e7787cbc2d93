"""The checks of a run configuration (:func:`validate`) that need more than one key, or a range: each failure is
one ``ConfigError`` line that says what to change. ``config.py`` holds the settings; this, what they may be.
Knows nothing of torch or Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mae_ray.errors import ConfigError
from mae_ray.model.presets import MASK_SAMPLINGS, PRESETS, TARGETS
from mae_ray.train import recipe

if TYPE_CHECKING:
    from mae_ray.config import Config, ModelConfig, RayConfig

# Pre-training augmentation, the paper's Table 1e; MAE's is crop_random (RandomResizedCrop 0.2-1 + flip).
PRETRAIN_AUGMENTS = ("none", "crop_fixed", "crop_random", "crop_random_jitter")
AMP_MODES = ("bf16", "fp16", "none")


def _validate_group(ray: RayConfig) -> None:
    if ray.min_workers is None:
        return
    if ray.num_workers == 0:
        raise ConfigError("ray.min_workers needs Ray workers: ray.num_workers 0 runs in this process")
    if not 1 <= ray.min_workers <= ray.num_workers:
        raise ConfigError(f"ray.min_workers must be in [1, ray.num_workers = {ray.num_workers}], got {ray.min_workers}")
    if ray.resize_check_s <= 0:
        raise ConfigError(f"ray.resize_check_s must be > 0 seconds, got {ray.resize_check_s}")
    fractional = [f"{key} {value:g}" for key, value in (("ray.cpus_per_worker", ray.cpus_per_worker),
                  ("ray.gpus_per_worker", ray.gpus_per_worker if ray.use_gpu else 1)) if value != int(value)]
    if ray.elastic and fractional:
        # Ray 2.60's elastic policy counts workers from whole resources: with 0.6 CPU each on 2 CPUs it saw 2
        # workers where 3 fit and, below min_workers, waited for ever at 100 % of a core
        raise ConfigError(f"an elastic group (ray.min_workers) needs whole CPUs and GPUs per worker, not "
                          f"{' and '.join(fractional)}: Ray's elastic scaling miscounts fractional ones")


def validate(cfg: Config) -> None:
    """Checks that need more than one key, or a range; each failure says what to change."""
    m = cfg.model
    if m.name not in PRESETS:
        raise ConfigError(f"model.name: unknown preset {m.name!r}; choose one of: {', '.join(PRESETS)}")
    if not 0.0 < m.mask_ratio < 1.0:
        raise ConfigError(f"model.mask_ratio must be in (0, 1), got {m.mask_ratio}")
    k = m.kwargs()
    if k["img_size"] % k["patch_size"]:
        raise ConfigError(
            f"model.img_size {k['img_size']} is not divisible by model.patch_size {k['patch_size']}"
        )
    if not cfg.mlflow.system_metrics_interval_s > 0:
        raise ConfigError(f"mlflow.system_metrics_interval_s must be > 0 seconds, got "
                          f"{cfg.mlflow.system_metrics_interval_s}")
    endpoint = cfg.storage.endpoint_url
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"storage.endpoint_url must be the http(s):// URL of an S3 server, got {endpoint!r}")
    if cfg.storage.upload_retry_s < 0:
        raise ConfigError(f"storage.upload_retry_s must be >= 0 seconds, got {cfg.storage.upload_retry_s}")
    _validate_group(cfg.ray)
    if not 0 < cfg.ray.gpus_per_worker <= 8:
        raise ConfigError(f"ray.gpus_per_worker must be in (0, 8], got {cfg.ray.gpus_per_worker}")
    if cfg.data.decode not in ("cpu", "gpu"):
        raise ConfigError(f"data.decode must be cpu or gpu, got {cfg.data.decode!r}")
    if cfg.data.decode == "gpu" and not cfg.ray.use_gpu:
        raise ConfigError("data.decode=gpu decodes on the training GPU: it needs ray.use_gpu=true")
    if cfg.data.decode == "gpu" and cfg.train.augment != "crop_random":
        raise ConfigError(f"data.decode=gpu takes MAE's crop_random augmentation only, not train.augment="
                          f"{cfg.train.augment}: use data.decode=cpu for the other Table 1e settings")
    if cfg.train.augment not in PRETRAIN_AUGMENTS:
        raise ConfigError(f"train.augment must be one of {', '.join(PRETRAIN_AUGMENTS)}, got {cfg.train.augment!r}")
    if k["mask_sampling"] not in MASK_SAMPLINGS:
        raise ConfigError(f"model.mask_sampling must be one of {', '.join(MASK_SAMPLINGS)}, "
                          f"got {k['mask_sampling']!r}")
    _validate_target(m, k)
    if k["mask_sampling"] == "grid" and (m.mask_ratio != 0.75 or (k["img_size"] // k["patch_size"]) % 2):
        raise ConfigError("model.mask_sampling=grid keeps one patch of every 2x2: it needs model.mask_ratio=0.75 "
                          "and an even number of patches per side")
    for width, heads, what in (
        ("embed_dim", "num_heads", "encoder"),
        ("decoder_embed_dim", "decoder_num_heads", "decoder"),
    ):
        if k[width] % k[heads]:
            raise ConfigError(
                f"model.{width} {k[width]} is not divisible by model.{heads} {k[heads]} "
                f"(the {what} width must split evenly over its attention heads)"
            )
        if k[width] % 4:
            raise ConfigError(f"model.{width} {k[width]} must be divisible by 4 (2-D sin-cos position embedding)")
    positive = {
        "model.embed_dim": k["embed_dim"], "model.depth": k["depth"], "model.decoder_depth": k["decoder_depth"],
        "model.patch_size": k["patch_size"], "model.img_size": k["img_size"],
        "train.epochs": cfg.train.epochs, "train.batch_size": cfg.train.batch_size,
        "train.accum_iter": cfg.train.accum_iter, "train.checkpoint_every": cfg.train.checkpoint_every,
        "data.shuffle_buffer": cfg.data.shuffle_buffer, "data.max_image_pixels": cfg.data.max_image_pixels,
        "data.max_member_bytes": cfg.data.max_member_bytes, "data.shard_tries": cfg.data.shard_tries,
    }
    _at_least(1, positive)
    non_negative = {
        "train.warmup_epochs": cfg.train.warmup_epochs, "train.blr": cfg.train.blr,
        "train.weight_decay": cfg.train.weight_decay, "train.visualize_every": cfg.train.visualize_every,
        "train.knn_every": cfg.train.knn_every, "ray.num_workers": cfg.ray.num_workers,
        "ray.failure_max_retries": cfg.ray.failure_max_retries, "data.num_workers": cfg.data.num_workers,
        **{f"cost.{k}": v for k, v in vars(cfg.cost).items() if v is not None},
    }
    _at_least(0, non_negative)
    for key, value in {
        "linprobe.epochs": cfg.linprobe.epochs, "linprobe.batch_size": cfg.linprobe.batch_size,
        "finetune.epochs": cfg.finetune.epochs, "finetune.batch_size": cfg.finetune.batch_size,
        "eval.knn_k": cfg.eval.knn_k, "eval.knn_train_samples": cfg.eval.knn_train_samples,
        "eval.knn_val_samples": cfg.eval.knn_val_samples,
    }.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if cfg.finetune.samples_per_epoch is not None and cfg.finetune.samples_per_epoch < 1:
        raise ConfigError(f"finetune.samples_per_epoch must be >= 1, got {cfg.finetune.samples_per_epoch}")
    if cfg.data.crop_ratio is not None and not 0 < cfg.data.crop_ratio <= 1:
        raise ConfigError(f"data.crop_ratio must be in (0, 1] (1.0: the whole image), got {cfg.data.crop_ratio}")
    if cfg.train.checkpoint_every_minutes is not None and not cfg.train.checkpoint_every_minutes > 0:
        raise ConfigError("train.checkpoint_every_minutes must be > 0 (null: checkpoints at epoch ends only), got "
                          f"{cfg.train.checkpoint_every_minutes}")
    for section in ("train", "linprobe", "finetune"):
        sec = getattr(cfg, section)
        if sec.amp is not None and sec.amp not in AMP_MODES:
            raise ConfigError(f"{section}.amp must be one of {', '.join(AMP_MODES)}, got {sec.amp!r}")
        if sec.checkpoint_every is not None and sec.checkpoint_every < 1:
            raise ConfigError(f"{section}.checkpoint_every must be >= 1, got {sec.checkpoint_every}")
    for key, value, allowed in (("linprobe.pool", cfg.linprobe.pool, ("cls", "mean")),
                                ("finetune.head_norm", cfg.finetune.head_norm, ("layer", "batch"))):
        if value not in allowed:
            raise ConfigError(f"{key} must be {' or '.join(allowed)}, got {value!r}")
    if cfg.finetune.trainable_blocks is not None and not 0 <= cfg.finetune.trainable_blocks <= k["depth"]:
        raise ConfigError(f"finetune.trainable_blocks must be in [0, {k['depth']}] (model.depth), "
                          f"got {cfg.finetune.trainable_blocks}")
    if cfg.finetune.mixup > 0 or cfg.finetune.cutmix > 0:
        if cfg.finetune.batch_size % 2:
            raise ConfigError(f"finetune.batch_size must be even for mixup/cutmix, got {cfg.finetune.batch_size}")
    if not 0 < cfg.finetune.layer_decay <= 1:
        raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {cfg.finetune.layer_decay}")
    if cfg.train.amp not in ("bf16", "fp16", "none"):
        raise ConfigError(f"train.amp must be one of bf16, fp16, none; got {cfg.train.amp!r}")
    for job in ("pretrain", "linprobe", "finetune"):
        recipe.for_job(cfg, job)  # effective batches that the configured workers cannot divide
    if cfg.ray.cpus_per_worker <= 0:
        raise ConfigError(f"ray.cpus_per_worker must be > 0, got {cfg.ray.cpus_per_worker}")
    if not cfg.output_dir:
        raise ConfigError("output_dir must not be empty")


def _at_least(minimum: int, values: dict[str, float]) -> None:
    for key, value in values.items():
        if value < minimum:
            raise ConfigError(f"{key} must be >= {minimum}, got {value}")


def _validate_target(m: ModelConfig, k: dict[str, Any]) -> None:
    if k["target"] not in TARGETS:
        raise ConfigError(f"model.target must be one of {', '.join(TARGETS)}, got {k['target']!r}")
    patch_dim = k["patch_size"] ** 2 * k["in_chans"]
    if k["pca_components"] is not None and not 1 <= k["pca_components"] <= patch_dim:
        raise ConfigError(f"model.pca_components must be in [1, {patch_dim}] (a patch's p*p*channels values), "
                          f"got {k['pca_components']}")
    if k["target"] == "pca" and k["norm_pix_loss"]:
        raise ConfigError("model.target=pca regresses PCA coefficients of the pixels; model.norm_pix_loss "
                          "normalises pixel targets only: set model.norm_pix_loss=false")
    if m.pca_fit_images < 1:
        raise ConfigError(f"model.pca_fit_images must be >= 1, got {m.pca_fit_images}")
