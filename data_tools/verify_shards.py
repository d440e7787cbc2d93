"""Check a folder of shards against its dataset.json and fully decode every image.

    python -m data_tools.verify_shards DIR|s3://bucket/prefix [--workers N]

Checks each shard listed in DIR/dataset.json (and any other *.tar in DIR): readable to the end,
size and sha256 as recorded, sample count as recorded, every sample has exactly one image, an
integer ``cls`` within the classes and valid ``json``, and every image decodes to RGB. Prints one
line per problem and a summary; exit status 0 when all is well, 1 on any problem, 2 on bad usage.
Shards in a bucket (``s3://``; endpoint and credentials as for the jobs, mae_ray/storage.py) are read
once each, through a temporary local copy.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import multiprocessing
import shutil
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from data_tools._common import SHARD_IMAGE_EXTENSIONS, DataToolError, describe_error, file_sha256, metadata_paths
from mae_ray import storage
from mae_ray.data.shards import MANIFEST_NAME, read_shard

_SHOWN_PER_SHARD = 20  # a shard full of bad samples should not flood the report


def verify_shard(path: str | Path, num_classes: int | None = None) -> dict:
    """Read one shard end to end; returns its name, sample count, sha256, size and problems."""
    if storage.is_object_uri(str(path)):
        with tempfile.TemporaryDirectory() as tmp:  # one download serves the reading and the checksum
            local = Path(tmp) / str(path).rsplit("/", 1)[-1]
            with storage.open_input(str(path)) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            return verify_shard(local, num_classes)
    path = Path(path)
    samples: dict[str, dict[str, bytes]] = {}
    problems: list[str] = []
    for sample in read_shard(str(path), members=None):  # the loader's reader: its key rule, strict headers
        if sample.broken:
            problems.append(f"unreadable tar after {len(samples)} samples: {sample.error}")
            break
        if sample.key in samples:  # readers group consecutive members by key
            problems.append(f"key {sample.key} appears in two places")
        samples.setdefault(sample.key, {}).update(sample.files)
    for key, files in samples.items():
        reason = _check_sample(files, num_classes)
        if reason:
            problems.append(f"sample {key}: {reason}")
    name = path.name
    shown = [f"{name}: {p}" for p in problems[:_SHOWN_PER_SHARD]]
    if len(problems) > _SHOWN_PER_SHARD:
        shown.append(f"{name}: ... and {len(problems) - _SHOWN_PER_SHARD} more problems")
    return {
        "name": name,
        "count": len(samples),
        "bytes": path.stat().st_size if path.exists() else 0,
        "sha256": file_sha256(path) if path.exists() else "",
        "problems": shown,
        "bad": len(problems),
    }


def _check_sample(files: dict[str, bytes], num_classes: int | None) -> str | None:
    images = [ext for ext in files if ext in SHARD_IMAGE_EXTENSIONS]
    if len(images) != 1:
        return f"expected one image member, found {sorted(files)}"
    try:
        label = int(files["cls"])
    except (KeyError, ValueError):
        return "missing or non-integer cls"
    if label < 0 or (num_classes is not None and label >= num_classes):
        return f"cls {label} out of range for {num_classes} classes"
    if "json" in files:
        try:
            json.loads(files["json"])
        except ValueError:
            return "invalid json member"
    try:
        with Image.open(io.BytesIO(files[images[0]])) as image:
            image.convert("RGB")
    except Exception as exc:  # any decoder failure means the sample is unusable
        return f"{images[0]} does not decode: {describe_error(exc)}"
    return None


def verify_folder(directory: str | Path, workers: int = 1, progress: bool = True) -> tuple[list[str], dict]:
    """All problems found in ``directory`` (empty when good) and counts for the summary."""
    bucket = storage.is_object_uri(str(directory))
    if bucket:
        directory = str(directory).rstrip("/")
        try:
            found = [uri.rsplit("/", 1)[-1] for uri in storage.list_files(directory + "/", ".tar")]
        except ValueError as exc:  # mae_ray's DataError: the bucket cannot be reached
            raise DataToolError(str(exc)) from None
        read_manifest = lambda: storage.read_bytes(f"{directory}/{MANIFEST_NAME}")  # noqa: E731
        paths = [f"{directory}/{name}" for name in found]
    else:
        directory = Path(directory)
        if not directory.is_dir():
            raise DataToolError(f"{directory} is not a directory")
        found = sorted(p.name for p in directory.glob("*.tar"))
        read_manifest = metadata_paths(directory)["dataset"].read_bytes
        paths = [directory / name for name in found]
    problems: list[str] = []
    try:
        manifest = json.loads(read_manifest())
    except FileNotFoundError:
        manifest = {}
        problems.append(f"no {MANIFEST_NAME} in {directory}: counts cannot be checked")
    except ValueError as exc:
        manifest = {}
        problems.append(f"{MANIFEST_NAME} is not valid JSON: {exc}")
    listed: dict[str, int] = manifest.get("shards", {})
    files: dict[str, dict] = manifest.get("shard_files", {})
    if not listed and not found:
        raise DataToolError(f"no shards in {directory}")
    problems += [f"{name}: listed in {MANIFEST_NAME} but missing" for name in listed if name not in found]
    problems += [f"{name}: not listed in {MANIFEST_NAME}" for name in found if manifest and name not in listed]
    if manifest and sum(listed.values()) != manifest.get("total"):
        problems.append(f"{MANIFEST_NAME}: total {manifest.get('total')} != sum of shard counts")

    check = functools.partial(verify_shard, num_classes=manifest.get("num_classes"))
    start = time.perf_counter()
    results = []
    with tqdm(total=len(paths), unit="shard", desc="verifying", disable=not progress or None) as bar:
        if workers > 1 and len(paths) > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for result in pool.imap(check, paths):
                    results.append(result)
                    bar.update()
        else:
            for path in paths:
                results.append(check(path))
                bar.update()
    for result in results:
        name = result["name"]
        problems += result["problems"]
        if name in listed and result["count"] != listed[name]:
            problems.append(f"{name}: {result['count']} samples, {MANIFEST_NAME} says {listed[name]}")
        recorded = files.get(name)
        if recorded and (recorded["bytes"], recorded["sha256"]) != (result["bytes"], result["sha256"]):
            problems.append(f"{name}: size or sha256 differs from {MANIFEST_NAME} (modified or truncated)")
    samples = sum(r["count"] for r in results)
    stats = {
        "samples": samples,
        "shards": len(results),
        "bad_samples": sum(r["bad"] for r in results),
        "seconds": time.perf_counter() - start,
    }
    return problems, stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.verify_shards", description=__doc__.split("\n")[0])
    parser.add_argument("directory", help="folder (or s3:// prefix) holding the shards and dataset.json")
    parser.add_argument("--workers", type=int, default=1, help="processes decoding shards in parallel")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise DataToolError("--workers must be positive")
        problems, stats = verify_folder(args.directory, args.workers, progress=not args.no_progress)
    except DataToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in problems:
        print(problem)
    rate = stats["samples"] / stats["seconds"] if stats["seconds"] else 0.0
    verdict = f"{len(problems)} problem(s)" if problems else "OK"
    print(f"verified {stats['samples']} samples in {stats['shards']} shards ({rate:.0f} images/s): {verdict}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
