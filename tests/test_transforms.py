"""The evaluation transform's crop ratio as a data setting (``data.crop_ratio``, dataset.json's ``crop_ratio``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mae_ray.config import DataConfig, load_config
from mae_ray.data.shards import manifest_crop_ratio
from mae_ray.data.transforms import DEFAULT_CROP_RATIO, build_transform, eval_transform
from mae_ray.errors import ConfigError


def framed(size: int = 32, width: int = 1) -> torch.Tensor:
    """A full-frame picture: a white border ``width`` px wide around a black inside, CHW uint8."""
    img = torch.full((3, size, size), 255, dtype=torch.uint8)
    img[:, width:-width, width:-width] = 0
    return img


def border(img: torch.Tensor) -> torch.Tensor:
    return torch.cat([img[:, 0, :], img[:, -1, :], img[:, :, 0], img[:, :, -1]], dim=1).float()


def test_crop_ratio_one_keeps_the_border_and_0875_drops_it():
    img = framed()
    whole = build_transform("eval", 32, normalize=False, crop_ratio=1.0)(img)
    assert whole.shape == (3, 32, 32) and border(whole).min() >= 250  # every border pixel still white
    cropped = build_transform("eval", 32, normalize=False, crop_ratio=0.875)(img)
    assert cropped.shape == (3, 32, 32) and border(cropped).max() <= 5  # 36 px, centre 32: the frame is gone
    default = build_transform("eval", 32, normalize=False)(img)
    assert DEFAULT_CROP_RATIO == 0.875 and torch.equal(default, cropped)
    with pytest.raises(ValueError, match="crop_ratio"):
        build_transform("eval", 32, crop_ratio=1.5)


def shards_with_manifest(folder, **manifest):
    folder.mkdir(parents=True)
    (folder / "train-000000.tar").write_bytes(b"")
    (folder / "dataset.json").write_text(json.dumps({"shards": {"train-000000.tar": 0}, **manifest}))
    return str(folder / "train-000000.tar")


def test_the_dataset_json_ratio_is_used_unless_the_config_sets_one(tmp_path):
    whole = shards_with_manifest(tmp_path / "whole", crop_ratio=1.0)
    plain = shards_with_manifest(tmp_path / "plain")
    assert manifest_crop_ratio(whole) == 1.0 and manifest_crop_ratio(plain) is None
    assert manifest_crop_ratio("https://example.invalid/train-000000.tar") is None  # remote: not read

    def edge(**data) -> torch.Tensor:
        return border(eval_transform(DataConfig(**data), 32, normalize=False)(framed()))

    assert edge(train_shards=whole).min() >= 250
    assert edge(train_shards=plain).max() <= 5
    assert edge(train_shards=plain, val_shards=whole).min() >= 250  # the validation shards' when training's has none
    assert edge(train_shards=whole, crop_ratio=0.875).max() <= 5  # the config wins over the manifest
    assert load_config(None, ["data.crop_ratio=1"]).data.crop_ratio == 1.0
    with pytest.raises(ConfigError, match="data.crop_ratio"):
        load_config(None, ["data.crop_ratio=0"])


def test_make_shards_and_the_demo_write_the_ratio(tmp_path):
    from data_tools.demo_data import build_demo_dataset
    from data_tools.make_shards import make_shards

    for name in ("a", "b"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / name / "x.png")
    make_shards(tmp_path / "imgs", tmp_path / "out", progress=False)
    assert manifest_crop_ratio(str(tmp_path / "out")) is None  # not asked for: not written
    make_shards(tmp_path / "imgs", tmp_path / "out", progress=False, crop_ratio=0.9)  # complete: metadata only
    assert manifest_crop_ratio(str(tmp_path / "out")) == 0.9
    demo = build_demo_dataset(tmp_path / "demo", num_train=20, num_val=10, size=16)
    assert manifest_crop_ratio(demo["train"]) == manifest_crop_ratio(demo["val"]) == 1.0


# --------------------------------------------------------------------------- pre-training augmentation (Table 1e)
def _windows(big: torch.Tensor, size: int) -> set[bytes]:
    """Every size x size window of a CHW image, and of its mirror image, as bytes."""
    out = set()
    for img in (big, big.flip(-1)):
        for top in range(big.shape[1] - size + 1):
            for left in range(big.shape[2] - size + 1):
                out.add(img[:, top:top + size, left:left + size].contiguous().numpy().tobytes())
    return out


def test_pretrain_augmentations_do_what_table_1e_names():
    torch.manual_seed(0)
    img = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8)
    views = {a: [build_transform("pretrain", 32, normalize=False, augment=a)(img) for _ in range(6)]
             for a in ("none", "crop_fixed", "crop_random", "crop_random_jitter")}
    # none: the same view every time, the centre square resized
    assert all(torch.equal(v, views["none"][0]) for v in views["none"])
    # crop_fixed: a 32 px window (maybe mirrored) of the image resized to 36 px, never rescaled again
    resized = build_transform("eval", 32, normalize=False, crop_ratio=1.0)  # only for the shape check below
    assert resized(img).shape == (3, 32, 32)
    from torchvision.transforms import v2
    big = v2.Resize(36, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)(img)
    windows = _windows(big, 32)
    assert all(v.contiguous().numpy().tobytes() in windows for v in views["crop_fixed"])
    assert len({v.numpy().tobytes() for v in views["crop_fixed"]}) > 1
    # crop_random rescales (not a window of the 36 px image); + jitter changes the colours of the same crop
    assert any(v.contiguous().numpy().tobytes() not in windows for v in views["crop_random"])
    torch.manual_seed(5)
    plain = build_transform("pretrain", 32, normalize=False, augment="crop_random")(img)
    torch.manual_seed(5)
    jittered = build_transform("pretrain", 32, normalize=False, augment="crop_random_jitter")(img)
    assert not torch.equal(plain, jittered)
    with pytest.raises(ValueError, match="pre-training augmentation"):
        build_transform("pretrain", 32, augment="jitter")
    with pytest.raises(ConfigError, match="train.augment must be one of"):
        load_config(None, ["train.augment=jitter"])


def _ramp_jpeg() -> bytes:
    """A 256 px JPEG whose red value is the column and green value the row: a crop's pixels say where it was."""
    import io

    import numpy as np
    from PIL import Image

    x = np.arange(256, dtype=np.uint8)
    pixels = np.stack([np.tile(x, (256, 1)), np.tile(x[:, None], (1, 256)), np.full((256, 256), 128, np.uint8)], -1)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=98)
    return out.getvalue()


def _crop_stats(batch: torch.Tensor) -> dict[str, float]:
    """Mean crop width and height (fractions of the image), centre and flip rate of normalised crops."""
    from mae_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = (batch * std + mean) * 255  # [N, 3, S, S] back to 0..255
    red, green = pixels[:, 0], pixels[:, 1]
    width = (red.amax((1, 2)) - red.amin((1, 2))) / 255
    height = (green.amax((1, 2)) - green.amin((1, 2))) / 255
    flipped = (red[:, :, -1].mean(1) < red[:, :, 0].mean(1)).float()
    area = width * height
    return {"width": width.mean().item(), "height": height.mean().item(), "centre_x": red.mean().item() / 255,
            "centre_y": green.mean().item() / 255, "flip": flipped.mean().item(), "area": area.mean().item(),
            "below_scale": (area < 0.17).float().mean().item()}  # crops smaller than MAE's 0.2 of the image


def test_gpu_decoding_crops_as_the_cpu_path_does():
    """``data.decode=gpu``'s device path (here on the CPU: only the decode's device differs) draws the same
    RandomResizedCrop and flip distribution as the loader's CPU transform: the crops' sizes, places and flip
    rate agree over 400 draws each (a scale range or flip probability off by a little shows)."""
    from mae_ray.data.device_decode import pretrain_batch
    from mae_ray.data.transforms import build_transform, decode_rgb, normalize_batch

    data, n = _ramp_jpeg(), 400
    torch.manual_seed(0)
    cpu = build_transform("pretrain", 32, normalize=False)
    image = decode_rgb(data)
    cpu_batch = normalize_batch(torch.stack([cpu(image) for _ in range(n)]))
    torch.manual_seed(1)
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    device_batch = pretrain_batch([encoded] * n, torch.device("cpu"), 32)
    assert device_batch.shape == cpu_batch.shape == (n, 3, 32, 32) and device_batch.dtype == torch.float32
    a, b = _crop_stats(cpu_batch), _crop_stats(device_batch)
    for key in a:
        assert abs(a[key] - b[key]) < 0.05, (key, a, b)
    assert 0.4 < b["flip"] < 0.6 and 0.45 < b["width"] < 0.85  # a real spread of crops, half of them flipped
