"""Typed run configuration: dataclasses loaded from YAML, with dotted ``--set key=value`` overrides.

Validated once, before any Ray or model work: a mistake is one ``ConfigError`` line naming the key.
Knows nothing of torch or Ray (model presets come from the torch-free ``presets`` module).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import yaml

from mae_ray import shipped
from mae_ray.config_checks import validate
from mae_ray.model.presets import MODEL_DEFAULTS, resolve_model_kwargs
from mae_ray.typed_yaml import flatten, from_dict, parse_override, read_yaml, set_dotted, set_typed


@dataclass
class ModelConfig:
    """A preset by name; every constructor keyword left as None takes the preset's value."""

    name: str = "mae_vit_tiny_patch4"
    mask_ratio: float = 0.75
    img_size: int | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    decoder_embed_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mlp_ratio: float | None = None
    norm_pix_loss: bool | None = None
    mask_token_in_encoder: bool | None = None
    mask_sampling: str | None = None  # random (MAE) | block (BEiT-style) | grid (keep 1 of 4); Fig. 6
    target: str | None = None  # pixel (MAE; norm_pix_loss per-patch normalises it) | pca (Table 1d)
    pca_components: int | None = None  # target=pca: coefficients predicted; None: 1/8 of p*p*3 (the paper's 96/768)
    pca_fit_images: int = 1000  # target=pca: training images the basis is fitted on, once, before epoch 0

    def kwargs(self) -> dict[str, Any]:
        """Resolved ``MaskedAutoencoderViT`` keywords: the preset with this config's overrides."""
        return resolve_model_kwargs(self.name, {k: getattr(self, k) for k in MODEL_DEFAULTS})


@dataclass
class DataConfig:
    train_shards: str = ""  # path, directory, brace pattern or URL (see docs/data.md)
    val_shards: str = ""
    num_classes: int | None = None  # None: read from dataset.json beside the shards
    samples_per_epoch: int | None = None  # None: the training set's size
    num_workers: int = 2  # DataLoader processes per Ray worker
    shuffle_buffer: int = 1000
    # evaluation crop: resize to img_size / crop_ratio, centre crop; None: dataset.json's crop_ratio, else the
    # release's rule: 0.875 up to 224 px, 1.0 (the full frame) above
    crop_ratio: float | None = None
    # where pre-training's JPEGs are decoded and cropped: cpu (the loader processes) | gpu (the training GPU,
    # a batch at a time: data/device_decode.py; the loader processes only read the shards)
    decode: str = "cpu"
    # bounds on what a shard may hand a loader (a shared bucket is not trusted): an image over this many
    # pixels (PIL's own default cap, ~89 M) or a member over this many bytes is skipped and counted, unread
    max_image_pixels: int = 89_478_485
    max_member_bytes: int = 64 * 2**20
    # a remote shard (http(s)://, s3://) that cannot be opened is tried this many times in all, then the job
    # ends naming it
    shard_tries: int = 3


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64  # per Ray worker, per step; effective = batch_size * accum_iter * workers
    effective_batch: int | None = None  # the recipe's batch (paper: 4096); accum_iter derived (mae_ray/train/recipe.py)
    blr: float = 1.5e-4  # base lr: lr = blr * effective batch / 256 (the paper's rule)
    lr: float | None = None  # absolute lr, overrides blr when set
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_epochs: float = 40
    accum_iter: int = 1
    amp: str = "bf16"  # bf16 | fp16 | none; applies on GPU only
    compile: bool = False
    seed: int = 0
    checkpoint_every: int = 1
    # a checkpoint inside an epoch once this many minutes have passed since the last one (every job: the
    # probe and fine-tuning too); null: at epoch ends only. A preemption notice checkpoints at once either way.
    checkpoint_every_minutes: float | None = 15.0
    visualize_every: int = 0  # 0: only at the end
    knn_every: int = 0  # 0: off
    max_steps_per_epoch: int | None = None  # cap for quick runs and tests
    # pre-training augmentation (Table 1e): none | crop_fixed | crop_random (MAE) | crop_random_jitter
    augment: str = "crop_random"


@dataclass
class RayConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # with use_gpu; 0.5: two workers (or in-process sweep trials) share a GPU
    address: str | None = None  # None: join the cluster under `ray job submit`, else start Ray here
    storage_path: str | None = None  # checkpoints; None: <output_dir>/ray
    failure_max_retries: int = 0
    # elastic group (spot nodes): start once min_workers fit, grow to num_workers, shrink when a node goes;
    # None: num_workers (a fixed group). The recipe holds at every size (train/engine.StepPlan).
    min_workers: int | None = None
    resize_check_s: float = 60.0  # an elastic group looks for room to grow this often (a restart when it does)

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers


@dataclass
class StorageConfig:
    """Object storage (mae_ray/storage.py); credentials come only from the environment."""

    endpoint_url: str | None = None  # an S3-compatible server (MinIO, Ceph, R2); None: $AWS_ENDPOINT_URL, else AWS
    # how long a checkpoint upload keeps trying after its first failure (an outage) before the run fails;
    # each request is already tried 3 times by the S3 client, ~6 s when the server does not answer
    upload_retry_s: float = 60.0
    # checkpoints other than a run's last are copied to storage by a background thread while training goes on
    # (each is visible only once whole either way); false: training waits for every copy
    upload_in_background: bool = True


@dataclass
class CostConfig:
    """What a worker-hour costs, to put a price beside each run's accelerator-hours (None: hours only)."""

    per_gpu_hour: float | None = None  # with ray.use_gpu: per GPU-hour
    per_cpu_hour: float | None = None  # else: per CPU-core-hour


@dataclass
class MlflowConfig:
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite mlflow.db in the cwd
    experiment: str = "mae-ray"
    run_name: str | None = None
    system_metrics: bool = True  # each node's CPU, memory, disk, network (and GPU) into the run: system/<node>/...
    system_metrics_interval_s: float = 10.0


@dataclass
class EvalConfig:
    """Which encoder the evaluation jobs judge, and the online kNN monitor's budget."""

    checkpoint: str = ""  # checkpoint dir or state.pt | official .pth | runs:/RUN_ID | random
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_train_samples: int = 5000  # labelled bank, taken from the training shards
    knn_val_samples: int = 1000



@dataclass
class LinprobeConfig:
    """The paper's linear probe: frozen encoder, BN (no affine) + linear head, LARS."""

    epochs: int = 90
    batch_size: int = 256  # per worker, per step
    effective_batch: int | None = None  # the recipe's batch (paper: 16384); None: batch_size x workers
    blr: float = 0.1  # lr = blr * effective batch / 256
    weight_decay: float = 0.0
    warmup_epochs: float = 10
    min_lr: float = 0.0
    pool: str = "cls"  # cls (the paper) | mean (patch tokens)
    cache_features: bool = False  # extract features once (no augmentation), train the head on them
    # The job's own run settings; None takes pre-training's (train.seed, train.amp, train.checkpoint_every).
    seed: int | None = None
    amp: str | None = None  # bf16 | fp16 | none; applies on GPU only
    checkpoint_every: int | None = None


@dataclass
class FinetuneConfig:
    """The release's fine-tuning recipe (ViT-B defaults)."""

    epochs: int = 100
    batch_size: int = 64  # per worker, per step
    effective_batch: int | None = None  # the recipe's batch (paper: 1024); None: batch_size x workers
    blr: float = 5e-4  # lr = blr * effective batch / 256
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    drop_path: float = 0.1
    warmup_epochs: float = 5
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    trainable_blocks: int | None = None  # None: all; k: only the last k blocks (+ head); 0: head only
    # the pooled feature's norm before the head: layer (the release's fc_norm) | batch (BatchNorm without
    # affine, the linear probe's: removes what every image shares; for short runs on small data, docs/results.md)
    head_norm: str = "layer"
    samples_per_epoch: int | None = None  # None: data.samples_per_epoch, else the training set's size
    # The job's own run settings; None takes pre-training's (train.seed, train.amp, train.checkpoint_every).
    seed: int | None = None
    amp: str | None = None  # bf16 | fp16 | none; applies on GPU only
    checkpoint_every: int | None = None


class RunSettings(NamedTuple):
    """Seed, mixed precision and checkpoint cadence of one job (``Config.run_settings``)."""

    seed: int
    amp: str
    checkpoint_every: int


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linprobe: LinprobeConfig = field(default_factory=LinprobeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    output_dir: str = "outputs/run"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_settings(self, job: str) -> RunSettings:
        """``job`` (pretrain | linprobe | finetune)'s seed, amp and checkpoint_every: its own section's where
        set, else ``train``'s."""
        t = self.train
        own = {"pretrain": t, "linprobe": self.linprobe, "finetune": self.finetune}[job]
        return RunSettings(*(t_value if value is None else value for value, t_value in
                             ((own.seed, t.seed), (own.amp, t.amp), (own.checkpoint_every, t.checkpoint_every))))

    def spend(self) -> tuple[str, float, float | None]:
        """What a worker's time is counted in: (``gpu_hours`` or ``cpu_hours``, those units per worker, the
        price per unit-hour or None)."""
        if self.ray.use_gpu:
            return "gpu_hours", self.ray.gpus_per_worker, self.cost.per_gpu_hour
        return "cpu_hours", self.ray.cpus_per_worker, self.cost.per_cpu_hour

    def flatten(self) -> dict[str, Any]:
        """``{"model.mask_ratio": 0.75, ...}``: every key, for MLflow params and sweep tables."""
        return dict(flatten(self.to_dict()))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def override(self, *items: str) -> Config:
        """A copy of this config with ``key=value`` overrides (as ``--set`` takes them), each checked against its
        field's type, then the whole validated as a loaded config is: the way to derive one config from another
        (a trial's from the sweep's base, an evaluation's from a trial's), with no dict in between."""
        cfg = copy.deepcopy(self)
        for item in items:
            set_typed(cfg, *parse_override(item))
        validate(cfg)
        return cfg


# --------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> Config:
    """YAML file (or ``base``, a config as a dict) + ``key=value`` overrides -> a validated Config."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = read_yaml(shipped.resolve(os.fspath(path), "configs"))
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    cfg = from_dict(Config, data)
    validate(cfg)
    return cfg
