"""WebDataset shard loaders for DDP jobs running inside Ray Train workers.

* Training (:func:`make_train_loader`): every (rank, DataLoader worker) walks its own random
  permutations of *all* shards, seeded from ``(seed, epoch, rank, worker)``, and stops after a
  fixed number of batches. Every rank therefore yields exactly ``len(loader)`` batches whatever
  the shard sizes, so DDP never waits on a rank that ran out of data.
* Evaluation (:func:`make_eval_loader`): sample ``p`` of shard ``j`` belongs to rank
  ``(j + p) % world_size``; each sample is seen exactly once across ranks.

The stages: shards are read by :func:`mae_ray.data.shards.read_shard` (the format's owner: strict
headers, only image and ``cls`` members, nothing unpickled), shuffled by webdataset's ``shuffle``,
decoded by ``data/decode.py`` and batched (evaluation: webdataset's ``batched``). Ours, and why: the
shard order (webdataset's ``ResampledShards`` draws shards with replacement, so an epoch over 10 shards
misses about a third of them and repeats others; we walk permutations); the decoding step, which skips
a corrupt sample and counts it (``data/skipped``) without webdataset's ``warn_and_continue`` sleep per
error, and refuses a label outside the classifier; training's batching, which says how far each worker's
stream has got, so that an epoch restarts at any batch (a checkpoint taken inside it). See docs/data.md.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import batched, shuffle

from mae_ray.data.decode import MAX_SKIP_STREAK, Skips, collate, decoded
from mae_ray.data.shards import RawSample, expand_urls, read_shard, shard_counts
from mae_ray.data.transforms import Transform, build_transform
from mae_ray.errors import DataError

# --------------------------------------------------------------------------- batching


def _batches(samples: Iterable[tuple[torch.Tensor, int]], batch_size: int, partial: bool):
    return batched(batch_size, collation_fn=collate, partial=partial)(samples)


def _worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- datasets


@dataclass
class _TrainStream(IterableDataset):
    """Per-worker stream of exactly its share of ``steps`` batches for ``self.epoch``.

    The rank's epoch is one fixed sequence of batches: batch i comes from *logical* worker ``i % W`` (W loader
    workers), whose samples are its own shuffled stream seeded from ``(seed, epoch, rank, logical worker)``,
    with each sample's augmentations seeded from its place in that stream. So the epoch can start at any
    batch ``start`` (a checkpoint taken inside it): a logical worker skips the samples it had consumed
    (``positions``, read back without decoding) and draws the same augmentations for the rest; physical
    worker p plays logical worker ``(p + start) % W``, because the DataLoader's round robin restarts at 0.
    """

    urls: list[str]
    transform: Transform | None  # None: encoded JPEG bytes (data.decode=gpu)
    batch_size: int
    rank: int
    steps: int
    seed: int
    shuffle_buffer: int
    epoch: int = 0
    num_classes: int | None = None  # labels outside 0..num_classes-1 raise DataError
    start: int = 0  # batches of this epoch already taken on this rank
    positions: tuple[int, ...] | None = None  # samples each logical worker had consumed then; None: whole batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, int, int, int]]:
        worker, num_workers = _worker_identity()
        logical = (worker + self.start) % num_workers
        # this worker's share of the rank's `steps` batches, less those it had yielded before `start`
        n_batches = self.steps // num_workers + (logical < self.steps % num_workers)
        n_batches -= _taken(self.start, logical, num_workers)
        if n_batches <= 0:
            return
        rng = random.Random(f"mae-ray/train/{self.seed}/{self.epoch}/{self.rank}/{logical}")
        augment_seed = rng.getrandbits(64)
        consumed = [start_positions(self.start, num_workers, self.batch_size, self.positions)[logical]]
        skips = Skips(MAX_SKIP_STREAK)
        mixed = shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(_endless_samples(self.urls, rng))
        rest = _counted(itertools.islice(mixed, consumed[0], None), consumed,
                        augment_seed if self.transform is not None else None)
        batch: list[tuple[torch.Tensor, int]] = []
        for item in decoded(rest, self.transform, skips, self.num_classes):
            batch.append(item)
            if len(batch) == self.batch_size:  # not webdataset's batched: it reads one sample past the batch
                images, labels = collate(batch)
                yield images, labels, logical, skips.count, consumed[0]
                batch, n_batches = [], n_batches - 1
                if not n_batches:
                    return


def _taken(start: int, logical: int, num_workers: int) -> int:
    """How many of batches 0..start-1 came from logical worker ``logical`` (batch i is worker i % W's)."""
    return max(0, (start - logical + num_workers - 1) // num_workers)


def start_positions(start: int, num_workers: int, batch_size: int,
                    positions: tuple[int, ...] | list[int] | None) -> list[int]:
    """Samples each logical worker had consumed before batch ``start``: ``positions`` when recorded (they count
    the samples skipped as unreadable too), else its whole batches' samples (a group of another size resumed:
    its ranks' streams are new to them)."""
    workers = max(1, num_workers)
    if positions is not None and len(positions) == workers:
        return [int(p) for p in positions]
    return [_taken(start, w, workers) * batch_size for w in range(workers)]


def _counted(samples: Iterable[RawSample], consumed: list[int], augment_seed: int | None) -> Iterator[RawSample]:
    """``samples``, counting them in ``consumed[0]``; with ``augment_seed``, every RNG seeded for each sample from
    (that seed, its place in the stream) before it is decoded and augmented."""
    for sample in samples:
        if augment_seed is not None:
            _seed_augmentations(_mix(augment_seed, consumed[0]))
        consumed[0] += 1
        yield sample


def _mix(a: int, b: int) -> int:
    """splitmix64 of (a, b): well-spread 64-bit seeds from a stream's seed and a position in it."""
    z = (a + (b + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


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
    # torch (v2 transforms), random and numpy (timm RandAugment). Per sample: the DataLoader's own worker seeds
    # repeat across ranks when ranks share a torch seed, and a stream resumed mid-way must draw as it did.
    # The CPU generator only (augmentations run on the CPU): torch.manual_seed costs ~0.2 ms where CUDA is not
    # initialised (engine.seed_everything), 3 us this way.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@dataclass
class _EvalStream(IterableDataset):
    """Per-worker stream of this rank's samples from shards ``j % num_workers == worker``."""

    urls: list[str]
    transform: Transform
    batch_size: int
    rank: int
    world_size: int
    num_classes: int | None = None  # labels outside 0..num_classes-1 raise DataError

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, int, int, int]]:
        worker, num_workers = _worker_identity()
        skips = Skips(max_streak=None)
        owned = (
            sample
            for shard, url in enumerate(self.urls)
            if shard % num_workers == worker
            for sample in read_shard(url)
            if (shard + sample.index) % self.world_size == self.rank  # filter before decoding
        )
        readable = decoded(owned, self.transform, skips, self.num_classes)
        for images, labels in _batches(readable, self.batch_size, True):
            yield images, labels, worker, skips.count, 0
        yield None, None, worker, skips.count, 0  # reports skips that came after the last batch


def _owned_count(n: int, shard: int, rank: int, world_size: int) -> int:
    """How many of positions 0..n-1 satisfy (shard + p) % world_size == rank."""
    return n // world_size + ((rank - shard) % world_size < n % world_size)


# --------------------------------------------------------------------------- loaders


class _Loader:
    def __init__(self, dataset: IterableDataset, num_workers: int, pin_memory: bool) -> None:
        self._dataset = dataset
        # batch_size=None: batches are assembled inside the workers.
        # generator: each new iteration draws its workers' base seed from it, not from torch's global RNG, whose
        # draws are the model's (masks, drop path: seeded per micro-batch); the workers seed themselves anyway
        self._loader = DataLoader(
            dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, persistent_workers=False,
            generator=torch.Generator(),
        )
        self._skipped: dict[int, int] = {}
        self._consumed: dict[int, int] = {}

    @property
    def skipped(self) -> int:
        """Samples skipped as corrupt in the current (or last) epoch, summed over workers."""
        return sum(self._skipped.values())

    def _iterate(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._skipped = {}
        for images, labels, worker, skipped, consumed in self._loader:
            self._skipped[worker] = skipped  # each worker sends its cumulative count
            self._consumed[worker] = consumed  # and the samples it has consumed, up to this batch's last
            if images is not None:
                yield images, labels


class TrainLoader(_Loader):
    """Yields exactly ``len(self)`` ``(images, labels)`` batches per epoch on every rank."""

    def __init__(self, dataset: _TrainStream, num_workers: int, pin_memory: bool) -> None:
        super().__init__(dataset, num_workers, pin_memory)
        self._train = dataset
        self._next_epoch = 0
        self._next_start: tuple[int, tuple[int, ...] | None] = (0, None)

    def set_epoch(self, epoch: int, start: int = 0, positions: list[int] | None = None) -> None:
        """Select the epoch the next iteration draws (shard order, shuffling, augmentation), from its batch
        ``start`` on (a checkpoint taken inside the epoch; ``positions``: what :attr:`positions` said then)."""
        self._next_epoch = epoch
        self._next_start = (start, tuple(positions) if positions is not None else None)

    @property
    def positions(self) -> list[int]:
        """Samples each logical loader worker has consumed this epoch, up to the last batch yielded: where
        :meth:`set_epoch` restarts the epoch after that batch."""
        start = start_positions(self._train.start, self._loader.num_workers, self._train.batch_size,
                                self._train.positions)
        return [self._consumed.get(w, p) for w, p in enumerate(start)]

    def __len__(self) -> int:
        return self._train.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Without set_epoch, successive iterations use epochs 0, 1, 2, ... from their first batch
        self._train.epoch = self._next_epoch
        self._train.start, self._train.positions = self._next_start
        self._next_epoch, self._next_start = self._next_epoch + 1, (0, None)  # a start holds for one iteration
        self._consumed = {}
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
