"""Image decoding and the four transform recipes used by the MAE jobs.

Every transform takes a CHW ``uint8`` RGB tensor (what :func:`decode_rgb` returns) and
returns a float32 ``[3, img_size, img_size]`` tensor normalised with ImageNet statistics.
Tensor transforms (torchvision v2) are used wherever possible because decoding with
``torchvision.io`` and resizing tensors is about twice as fast per core as the PIL path.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mae_ray.config_checks import PRETRAIN_AUGMENTS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TRANSFORM_KINDS = ("pretrain", "linprobe", "finetune", "eval")
DEFAULT_CROP_RATIO = 0.875  # ImageNet's evaluation crop: resize to size / 0.875, centre crop


def default_crop_ratio(img_size: int) -> float:
    """The release's evaluation rule (its util/datasets.py): ImageNet's 224/256 crop up to 224 px, the full
    frame above (its ViT-H 448 px fine-tuning row is evaluated on the whole resized image)."""
    return DEFAULT_CROP_RATIO if img_size <= 224 else 1.0
# File extensions the loader treats as image payloads (webdataset keeps the original bytes).

Transform = Callable[[torch.Tensor], torch.Tensor]
_BICUBIC = v2.InterpolationMode.BICUBIC


# Our own cap (data.max_image_pixels) is checked from the header before any decoder runs, on the CPU and
# the GPU paths alike; PIL's (a warning, then an error at twice its default) would second-guess it.
Image.MAX_IMAGE_PIXELS = None


def check_pixels(data: bytes) -> None:
    """Refuse an image whose header declares more than ``data.max_image_pixels`` pixels (a decompression
    bomb: a few KB that decode to gigabytes) before it is decoded. A header PIL cannot parse is left to the
    decoder, which fails on it if it is not an image."""
    from mae_ray.data.sources import limit

    try:
        with Image.open(io.BytesIO(data)) as pil:  # parses the header only
            width, height = pil.size
    except Exception:  # noqa: BLE001 - not ours to judge: the decoder decides
        return
    cap = limit("max_image_pixels")
    if width * height > cap:
        raise ValueError(f"image of {width}x{height} = {width * height} pixels, over data.max_image_pixels {cap}: "
                         "skipped undecoded")


def decode_rgb(data: bytes) -> torch.Tensor:
    """Decode image bytes to a CHW uint8 RGB tensor (after :func:`check_pixels`).

    torchvision's libjpeg-turbo/libpng decoders handle JPEG (incl. grayscale and CMYK), PNG
    (palette, alpha, 16-bit), WEBP and GIF; anything else (BMP, TIFF...) goes through PIL.
    Raises on undecodable data; the loader counts that sample as skipped.
    """
    check_pixels(data)
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(io.BytesIO(data)) as pil:
            return F.pil_to_tensor(pil.convert("RGB"))
    if image.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        image = F.to_dtype(image, torch.uint8, scale=True)
    return image


_MEAN_255 = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
_INV_STD_255 = 1 / (torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255)


def normalize_batch(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` -> float32 normalised with ImageNet statistics, on any device.

    Used per image by the transforms, or on the GPU for batches of a ``normalize=False``
    transform. One allocation plus two in-place ops: ~80 us/image cheaper on CPU than
    ``v2.ToDtype`` + ``v2.Normalize``, which allocate a tensor each.
    """
    mean, inv_std = _MEAN_255.to(images.device), _INV_STD_255.to(images.device)
    return images.to(torch.float32).sub_(mean).mul_(inv_std)


def _random_resized_crop(img_size: int, scale: tuple[float, float]) -> list[Transform]:
    return [
        v2.RandomResizedCrop(img_size, scale=scale, interpolation=_BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ]


def _pretrain_augment(img_size: int, augment: str) -> list[Transform]:
    if augment == "none":  # the largest centre square, resized: the same view every epoch
        return [v2.Resize(img_size, interpolation=_BICUBIC, antialias=True), v2.CenterCrop(img_size)]
    if augment == "crop_fixed":  # a random img_size crop of the image resized to img_size / 0.875, + flip
        return [v2.Resize(int(img_size / DEFAULT_CROP_RATIO), interpolation=_BICUBIC, antialias=True),
                v2.RandomCrop(img_size), v2.RandomHorizontalFlip()]
    if augment == "crop_random":
        return _random_resized_crop(img_size, scale=(0.2, 1.0))
    if augment == "crop_random_jitter":  # the paper finds colour jitter hurts MAE (Table 1e)
        return [*_random_resized_crop(img_size, scale=(0.2, 1.0)), v2.ColorJitter(0.4, 0.4, 0.4)]
    raise ValueError(f"unknown pre-training augmentation {augment!r}; expected one of {PRETRAIN_AUGMENTS}")


def _eval_resize_crop(img_size: int, crop_ratio: float) -> list[Transform]:
    # ImageNet's 0.875: 224 -> shorter side resized to 256, centre crop 224. 1.0: shorter side resized to
    # img_size, so a square image is kept whole (nothing cut from its border).
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return [v2.Resize(int(img_size / crop_ratio), interpolation=_BICUBIC, antialias=True), v2.CenterCrop(img_size)]


def eval_transform(data_cfg, img_size: int, *, normalize: bool = True) -> Transform:
    """The evaluation transform of a job's data (``cfg.data``): its crop ratio is ``data.crop_ratio`` when
    set, else the ``crop_ratio`` of the dataset.json beside the training (else validation) shards, else the
    release's rule by size (:func:`default_crop_ratio`). Linear probe, fine-tuning, kNN and reconstruction
    pictures all use it."""
    from mae_ray.data.shards import manifest_crop_ratio

    ratio = data_cfg.crop_ratio
    for pattern in (data_cfg.train_shards, data_cfg.val_shards):
        if ratio is None and pattern:
            ratio = manifest_crop_ratio(pattern)
    return build_transform("eval", img_size, normalize=normalize, crop_ratio=ratio)


def _finetune_transform(img_size: int) -> v2.Compose:
    # timm's RandAugment / RandomErasing recipe (MAE fine-tuning) operates on PIL images.
    from timm.data import create_transform

    timm_transform = create_transform(
        input_size=img_size,
        is_training=True,
        # The release's rand-m9-mstd0.5-inc1, magnitudes clipped at 9 instead of 10: at 10, timm 1.0's
        # increasing posterize asks PIL for 0 bits, which Pillow >= 13 refuses (ValueError).
        auto_augment="rand-m9-mstd0.5-inc1-mmax9",
        re_prob=0.25,
        re_mode="pixel",
        re_count=1,
        interpolation="bicubic",
        color_jitter=None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    return v2.Compose([v2.ToPILImage(), timm_transform])


def build_transform(kind: str, img_size: int, *, normalize: bool = True,
                    crop_ratio: float | None = None, augment: str = "crop_random") -> Transform:
    """Return the transform for one of ``pretrain``, ``linprobe``, ``finetune`` or ``eval``.

    ``crop_ratio`` (``eval`` only): resize the shorter side to ``img_size / crop_ratio``, then take the
    centre ``img_size`` square; None: :func:`default_crop_ratio` of ``img_size``. The jobs pass their
    data's ratio through :func:`eval_transform`.
    ``augment`` (``pretrain`` only): one of :data:`PRETRAIN_AUGMENTS` (Table 1e of the paper).

    With ``normalize=False`` the output stays uint8 (4x fewer bytes through the DataLoader's
    shared memory and the host-to-device copy); apply :func:`normalize_batch` on the device.
    Not available for ``finetune``, whose random erasing works on normalised values.
    """
    if kind == "finetune":
        if not normalize:
            raise ValueError("the finetune transform always normalises (random erasing needs it)")
        return _finetune_transform(img_size)
    if kind == "pretrain":
        steps = _pretrain_augment(img_size, augment)
    elif kind == "linprobe":
        steps = _random_resized_crop(img_size, scale=(0.08, 1.0))
    elif kind == "eval":
        steps = _eval_resize_crop(img_size, default_crop_ratio(img_size) if crop_ratio is None else crop_ratio)
    else:
        raise ValueError(f"unknown transform kind {kind!r}; expected one of {TRANSFORM_KINDS}")
    return v2.Compose([*steps, normalize_batch] if normalize else steps)
