"""WebDataset shard loaders for DDP jobs running inside Ray Train workers.

* Training (:func:`make_train_loader`): every (rank, DataLoader worker) walks its own random
  permutations of *all* shards, seeded from ``(seed, epoch, rank, worker)``, and stops after a
  fixed number of batches. Every rank therefore yields exactly ``len(loader)`` batches whatever
  the shard sizes, so DDP never waits on a rank that ran out of data.
* Evaluation (:func:`make_eval_loader`): sample ``p`` of shard ``j`` belongs to rank
  ``(j + p) % world_size``; each sample is seen exactly once across ranks.

Shards hold webdataset samples: ``<key>.<image ext>`` (original bytes), ``<key>.cls`` (ascii
int) and ``<key>.json``. Only image and ``cls`` members are read; everything else is skipped
unread, so nothing from a shard is ever unpickled. See docs/data.md.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import os
import random
import shlex
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from mae_ray.data.transforms import IMAGE_EXTENSIONS, Transform, build_transform, decode_rgb
from mae_ray.errors import DataError

log = logging.getLogger(__name__)

MANIFEST_NAME = "dataset.json"
_WANTED_EXTENSIONS = IMAGE_EXTENSIONS | {"cls"}
_REMOTE_PREFIXES = ("pipe:", "http://", "https://")
_MAX_SKIP_STREAK = 100  # consecutive undecodable training samples => the data is unusable
_LOGGED_SKIPS = 5  # per worker and epoch; the total is reported as data/skipped


# --------------------------------------------------------------------------- URLs and sizes


def expand_urls(spec: str | list[str]) -> list[str]:
    """Expand a shard spec into URLs that the reader can open.

    Accepts local paths, brace patterns (``train-{000000..000009}.tar``), globs, directories
    (all ``*.tar`` inside, sorted), ``s3://`` / ``gs://`` (rewritten to ``pipe:`` commands),
    ``http(s)://`` and ``pipe:`` URLs, or a list of any of these. Local patterns that match
    nothing raise :class:`DataError`.
    """
    patterns = [spec] if isinstance(spec, str) else list(spec)
    urls = [url for pattern in patterns for url in _expand_one(pattern)]
    if not urls:
        raise DataError(f"no shards in {spec!r}")
    return urls


def _expand_one(pattern: str) -> list[str]:
    if pattern.startswith(("s3://", "gs://")):
        return [_cloud_pipe(url) for url in braceexpand.braceexpand(pattern)]
    if pattern.startswith(_REMOTE_PREFIXES):
        return list(braceexpand.braceexpand(pattern))
    path = os.path.expanduser(pattern.removeprefix("file://"))
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not found:
            raise DataError(f"directory {pattern!r} contains no *.tar shards")
        return found
    urls: list[str] = []
    missing: list[str] = []
    for item in braceexpand.braceexpand(path):
        if glob.has_magic(item):
            matches = sorted(glob.glob(item))
        else:
            matches = [item] if os.path.isfile(item) else []
        urls.extend(matches)
        if not matches:
            missing.append(item)
    if missing:
        raise DataError(f"shard pattern {pattern!r}: {len(missing)} path(s) not found, e.g. {missing[0]!r}")
    return urls


def _cloud_pipe(url: str) -> str:
    # webdataset 1.0.2 has no s3: handler; stream through the provider CLI instead.
    if url.startswith("s3://"):
        return f"pipe:aws s3 cp {shlex.quote(url)} -"
    return f"pipe:gcloud storage cat {shlex.quote(url)}"


def _is_local(url: str) -> bool:
    return not url.startswith(_REMOTE_PREFIXES)


def dataset_size(spec: str | list[str]) -> int | None:
    """Number of samples in the shards of ``spec`` according to the ``dataset.json`` beside them.

    None when a shard is remote or not listed in a manifest.
    """
    counts = _manifest_counts(expand_urls(spec))
    return None if counts is None else sum(counts)


def _manifest_counts(urls: list[str]) -> list[int] | None:
    manifests: dict[str, dict[str, int]] = {}
    counts = []
    for url in urls:
        if not _is_local(url):
            return None
        directory = os.path.dirname(os.path.abspath(url))
        if directory not in manifests:
            manifests[directory] = _read_manifest(directory)
        count = manifests[directory].get(os.path.basename(url))
        if count is None:
            return None
        counts.append(int(count))
    return counts


def manifest_crop_ratio(spec: str | list[str]) -> float | None:
    """The ``crop_ratio`` of the dataset.json beside the first shard of ``spec``: None when the shard is
    remote, or the manifest is missing or has no valid ratio (in (0, 1])."""
    try:
        urls = expand_urls(spec)
    except DataError:
        return None
    if not _is_local(urls[0]):
        return None
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(urls[0])), MANIFEST_NAME)) as f:
            ratio = json.load(f).get("crop_ratio")
    except (OSError, ValueError, AttributeError):
        return None
    ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= 1
    return float(ratio) if ok else None


def _read_manifest(directory: str) -> dict[str, int]:
    try:
        with open(os.path.join(directory, MANIFEST_NAME)) as f:
            return json.load(f).get("shards", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _shard_counts(urls: list[str]) -> list[int] | None:
    """Samples per shard from the manifest, else by scanning local tar headers; None if remote."""
    counts = _manifest_counts(urls)
    if counts is None and all(_is_local(url) for url in urls):
        counts = [_count_local_shard(url) for url in urls]
    return counts


def _count_local_shard(path: str) -> int:
    count, last_key = 0, None
    with contextlib.suppress(tarfile.TarError, EOFError), tarfile.open(path) as tar:
        for member in tar:  # random-access mode: reads headers, seeks over the payloads
            key, _ = base_plus_ext(member.name)
            if member.isreg() and key is not None and key != last_key:
                count, last_key = count + 1, key
    return count


def check_local_shards(urls: list[str]) -> None:
    """Refuse local shards that cannot hold a sample: 0 bytes, not a tar, or an empty archive.

    Reads the first tar header of each shard, nothing more, so it costs about one small read per
    shard; damage further in (a truncated shard) is left to the loaders, which skip and count it.
    Remote shards are not checked.
    """
    for url in urls:
        if not _is_local(url):
            continue
        if os.path.getsize(url) == 0:
            raise DataError(f"shard {url} is empty (0 bytes)")
        try:
            with tarfile.open(url) as tar:
                first = tar.next()
        except OSError as exn:
            raise DataError(f"cannot read shard {url}: {exn.strerror or exn}") from None
        except (tarfile.TarError, EOFError):  # tarfile's message lists every compression it tried
            raise DataError(f"shard {url} is not a tar file (nor a compressed one)") from None
        if first is None:
            raise DataError(f"shard {url} holds no samples (an empty tar archive)")


# --------------------------------------------------------------------------- reading samples


@dataclass
class _RawSample:
    key: str
    index: int  # position within its shard, in tar order
    files: dict[str, bytes] = field(default_factory=dict)
    broken: bool = False
    url: str = ""  # the shard it came from, for messages


class _StrictTarInfo(tarfile.TarInfo):
    """Header reading that tells a shard's end from its truncation.

    tarfile ends an archive silently at a header that is cut short, missing or garbled (anywhere
    but at offset 0), exactly as at the zero block that really ends it: a shard cut at or inside a
    header, as an interrupted copy often is, would lose the rest of its samples unnoticed.
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as exn:
            if tarfile_.offset == 0:
                raise  # tarfile's own "empty file" / bad-header errors
            raise tarfile.ReadError(f"truncated or damaged tar header at byte {tarfile_.offset}: {exn}") from None


def _open(url: str) -> IO[bytes]:
    # Local files bypass gopen so that WDS_SECURE=1 (which blocks local gopen) does not matter.
    return open(url, "rb") if _is_local(url) else gopen(url, "rb")


def _read_shard(url: str) -> Iterator[_RawSample]:
    """Yield the samples of one shard in tar order with only their image and ``cls`` payloads.

    A read error (truncated member, header or tar, failed download) ends the shard; the sample being
    read is yielded as ``broken`` so that the rank owning it counts it as skipped. Samples after
    the error point cannot be known and are not counted.
    """
    current: _RawSample | None = None
    index = 0
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isreg() or key is None:
                    continue
                if current is not None and key != current.key:
                    yield current
                    current, index = None, index + 1
                if current is None:
                    current = _RawSample(key, index, url=url)
                if ext.lower() in _WANTED_EXTENSIONS:
                    current.files[ext.lower()] = tar.extractfile(member).read()
                tar.members = []  # stream mode keeps every header otherwise
    except Exception as exn:  # noqa: BLE001 - any read failure skips the rest of this shard
        log.warning("error reading shard %s: %r", url, exn)
        yield _RawSample(current.key if current else url, index, broken=True, url=url)
        return
    if current is not None:
        yield current


class _Skips:
    """Per-worker count of skipped samples for the current epoch."""

    def __init__(self, max_streak: int | None) -> None:
        self.count = 0
        self._streak = 0
        self._max_streak = max_streak

    def record(self, sample: _RawSample, exn: Exception) -> None:
        self.count += 1
        self._streak += 1
        if self.count <= _LOGGED_SKIPS:
            log.warning("skipping sample %s: %r", sample.key, exn)
        if self._max_streak is not None and self._streak >= self._max_streak:
            raise DataError(f"{self._streak} consecutive unreadable samples, last {sample.key}: {exn!r}")

    def ok(self) -> None:
        self._streak = 0


def _decode_raw(sample: _RawSample) -> tuple[torch.Tensor, int]:
    if sample.broken:
        raise DataError("truncated or unreadable tar data")
    image_ext = next((ext for ext in sample.files if ext in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        raise DataError(f"no image member among {sorted(sample.files)}")
    if "cls" not in sample.files:
        raise DataError("no cls member")
    return decode_rgb(sample.files[image_ext]), int(sample.files["cls"])


def _decoded(
    samples: Iterable[_RawSample], transform: Transform, skips: _Skips, num_classes: int | None = None
) -> Iterator[tuple[torch.Tensor, int]]:
    for sample in samples:
        try:
            image, label = _decode_raw(sample)
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
        yield transform(image), label  # transform errors are bugs: let them propagate


def _shuffled(items: Iterable[_RawSample], bufsize: int, rng: random.Random) -> Iterator[_RawSample]:
    buffer: list[_RawSample] = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        k = rng.randrange(bufsize)
        yield buffer[k]
        buffer[k] = item
    rng.shuffle(buffer)
    yield from buffer


def _batched(
    samples: Iterable[tuple[torch.Tensor, int]], batch_size: int, partial: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    batch: list[tuple[torch.Tensor, int]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield _collate(batch)
            batch = []
    if batch and partial:
        yield _collate(batch)


def _collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    # default_collate stacks straight into shared memory inside a worker: no extra copy.
    images, labels = default_collate(batch)
    return images, labels


def _worker_identity() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


# --------------------------------------------------------------------------- datasets


@dataclass
class _TrainStream(IterableDataset):
    """Per-worker stream of exactly its share of ``steps`` batches for ``self.epoch``."""

    urls: list[str]
    transform: Transform
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
        samples = _decoded(_shuffled(raw, self.shuffle_buffer, rng), self.transform, skips, self.num_classes)
        for images, labels in itertools.islice(_batched(samples, self.batch_size, False), n_batches):
            yield images, labels, worker, skips.count


def _endless_samples(urls: list[str], rng: random.Random) -> Iterator[_RawSample]:
    """The samples of endless random permutations of the shards: resampling without early repeats.

    A whole pass that finds no sample at all (every shard an empty archive) raises DataError
    instead of looping forever.
    """
    while True:
        order = list(urls)
        rng.shuffle(order)
        found = 0
        for url in order:
            for sample in _read_shard(url):
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
            for sample in _read_shard(url)
            if (shard + sample.index) % self.world_size == self.rank  # filter before decoding
        )
        decoded = _decoded(owned, self.transform, skips, self.num_classes)
        for images, labels in _batched(decoded, self.batch_size, True):
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
) -> TrainLoader:
    """Training loader: ``samples_per_epoch // (world_size * batch_size)`` batches per rank.

    ``samples_per_epoch`` defaults to the dataset size (manifest, else a scan of local shards).
    ``transform`` is a kind for :func:`build_transform` or a callable on CHW uint8 RGB tensors.
    ``num_classes``: a label outside ``0..num_classes-1`` raises DataError (classification jobs).
    """
    _check_args(batch_size, rank, world_size, num_workers)
    shards = expand_urls(urls)
    if samples_per_epoch is None:
        counts = _shard_counts(shards)
        if counts is None:
            raise DataError(f"cannot count the samples of remote shards {urls!r}: pass samples_per_epoch")
        samples_per_epoch = sum(counts)
    steps = samples_per_epoch // (world_size * batch_size)
    if steps == 0:
        raise DataError(f"{samples_per_epoch} samples/epoch < world_size {world_size} x batch_size {batch_size}")
    dataset = _TrainStream(
        shards, _resolve_transform(transform, img_size), batch_size, rank, steps, seed, shuffle_buffer,
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
    counts = _shard_counts(shards)
    num_samples = None
    if counts is not None:
        num_samples = sum(_owned_count(n, shard, rank, world_size) for shard, n in enumerate(counts))
    dataset = _EvalStream(shards, _resolve_transform(transform, img_size), batch_size, rank, world_size, num_classes)
    return EvalLoader(dataset, num_workers, pin_memory, num_samples)
