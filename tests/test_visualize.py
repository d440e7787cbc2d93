"""Reconstruction pictures (visualize.reconstruct) of an MAE trained here, in-process, on the demo images,
and the PNG pre-training logs of them, read back from MLflow.

The model predicts per-patch normalised pixels (``norm_pix_loss=True``, as every shipped config): the picture
has to put each patch's mean and std back, and a removed patch's must come from the visible ones (the input's
own would leak its average colour and contrast, and let an untrained model look good). Everything the removed
patches show must come from the visible ones.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mae_ray.data.loader import make_eval_loader, make_train_loader
from mae_ray.data.transforms import build_transform, eval_transform, normalize_batch
from mae_ray.model.mae import MaskedAutoencoderViT
from mae_ray.model.presets import resolve_model_kwargs
from mae_ray.model.visualize import fixed_noise, grid_place, reconstruct
from mae_ray.train import engine, optim

MASK_RATIO = 0.75
STEPS = 100  # batches of 32: a few seconds on a quiet 2-core CPU
PATCH = 4


def train_mae(demo, seed: int = 0, steps: int = STEPS) -> MaskedAutoencoderViT:
    """The micro MAE after ``steps`` AdamW steps of the product's pre-training epoch on the demo images."""
    torch.manual_seed(seed)
    model = MaskedAutoencoderViT(**resolve_model_kwargs("mae_vit_micro_patch4", {"norm_pix_loss": True}))
    loader = make_train_loader(demo["train"], batch_size=32, transform=build_transform("pretrain", 32, normalize=False),
                               num_workers=0, samples_per_epoch=32 * steps, seed=seed, shuffle_buffer=200)
    plan = engine.StepPlan(len(loader), 1, epochs=1, warmup_epochs=0.1)
    cpu = torch.device("cpu")
    optimizer = optim.pretrain_optimizer(model, 2e-3, 0.05, cpu)
    engine.train_one_epoch(model, ((normalize_batch(x), y) for x, y in loader), optimizer,
                           optim.build_scheduler(optimizer, plan, 0.0), engine.Precision("none", cpu),
                           epoch=0, plan=plan, mask_ratio=MASK_RATIO, device=cpu)
    return model.eval()


def eval_images(demo, split: str, batch_size: int):
    """The pictures' view of ``split``: the demo's own evaluation crop (dataset.json), as pre-training shows them."""
    from mae_ray.config import DataConfig

    transform = eval_transform(DataConfig(train_shards=demo["train"], val_shards=demo["val"]), 32)
    return make_eval_loader(demo[split], batch_size=batch_size, transform=transform, img_size=32, num_workers=0)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Normalised images -> the pictures' [0, 1] display space (as reconstruct shows them)."""
    from mae_ray.model.visualize import IMAGENET_MEAN, IMAGENET_STD

    return (x * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)


def patch_mask(model, noise: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] bool, True on the pixels of the patches the fixed noise removes."""
    length = noise.shape[1]
    keep = int(length * (1 - MASK_RATIO))
    removed = torch.ones_like(noise)
    removed.scatter_(1, noise.argsort(dim=1)[:, :keep], 0.0)  # the smallest noise is kept (random_masking)
    return model.unpatchify(removed.unsqueeze(-1).repeat(1, 1, PATCH * PATCH * 3))[:, :1].bool()


@pytest.fixture(scope="module")
def trained(demo_data):
    return train_mae(demo_data)


@pytest.fixture(scope="module")
def val_images(demo_data):
    return next(iter(eval_images(demo_data, "val", 64)))[0]  # [64, 3, 32, 32], normalised


@pytest.fixture(scope="module")
def mean_image(demo_data):
    """The training set's mean image, in display space: what a model that learnt nothing of the input shows."""
    total, count = torch.zeros(3, 32, 32), 0
    for x, _ in eval_images(demo_data, "train", 256):
        total += to_unit(x).sum(dim=0)
        count += x.shape[0]
    return total / count


def test_visible_patches_of_the_picture_are_the_inputs_exactly(trained, val_images):
    noise = fixed_noise(val_images.shape[0], trained.patch_embed.num_patches)
    pics = reconstruct(trained, val_images, MASK_RATIO, noise)
    removed = patch_mask(trained, noise).expand_as(val_images)
    original = to_unit(val_images)
    assert torch.equal(pics["original"], original)
    assert removed.float().mean().item() == MASK_RATIO  # 48 of 64 patches per image
    for name in ("reconstruction + visible", "masked"):
        assert torch.equal(pics[name][~removed], original[~removed]), name  # bit for bit
    assert not torch.equal(pics["reconstruction + visible"][removed], original[removed])  # predicted, not copied


def test_predicted_patches_come_from_the_visible_ones_and_are_closer_than_the_mean_image(
        trained, val_images, mean_image):
    noise = fixed_noise(val_images.shape[0], trained.patch_embed.num_patches)
    removed = patch_mask(trained, noise).expand_as(val_images)
    pics = reconstruct(trained, val_images, MASK_RATIO, noise)
    # The removed patches of the input replaced by noise: the prediction may not change (the model
    # never saw them), so the picture is not the input in disguise.
    scrambled = torch.where(removed, torch.randn_like(val_images), val_images)
    assert torch.equal(reconstruct(trained, scrambled, MASK_RATIO, noise)["reconstruction"], pics["reconstruction"])

    original = to_unit(val_images)

    def masked_error(picture: torch.Tensor) -> float:
        return ((picture.expand_as(original) - original)[removed] ** 2).mean().item()

    error = masked_error(pics["reconstruction"])
    # Masked-patch MSE of the reconstruction / of the mean image, measured over train_mae seeds 0-2 with
    # norm_pix_loss: 0.350-0.353 after 100 steps, 1.12-1.19 untrained. 0.6 sits well inside that gap.
    assert error < 0.6 * masked_error(mean_image), error
    # / of the picture with the prediction zeroed (the visible patches' statistics alone, flat patches):
    # 0.48-0.49 after 100 steps, 1.53-1.64 untrained. What the picture shows is the model's, not only the stats'.
    flat = copy.deepcopy(trained)
    torch.nn.init.zeros_(flat.decoder_pred.weight)
    torch.nn.init.zeros_(flat.decoder_pred.bias)
    assert error < 0.75 * masked_error(reconstruct(flat, val_images, MASK_RATIO, noise)["reconstruction"]), error


def test_the_logged_picture_holds_the_pictures_pixels(trained, demo_data, tmp_path):
    """Pre-training's pictures (pretrain._Pictures, 8 validation images) logged to a real MLflow store, downloaded
    and decoded: each picture's pixels, 8-bit, where visualize.grid_place says, and the input's as they are."""
    import numpy as np
    from mlflow import MlflowClient
    from PIL import Image

    from mae_ray import tracking
    from mae_ray.config import load_config
    from mae_ray.jobs.pretrain import _Pictures

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = load_config(None, ["model.name=mae_vit_micro_patch4", "model.img_size=32", "model.norm_pix_loss=true",
                             f"data.train_shards={demo_data['train']}", f"data.val_shards={demo_data['val']}",
                             f"mlflow.tracking_uri={uri}", f"output_dir={tmp_path}/run"])
    run_id = tracking.start_run(uri, "visualize", "pictures", {})
    _Pictures(cfg, trained, cfg.output_dir).maybe_log(0, True, tracking.EpochLogger(uri, run_id))
    [artifact] = MlflowClient(uri).list_artifacts(run_id, "reconstructions")
    local = MlflowClient(uri).download_artifacts(run_id, artifact.path, str(tmp_path / "download"))
    png = torch.from_numpy(np.array(Image.open(local).convert("RGB"))).permute(2, 0, 1)  # [3, H, W] uint8

    images = next(iter(eval_images(demo_data, "val", 8)))[0]  # what _Pictures shows: the first 8
    noise = fixed_noise(8, trained.patch_embed.num_patches)
    pics = reconstruct(trained, images, MASK_RATIO, noise)
    assert list(pics) == ["original", "masked", "reconstruction", "reconstruction + visible"]  # the columns
    bottom, right, scale = grid_place(8, len(pics), (32, 32), titled=True)
    assert png.shape == (3, bottom, right) and scale == 5
    removed = patch_mask(trained, noise).expand_as(images)
    for c, name in enumerate(pics):
        for r in range(8):
            top, left, _ = grid_place(r, c, (32, 32), titled=True)
            cell = png[:, top : top + 32 * scale, left : left + 32 * scale]
            pixels = cell[:, ::scale, ::scale]
            assert torch.equal(cell, pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)), (name, r)
            shown = pixels.float() / 255
            assert (shown - pics[name][r]).abs().max() <= 0.5 / 255 + 1e-6, (name, r)  # 8-bit rounding only
            if name != "reconstruction":  # the input's own pixels where it is visible
                visible = ~removed[r]
                assert (shown[visible] - to_unit(images[r : r + 1])[0][visible]).abs().max() <= 0.5 / 255 + 1e-6
    # the column names are written above the columns
    header = png[:, :grid_place(0, 0, (32, 32), titled=True)[0]]
    for c in range(len(pics)):
        _, left, _ = grid_place(0, c, (32, 32), titled=True)
        assert (header[:, :, left : left + 32 * scale] < 128).any(), c
