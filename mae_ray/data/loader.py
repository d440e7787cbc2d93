"""WebDataset shard loaders for DDP jobs running inside Ray Train workers.

* Training (:func:`make_train_loader`): every (rank, DataLoader worker) walks its own random
  permutations of *all* shards, seeded from ``(seed, epoch, rank, worker)``, and stops after a
  fixed number of batches. Every rank therefore yields exactly ``len(loader)`` batches whatever
  the shard sizes, so DDP never waits on a rank that ran out of data.
* Evaluation (:func:`make_eval_loader`): sample ``p`` of shard ``j`` belongs to rank
  ``(j + p) % world_size``; each sample is seen exactly once across ranks.

The stages: shards are read by :func:`mae_ray.data.shards.read_shard` (the format's owner: strict
headers, only image and ``cls`` members, nothing unpickled), shuffled and batched by webdataset's
``shuffle`` and ``batched``. Ours, and why: the shard order (webdataset's ``ResampledShards``
draws shards with replacement, so an epoch over 10 shards misses about a third of them and
repeats others; we walk permutations), and the decoding step, which skips a corrupt sample and
counts it (``data/skipped``) without webdataset's ``warn_and_continue`` sleep per error, and
refuses a label outside the classifier. See docs/data.md.
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.filters import batched, shuffle

from mae_ray.data.shards import IMAGE_EXTENSIONS, RawSample, expand_urls, read_shard, shard_counts
from mae_ray.data.transforms import Transform, build_transform, check_pixels, decode_rgb
from mae_ray.errors import DataError
from mae_ray.redaction import redact

log = logging.getLogger(__name__)

_MAX_SKIP_STREAK = 100  # consecutive undecodable training samples => the data is unusable
_LOGGED_SKIPS = 5  # per worker and epoch; the total is reported as data/skipped


# --------------------------------------------------------------------------- skipping, decoding, batching


class _Skips:
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


def _decode_raw(sample: RawSample, raw: bool = False) -> tuple[torch.Tensor, int]:
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


def _decoded(
    samples: Iterable[RawSample], transform: Transform | None, skips: _Skips, num_classes: int | None = None
) -> Iterator[tuple[torch.Tensor, int]]:
    """``transform`` None: the encoded bytes, for decoding on the device (``device_decode``)."""
    for sample in samples:
        try:
            image, label = _decode_raw(sample, raw=transform is None)
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


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor]:
    # default_collate stacks straight into shared memory inside a worker: no extra copy (webdataset's
    # default collation goes through numpy for the labels). Encoded images (1-D, of any length) stay a list.
    if batch and batch[0][0].dim() == 1:
        return [image for image, _ in batch], torch.tensor([label for _, label in batch])
    images, labels = default_collate(batch)
    return images, labels


def _batches(samples: Iterable[tuple[torch.Tensor, int]], batch_size: int, partial: bool):
    return batched(batch_size, collation_fn=_collate, partial=partial)(samples)


def _worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- datasets


@dataclass
class _TrainStream(IterableDataset):
    """Per-worker stream of exactly its share of ``steps`` batches for ``self.epoch``."""

    urls: list[str]
    transform: Transform | None  # None: encoded JPEG bytes (data.decode=gpu)
    batch_size: int
    rank: int
    steps: int
    seed: int
    shuffle_buffer: int
    epoch: int = 0
    num_classes: int | None = None  # labels outside 0..num_classes-1 raise DataError

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, int, int]]:
        worker, num_workers = _worker_identity()
        # Split steps over workers so that the per-rank total is exactly `steps`.
        n_batches = self.steps // num_workers + (worker < self.steps % num_workers)
        if n_batches == 0:
            return
        seed_text = f"mae-ray/train/{self.seed}/{self.epoch}/{self.rank}/{worker}"
        rng = random.Random(seed_text)
        if get_worker_info() is not None:
            _seed_augmentations(rng.getrandbits(32))
        skips = _Skips(_MAX_SKIP_STREAK)
        raw = _endless_samples(self.urls, rng)
        mixed = shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(raw)
        samples = _decoded(mixed, self.transform, skips, self.num_classes)
        for images, labels in itertools.islice(_batches(samples, self.batch_size, False), n_batches):
            yield images, labels, worker, skips.count


def _endless_samples(urls: list[str], rng: random.Random) -> Iterator[RawSample]:
    """The samples of endless random permutations of the shards: resampling without early repeats.

    A whole pass that finds no sample at all (every shard an empty archive) raises DataError
    instead of looping forever.
    """
    while True:
        order = list(urls)
        rng.shuffle(order)
        found = 0
        for url in order:
            for sample in read_shard(url):
                found += 1
                yield sample
        if not found:
            raise DataError(f"no samples in any of the {len(urls)} shard(s), e.g. {urls[0]}")


def _seed_augmentations(seed: int) -> None:
    # Inside a worker process only: torch (v2 transforms), random and numpy (timm RandAugment).
    # The DataLoader's own worker seeds repeat across ranks when ranks share a torch seed.
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class _EvalStream(IterableDataset):
    """Per-worker stream of this rank's samples from shards ``j % num_workers == worker``."""

    urls: list[str]
    transform: Transform
    batch_size: int
    rank: int
    world_size: int
    num_classes: int | None = None  # labels outside 0..num_classes-1 raise DataError

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, int, int]]:
        worker, num_workers = _worker_identity()
        skips = _Skips(max_streak=None)
        owned = (
            sample
            for shard, url in enumerate(self.urls)
            if shard % num_workers == worker
            for sample in read_shard(url)
            if (shard + sample.index) % self.world_size == self.rank  # filter before decoding
        )
        decoded = _decoded(owned, self.transform, skips, self.num_classes)
        for images, labels in _batches(decoded, self.batch_size, True):
            yield images, labels, worker, skips.count
        yield None, None, worker, skips.count  # reports skips that came after the last batch


def _owned_count(n: int, shard: int, rank: int, world_size: int) -> int:
    """How many of positions 0..n-1 satisfy (shard + p) % world_size == rank."""
    return n // world_size + ((rank - shard) % world_size < n % world_size)


# --------------------------------------------------------------------------- loaders


class _Loader:
    def __init__(self, dataset: IterableDataset, num_workers: int, pin_memory: bool) -> None:
        self._dataset = dataset
        # batch_size=None: batches are assembled inside the workers.
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False
        )
        self._skipped: dict[int, int] = {}

    @property
    def skipped(self) -> int:
        """Samples skipped as corrupt in the current (or last) epoch, summed over workers."""
        return sum(self._skipped.values())

    def _iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._skipped = {}
        for images, labels, worker, skipped in self._loader:
            self._skipped[worker] = skipped  # each worker sends its cumulative count
            if images is not None:
                yield images, labels


class TrainLoader(_Loader):
    """Yields exactly ``len(self)`` ``(images, labels)`` batches per epoch on every rank."""

    def __init__(self, dataset: _TrainStream, num_workers: int, pin_memory: bool) -> None:
        super().__init__(dataset, num_workers, pin_memory)
        self._train = dataset
        self._next_epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration draws (shard order, shuffling, augmentation)."""
        self._next_epoch = epoch

    def __len__(self) -> int:
        return self._train.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Without set_epoch, successive iterations use epochs 0, 1, 2, ...
        self._train.epoch = self._next_epoch
        self._next_epoch += 1
        return self._iterate()


class EvalLoader(_Loader):
    """Yields this rank's share of every sample exactly once; batch counts differ between ranks."""

    def __init__(self, dataset: _EvalStream, num_workers: int, pin_memory: bool, num_samples: int | None):
        super().__init__(dataset, num_workers, pin_memory)
        self.num_samples = num_samples  # expected on this rank (None for remote shards w/o manifest)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self._iterate()


def _resolve_transform(transform: str | Transform, img_size: int) -> Transform:
    return build_transform(transform, img_size) if isinstance(transform, str) else transform


def _check_args(batch_size: int, rank: int, world_size: int, num_workers: int) -> None:
    if batch_size < 1 or num_workers < 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad loader args: {batch_size=} {rank=} {world_size=} {num_workers=}")


def epoch_batches(urls: str | list[str], samples_per_epoch: int | None, world_size: int, batch_size: int) -> int:
    """Micro-batches per rank and epoch: ``samples_per_epoch // (world_size * batch_size)``.

    ``samples_per_epoch`` defaults to the dataset size (manifest, else a scan of local shards).
    """
    return _epoch_batches(expand_urls(urls) if samples_per_epoch is None else [], samples_per_epoch, world_size,
                          batch_size, urls)


def _epoch_batches(shards: list[str], samples_per_epoch: int | None, world_size: int, batch_size: int,
                   urls: str | list[str]) -> int:
    if samples_per_epoch is None:
        counts = shard_counts(shards)
        if counts is None:
            raise DataError(f"cannot count the samples of remote shards {urls!r}: pass samples_per_epoch")
        samples_per_epoch = sum(counts)
    steps = samples_per_epoch // (world_size * batch_size)
    if steps == 0:
        raise DataError(f"{samples_per_epoch} samples/epoch < world_size {world_size} x batch_size {batch_size}")
    return steps


def make_train_loader(
    urls: str | list[str],
    *,
    batch_size: int,
    transform: str | Transform = "pretrain",
    img_size: int = 224,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    samples_per_epoch: int | None = None,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
    num_classes: int | None = None,
    raw: bool = False,
    batches: int | None = None,
) -> TrainLoader:
    """Training loader: ``batches`` per epoch on this rank, by default :func:`epoch_batches` (an elastic
    group's rank takes its share of the configured group's epoch instead: ``engine.StepPlan.rank_batches``).

    ``transform`` is a kind for :func:`build_transform` or a callable on CHW uint8 RGB tensors.
    ``num_classes``: a label outside ``0..num_classes-1`` raises DataError (classification jobs).
    ``raw``: no decoding or transform here; batches are (list of encoded JPEGs as 1-D uint8 tensors, labels),
    for :func:`mae_ray.data.device_decode.pretrain_batch` (``data.decode: gpu``).
    """
    _check_args(batch_size, rank, world_size, num_workers)
    shards = expand_urls(urls)
    steps = batches if batches is not None else _epoch_batches(shards, samples_per_epoch, world_size, batch_size, urls)
    dataset = _TrainStream(
        shards, None if raw else _resolve_transform(transform, img_size), batch_size, rank, steps, seed, shuffle_buffer,
        num_classes=num_classes,
    )
    return TrainLoader(dataset, num_workers, pin_memory)


def make_eval_loader(
    urls: str | list[str],
    *,
    batch_size: int,
    transform: str | Transform = "eval",
    img_size: int = 224,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    pin_memory: bool = False,
    num_classes: int | None = None,
) -> EvalLoader:
    """Evaluation loader: over all ranks, every readable sample is yielded exactly once.

    Batches per rank may differ by one or more: eval loops must not run per-batch collectives;
    reduce sums/counts once after the loop. ``num_classes`` as in :func:`make_train_loader`.
    """
    _check_args(batch_size, rank, world_size, num_workers)
    shards = expand_urls(urls)
    counts = shard_counts(shards)
    num_samples = None
    if counts is not None:
        num_samples = sum(_owned_count(n, shard, rank, world_size) for shard, n in enumerate(counts))
    dataset = _EvalStream(shards, _resolve_transform(transform, img_size), batch_size, rank, world_size, num_classes)
    return EvalLoader(dataset, num_workers, pin_memory, num_samples)
