"""The shard format, one owner: what a shard holds, how its samples are read, and the dataset.json beside it.

A shard is a tar of webdataset samples: consecutive members sharing a key (webdataset's own rule,
``base_plus_ext``: the path up to the first dot of the file name) form one sample, e.g.
``000042.jpg`` (the original image bytes), ``000042.cls`` (an ascii integer) and ``000042.json``.
Beside the shards, ``dataset.json`` (written last by ``data_tools/make_shards``) lists the samples
per shard, ``num_classes`` and optionally the evaluation ``crop_ratio``.

Readers: the loader (:mod:`mae_ray.data.loader`, only image and ``cls`` members), the jobs' checks
before Ray starts, and ``data_tools/verify_shards`` (every member). No member is ever unpickled.

Why our own tar reader, not webdataset's ``tarfile_to_samples``: tarfile ends an archive silently
at a header that is cut short or garbled, so a shard truncated at or inside a header (an
interrupted copy) would lose its remaining samples unnoticed; ours says so (``_StrictTarInfo``),
and marks where the shard broke so that the rank owning that sample counts it as skipped, which
exact-once evaluation needs. Imports webdataset (and with it torch) only when a shard is read: the
data tools import this module in every writer process.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shlex
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import braceexpand

from mae_ray import storage
from mae_ray.data.sources import REMOTE_PREFIXES, is_local, limit, open_shard
from mae_ray.errors import DataError

MANIFEST_NAME = "dataset.json"
# Image members a reader accepts (lower case); make_shards writes jpg, png, ... (its EXT_ALIASES).
IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm"})
TRAINING_MEMBERS = IMAGE_EXTENSIONS | {"cls"}  # what the loader reads; everything else stays unread


# --------------------------------------------------------------------------- URLs


def expand_urls(pattern: str | list[str]) -> list[str]:
    """Expand a shard spec into URLs that the reader can open.

    Accepts local paths, brace patterns (``train-{000000..000009}.tar``), globs, directories
    (all ``*.tar`` inside, sorted), ``s3://`` objects, brace patterns and prefixes (read in-process,
    :mod:`mae_ray.storage`), ``gs://`` (rewritten to a ``pipe:`` command), ``http(s)://`` and ``pipe:``
    URLs, or a list of any of these. Local and ``s3://`` patterns that match nothing raise
    :class:`DataError`.
    """
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    urls = [url for pattern in patterns for url in _expand_one(pattern)]
    if not urls:
        raise DataError(f"no shards in {pattern!r}")
    return urls


def _expand_one(pattern: str) -> list[str]:
    if storage.is_object_uri(pattern):
        return _expand_bucket(pattern)
    if pattern.startswith("gs://"):
        return [_cloud_pipe(url) for url in braceexpand.braceexpand(pattern)]
    if pattern.startswith(REMOTE_PREFIXES):
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


def _expand_bucket(pattern: str) -> list[str]:
    """``s3://`` shards: a prefix (ending in ``/``, or naming no ``.tar``) means every ``*.tar`` directly under
    it; objects are checked with one listing per prefix, not a request per shard."""
    urls: list[str] = []
    listed: dict[str, set[str]] = {}
    missing: list[str] = []
    for item in braceexpand.braceexpand(pattern):
        if item.endswith("/") or not item.endswith(".tar"):
            found = storage.list_files(item.rstrip("/") + "/", ".tar")
            if not found and not storage.bucket_exists(item):
                raise DataError(f"the bucket of {item!r} does not exist")
            if not found:
                raise DataError(f"no *.tar shards under {item!r}")
            urls.extend(found)
            continue
        parent = _parent(item)
        if parent not in listed:
            listed[parent] = set(storage.list_files(parent + "/"))
            if not listed[parent] and not storage.bucket_exists(item):
                raise DataError(f"the bucket of {item!r} does not exist")
        (urls if item in listed[parent] else missing).append(item)
    if missing:
        raise DataError(f"shard pattern {pattern!r}: {len(missing)} object(s) not found, e.g. {missing[0]!r}")
    return urls


def _cloud_pipe(url: str) -> str:
    # webdataset 1.0.2 has no gs: handler; stream through the provider's CLI instead.
    return f"pipe:gcloud storage cat {shlex.quote(url)}"


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if storage.is_object_uri(url) else os.path.dirname(os.path.abspath(url))


def _listed(url: str) -> bool:
    """Whether a dataset.json can sit beside this shard: a local file or an object in a bucket."""
    return is_local(url) or storage.is_object_uri(url)


# --------------------------------------------------------------------------- dataset.json


MAX_SHARD_SAMPLES = 10_000_000  # beyond any real tar shard (ImageNet-1k at 1,000 shards: ~1,300 each)
MAX_CLASSES = 1_000_000  # ImageNet-22k has 21,841


def read_manifest(directory: str) -> dict:
    """The dataset.json of ``directory`` (a folder or an ``s3://`` prefix) as a dict; {} when there is none.

    It steers the run (samples per epoch, classifier size), and a bucket is shared: counts or a class
    number that no dataset has (negative, not whole, absurdly large) are one clear DataError, not an
    endless epoch or a classifier of a billion outputs."""
    remote = storage.is_object_uri(directory)
    path = f"{directory}/{MANIFEST_NAME}" if remote else os.path.join(directory, MANIFEST_NAME)
    try:
        if remote:
            text = storage.read_bytes(path)
        else:
            with open(path, "rb") as f:
                text = f.read()
    except OSError:
        return {}
    try:
        manifest = json.loads(text)
    except ValueError:
        raise DataError(f"{path} is not JSON: fix or remove it (data_tools/make_shards writes it)") from None
    if not isinstance(manifest, dict):
        return {}
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: str, manifest: dict) -> None:
    def whole(value, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    shards = manifest.get("shards", {})
    bad = [(name, n) for name, n in (shards.items() if isinstance(shards, dict) else [("shards", shards)])
           if not whole(n, 0, MAX_SHARD_SAMPLES)]
    if bad:
        name, n = bad[0]
        raise DataError(f"{path} lists {n!r} samples for {name} ({len(bad)} such): not a count of a real shard "
                        f"(0..{MAX_SHARD_SAMPLES:,}); the file is damaged or not a dataset.json")
    classes = manifest.get("num_classes")
    if classes is not None and not whole(classes, 1, MAX_CLASSES):
        raise DataError(f"{path} says num_classes {classes!r}: not a class count (1..{MAX_CLASSES:,}); the file "
                        "is damaged or not a dataset.json")


def _manifest_beside(url: str) -> dict:
    return read_manifest(_parent(url)) if _listed(url) else {}


def manifest_counts(urls: list[str]) -> list[int] | None:
    """Samples per shard as dataset.json lists them (beside local shards or in their bucket); None when a
    shard is elsewhere or not listed."""
    listed: dict[str, dict] = {}
    counts = []
    for url in urls:
        if not _listed(url):
            return None
        directory = _parent(url)
        if directory not in listed:
            shards = read_manifest(directory).get("shards", {})
            listed[directory] = shards if isinstance(shards, dict) else {}
        count = listed[directory].get(url.rsplit("/", 1)[-1])
        if count is None:
            return None
        counts.append(int(count))
    return counts


def dataset_size(pattern: str | list[str]) -> int | None:
    """Number of samples in the shards of ``pattern`` according to the ``dataset.json`` beside them.

    None when a shard is remote or not listed in a manifest.
    """
    counts = manifest_counts(expand_urls(pattern))
    return None if counts is None else sum(counts)


def lineage(pattern: str | list[str]) -> dict:
    """What identifies the shard set of ``pattern`` without reading its shards: a digest of the ``dataset.json``
    and ``index.parquet`` beside them (of the shard names alone when there are none), the shard and sample
    counts, and a name (the shard folder's last two parts)."""

    urls = expand_urls(pattern)
    digest = hashlib.sha256()
    folders = sorted({_parent(u) for u in urls if _listed(u)})
    described = False
    for folder in folders:
        for name in (MANIFEST_NAME, "index.parquet"):
            data = _read_beside(folder, name)
            if data is None:
                continue
            digest.update(f"{name}\0".encode() + data)
            described = described or name == MANIFEST_NAME
    if not described:  # nothing describes these shards: at least which ones they are
        digest.update("\n".join(u.rsplit("/", 1)[-1] for u in urls).encode())
    first = _parent(urls[0]) if _listed(urls[0]) else urls[0].rsplit("/", 1)[0]
    if "://" in first:  # the name from the path alone: a URL's host part may carry credentials (user:pass@)
        first = urlsplit(first).path
    return {"digest": digest.hexdigest()[:12], "name": "/".join(first.strip("/").split("/")[-2:]),
            "num_shards": len(urls), "num_samples": dataset_size(urls), "described": described}


def _read_beside(folder: str, name: str) -> bytes | None:
    try:
        if storage.is_object_uri(folder):
            return storage.read_bytes(f"{folder}/{name}")
        with open(os.path.join(folder, name), "rb") as f:
            return f.read()
    except OSError:
        return None


def manifest_crop_ratio(pattern: str | list[str]) -> float | None:
    """The ``crop_ratio`` of the dataset.json beside the first shard of ``pattern`` (or in its bucket): None
    when there is none, or it has no valid ratio (in (0, 1])."""
    try:
        urls = expand_urls(pattern)
    except DataError:
        return None
    ratio = _manifest_beside(urls[0]).get("crop_ratio")
    ok = isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio <= 1
    return float(ratio) if ok else None


def manifest_classes(first_shard: str) -> tuple[str, int | None]:
    """(the dataset.json beside ``first_shard``, its ``num_classes`` or None)."""
    count = _manifest_beside(first_shard).get("num_classes")
    path = f"{_parent(first_shard)}/{MANIFEST_NAME}"
    return path, count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None


def shard_counts(urls: list[str]) -> list[int] | None:
    """Samples per shard from the manifest, else by scanning local tar headers; None if remote."""
    counts = manifest_counts(urls)
    if counts is None and all(is_local(url) for url in urls):
        counts = [_count_local_shard(url) for url in urls]
    return counts


def _count_local_shard(path: str) -> int:
    from webdataset.tariterators import base_plus_ext

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
        if not is_local(url):
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
class RawSample:
    key: str
    index: int  # position within its shard, in tar order
    files: dict[str, bytes] = field(default_factory=dict)  # lower-case extension -> bytes
    url: str = ""  # the shard it came from, for messages
    error: str | None = None  # the shard broke while this sample was read: its data cannot be trusted
    rejected: str | None = None  # a member over data.max_member_bytes, left unread: skipped like a corrupt one

    @property
    def broken(self) -> bool:
        return self.error is not None


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


def read_shard(url: str, members: frozenset[str] | None = TRAINING_MEMBERS) -> Iterator[RawSample]:
    """Yield the samples of one shard in tar order, with the payloads of ``members`` (extensions; None:
    every member). Other members are skipped unread.

    A read error (truncated member, header or tar, failed download) ends the shard: the sample being
    read is yielded with ``error`` set, so that the rank owning it counts it as skipped. Samples after
    the error point cannot be known and are not counted.
    """
    from webdataset.tariterators import base_plus_ext

    current: RawSample | None = None
    index = 0
    max_bytes = limit("max_member_bytes")
    # a remote shard that cannot be reached at all ends the job (DataError), after its tries; a local one
    # that cannot be opened is a shard that broke at its first sample, as before
    remote = None if is_local(url) else open_shard(url)
    try:
        with (remote if remote is not None else open_shard(url)) as stream, \
                tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isreg() or key is None:
                    continue
                if current is not None and key != current.key:
                    yield current
                    current, index = None, index + 1
                if current is None:
                    current = RawSample(key, index, url=url)
                ext = ext.lower()
                if (members is None or ext in members) and member.size > max_bytes:
                    current.rejected = (f"member {ext} is {member.size} bytes, over data.max_member_bytes "
                                        f"{max_bytes}: skipped unread")
                elif members is None or ext in members:
                    current.files[ext] = tar.extractfile(member).read()
                tar.members = []  # stream mode keeps every header otherwise
    except Exception as exn:  # noqa: BLE001 - any read failure ends this shard, reported with the sample
        yield RawSample(current.key if current else url, index, url=url, error=f"{type(exn).__name__}: {exn}")
        return
    if current is not None:
        yield current
