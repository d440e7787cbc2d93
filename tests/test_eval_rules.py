"""Evaluation as the release runs it (issue 26): the crop rule by image size, and the linear probe's
BatchNorm fed features of one precision in training and evaluation. In-process, a few seconds."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mae_ray.data.transforms import build_transform, eval_transform, normalize_batch
from mae_ray.jobs.linprobe import LinearProbeHead, probe_forwards
from mae_ray.model.mae import build_model


def _photo(h: int, w: int) -> torch.Tensor:
    """A uint8 CHW image whose every pixel differs from its neighbours (a crop shows in the result)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("size, full_frame", [(224, False), (448, True), (32, False)])
def test_the_default_eval_crop_is_the_releases_rule_by_size(size, full_frame):
    """Up to 224 px ImageNet's 0.875 (resize to 256, centre 224); above it the full frame (the release's
    ViT-H 448 px row), also through a job's ``eval_transform`` when neither config nor dataset.json sets one."""
    img = _photo(size + size // 4, size + size // 2)
    default = build_transform("eval", size, normalize=False)(img)
    whole = build_transform("eval", size, normalize=False, crop_ratio=1.0)(img)
    imagenet = build_transform("eval", size, normalize=False, crop_ratio=0.875)(img)
    assert torch.equal(default, whole if full_frame else imagenet)
    assert not torch.equal(whole, imagenet)
    data = SimpleNamespace(crop_ratio=None, train_shards="", val_shards="")
    assert torch.equal(eval_transform(data, size, normalize=False)(img), default)
    data.crop_ratio = 0.875  # a setting always wins over the rule
    assert torch.equal(eval_transform(data, size, normalize=False)(img), imagenet)


class _Bf16OnCpu:
    """The job's Precision as on a GPU with amp: bf16 (CPU autocast stands in for CUDA's here)."""

    def autocast(self):
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("cached", [False, True])
def test_the_probes_batchnorm_sees_features_of_one_precision_in_training_and_evaluation(cached):
    torch.manual_seed(0)
    encoder = build_model("mae_vit_micro_patch4").eval().requires_grad_(False)
    head = LinearProbeHead(encoder.cls_token.shape[-1], 10)
    seen = []
    head.bn.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    precision = _Bf16OnCpu()
    train_forward, eval_forward = probe_forwards(encoder, head, head, "cls", precision, cached=cached,
                                                 normalize=normalize_batch)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    inputs = encoder.forward_features(normalize_batch(images))[:, 0] if cached else images
    head.train()
    with precision.autocast():  # as classify.train_epoch calls it
        train_forward(inputs)
    head.eval()
    with torch.no_grad():  # as classify.score calls it: no autocast of its own
        eval_forward(inputs if cached else normalize_batch(images))
    assert seen[0].dtype == seen[1].dtype
    assert torch.equal(seen[0], seen[1])
    if not cached:  # the precision matters here: fp32 features would have differed
        with torch.no_grad():
            fp32 = encoder.forward_features(normalize_batch(images))[:, 0]
        assert not torch.equal(seen[1].float(), fp32)
