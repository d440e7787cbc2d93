"""``data.decode: gpu``: JPEG bytes decoded and augmented on the training device, not in loader processes.

At the goal speed one H100 pre-trains ViT-B/16 MAE on ~6,700 images/s, while decoding and cropping JPEGs
costs a CPU core a few hundred per second (docs/performance.md): a 16-core host cannot keep up by CPU
decoding alone. With ``data.decode: gpu`` the loader processes only read the shards and ship each sample's
encoded bytes and label (:func:`mae_ray.data.loader.make_train_loader` with ``raw=True``); the training
process decodes the whole batch in one call (``torchvision.io.decode_jpeg`` on a list, nvJPEG on CUDA),
then takes the pre-training crop and flip of every image on the device and normalises the batch.

The crop is MAE's (``train.augment: crop_random``): ``RandomResizedCrop(scale=(0.2, 1), ratio=(3/4, 4/3))``
then a horizontal flip with probability 1/2, the parameters drawn with torchvision's own sampler from the
process's torch RNG, as the CPU path draws them in its loader processes (seeded per epoch and rank by
``engine.seed_everything``). On ``device="cpu"`` everything but the decode's device is the same path, which
is how the tests exercise it on a machine without a GPU.
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms import RandomResizedCrop as _RRC
from torchvision.transforms.v2 import functional as F

from mae_ray.data.transforms import normalize_batch
from mae_ray.errors import DataError

SCALE, RATIO = (0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0)  # MAE's crop_random (transforms._pretrain_augment)


def crop_params(image: torch.Tensor) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flip) of one image's pre-training crop: torchvision's sampler."""
    top, left, height, width = _RRC.get_params(image, scale=list(SCALE), ratio=list(RATIO))
    return top, left, height, width, bool(torch.rand(1) < 0.5)


def pretrain_batch(encoded: list[torch.Tensor], device: torch.device, img_size: int,
                   skips: list[int] | None = None) -> torch.Tensor:
    """JPEG bytes (1-D uint8 tensors) -> the normalised pre-training batch ``[B', 3, S, S]`` on ``device``.

    One decoder call for the batch; if it fails (a corrupt JPEG with a valid signature), each image on its
    own, the undecodable ones left out and counted in ``skips[0]`` as the CPU path counts its own."""
    images = _decode(encoded, device, skips)
    out = torch.empty(len(images), 3, img_size, img_size, dtype=torch.uint8, device=device)
    for k, image in enumerate(images):  # [3, H, W] uint8 each
        top, left, height, width, flip = crop_params(image)
        crop = F.resized_crop(image, top, left, height, width, [img_size, img_size],
                              interpolation=InterpolationMode.BICUBIC, antialias=True)
        out[k] = crop.flip(-1) if flip else crop
    return normalize_batch(out)  # [B', 3, S, S] float32


def _decode(encoded: list[torch.Tensor], device: torch.device, skips: list[int] | None) -> list[torch.Tensor]:
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)  # one call for the batch
    except RuntimeError:
        pass
    images = []
    for data in encoded:
        try:
            images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            if skips is not None:
                skips[0] += 1
    if not images:
        raise DataError(f"none of the {len(encoded)} JPEGs of a batch could be decoded (data.decode=gpu)")
    return images
