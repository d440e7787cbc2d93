"""Raw shard samples -> (image, label) for the loaders: decoding, and skipping what cannot be read.

A corrupt sample is skipped and counted (``data/skipped``) without webdataset's ``warn_and_continue`` sleep per
error; a streak of them means the data is unusable; a label outside the classifier is the shards and the config
disagreeing, which skipping would hide: it raises. Collation keeps encoded JPEGs (``data.decode: gpu``) a list.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import default_collate

from mae_ray.data.shards import IMAGE_EXTENSIONS, RawSample
from mae_ray.data.transforms import Transform, check_pixels, decode_rgb
from mae_ray.errors import DataError
from mae_ray.redaction import redact

log = logging.getLogger(__name__)

MAX_SKIP_STREAK = 100  # consecutive undecodable training samples => the data is unusable
_LOGGED_SKIPS = 5  # per worker and epoch; the total is reported as data/skipped


class Skips:
    """Per-worker count of skipped samples for the current epoch."""

    def __init__(self, max_streak: int | None) -> None:
        self.count = 0
        self._streak = 0
        self._max_streak = max_streak

    def record(self, sample: RawSample, exn: Exception) -> None:
        self.count += 1
        self._streak += 1
        if self.count <= _LOGGED_SKIPS:
            log.warning("%s", redact(f"skipping sample {sample.key}: {exn!r}"))
        if self._max_streak is not None and self._streak >= self._max_streak:
            raise DataError(f"{self._streak} consecutive unreadable samples, last {sample.key}: {exn!r}")

    def ok(self) -> None:
        self._streak = 0


def decode_raw(sample: RawSample, raw: bool = False) -> tuple[torch.Tensor, int]:
    """(CHW uint8 image, label); ``raw``: the image's encoded JPEG bytes as a 1-D uint8 tensor instead."""
    if sample.broken:
        raise DataError(f"the shard broke here: {sample.error}")
    if sample.rejected:
        raise DataError(sample.rejected)
    image_ext = next((ext for ext in sample.files if ext in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        raise DataError(f"no image member among {sorted(sample.files)}")
    if "cls" not in sample.files:
        raise DataError("no cls member")
    data = sample.files[image_ext]
    if not raw:
        return decode_rgb(data), int(sample.files["cls"])
    if data[:3] != b"\xff\xd8\xff":  # decoded on the GPU (data.decode=gpu), which reads JPEG only
        raise DataError(f"{image_ext} member is not a JPEG (data.decode=gpu decodes JPEG only)")
    check_pixels(data)  # the header's size, here: the device decodes a whole batch in one call
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), int(sample.files["cls"])


def decoded(
    samples: Iterable[RawSample], transform: Transform | None, skips: Skips, num_classes: int | None = None
) -> Iterator[tuple[torch.Tensor, int]]:
    """``transform`` None: the encoded bytes, for decoding on the device (``device_decode``)."""
    for sample in samples:
        try:
            image, label = decode_raw(sample, raw=transform is None)
        except Exception as exn:  # noqa: BLE001 - corrupt data is skipped and counted, never fatal
            skips.record(sample, exn)
            continue
        skips.ok()
        if num_classes is not None and not 0 <= label < num_classes:
            # Not corruption but shards and classifier that disagree: skipping would hide it, and the
            # loss would fail with an obscure CUDA assert (or silently ignore label -1).
            raise DataError(
                f"sample {sample.key} of {sample.url} has label {label}, outside 0..{num_classes - 1} for "
                f"{num_classes} classes: the shards do not match data.num_classes / their dataset.json"
            )
        yield (image if transform is None else transform(image)), label  # transform errors are bugs: raise


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    # default_collate stacks straight into shared memory inside a worker: no extra copy (webdataset's
    # default collation goes through numpy for the labels). Encoded images (1-D, of any length) stay a list.
    if batch and batch[0][0].dim() == 1:
        return [image for image, _ in batch], torch.tensor([label for _, label in batch])
    images, labels = default_collate(batch)
    return images, labels
