"""Write an image folder or parquet files as deterministic WebDataset shards.

    python -m data_tools.make_shards --input SRC --output DIR|s3://bucket/prefix [--format imagefolder|parquet] ...

Each sample is ``<key>.<ext>`` (the source image bytes, never re-encoded), ``<key>.cls`` (ascii
int) and ``<key>.json`` (source, class_name, label). Output is a pure function of (input, options):
the plan (which sample goes to which shard, in which order) is computed up front from metadata, so
any ``--workers`` gives byte-identical shards, and a rerun after an interruption rewrites only the
shards that are missing. Beside the shards: dataset.json, index.parquet, skipped.jsonl. An ``s3://``
output is written to a local staging folder (``--staging``), then uploaded (data_tools/bucket.py).
See docs/data_tools.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from data_tools._common import (
    TAR_FORMAT,
    TOOL_VERSION,
    DataToolError,
    Sample,
    add_member,
    atomic_write_bytes,
    atomic_write_json,
    brace_pattern,
    check_image,
    file_sha256,
    make_key,
    metadata_paths,
    normalise_ext,
    read_parquet_images,
    scan_imagefolder,
    scan_parquet,
    shard_name,
    sniff_ext,
)
from mae_ray import storage

_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Shard:
    name: str
    start: int  # global position of the first sample: keys are numbered across the whole dataset
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class Plan:
    jobs: list[list[Shard]]  # a job is written by one worker; parquet jobs share one shuffle window
    classes: list[str]
    fingerprint: str

    @property
    def shards(self) -> list[Shard]:
        return [shard for job in self.jobs for shard in job]


# --------------------------------------------------------------------------- planning


def build_plan(samples: list[Sample], classes: list[str], options: dict, units: list[list[int]] | None) -> Plan:
    """Shuffle with the seed and cut into shards; the fingerprint identifies the exact output.

    Folders: one global permutation (listings are class-sorted). Parquet (too big to hold, too slow
    to read at random): shuffle the (file, row group) units, join consecutive ones into windows of
    at least ``shuffle_buffer`` rows and permute the rows within each window; one worker reads a
    window once and writes all its shards.
    """
    rng = np.random.default_rng(options["seed"])
    if units is None:
        windows = [rng.permutation(len(samples))]
    else:
        windows, current = [], []
        for unit in rng.permutation(len(units)):
            current += units[unit]
            if len(current) >= options["shuffle_buffer"]:
                windows.append(current)
                current = []
        windows += [current] if current else []
        windows = [np.asarray(w)[rng.permutation(len(w))] for w in windows]
    digest = hashlib.sha256(json.dumps([TOOL_VERSION, options, classes], sort_keys=True).encode())
    jobs: list[list[Shard]] = []
    count = position = 0
    for window in windows:
        shards = []
        for chunk in _split([samples[i] for i in window], options["maxcount"], options["maxsize"]):
            shards.append(Shard(shard_name(options["prefix"], count), position, tuple(chunk)))
            digest.update(json.dumps([shards[-1].name, [(s.source, s.label, s.est_bytes) for s in chunk]]).encode())
            count, position = count + 1, position + len(chunk)
        # A folder shard reads its own files: one job each. A parquet window is read once, by one job.
        jobs.extend([[shard] for shard in shards] if units is None else [shards])
    return Plan(jobs, classes, digest.hexdigest())


def _split(samples: list[Sample], maxcount: int, maxsize: int | None) -> list[list[Sample]]:
    chunks: list[list[Sample]] = []
    size = 0
    for sample in samples:
        if not chunks or len(chunks[-1]) >= maxcount or (maxsize and size + sample.est_bytes > maxsize):
            chunks.append([])
            size = 0
        chunks[-1].append(sample)
        size += sample.est_bytes
    return chunks


# --------------------------------------------------------------------------- writing (in workers)


@dataclass(frozen=True)
class _Task:
    shards: list[Shard]
    root: Path  # the input folder (image folders)
    output: Path
    fingerprint: str
    classes: list[str]
    image_column: str
    parquet: bool


def _write_job(task: _Task) -> tuple[int, int]:
    """Write the shards of one job; returns (samples written, samples skipped)."""
    samples = [sample for shard in task.shards for sample in shard.samples]
    rows = read_parquet_images(samples, task.image_column) if task.parquet else None
    written = skipped = 0
    for shard in task.shards:
        record = _write_shard(task, shard, rows)
        written, skipped = written + record["count"], skipped + len(record["skipped"])
    return written, skipped


def _load(sample: Sample, root: Path, rows) -> tuple[bytes | None, str, str, str]:
    """(bytes or None, shard extension, key stem, reason when unusable) for one sample."""
    if rows is None:
        path = root / sample.source
        try:
            data = path.read_bytes()
        except OSError as exc:
            return None, "", "", f"unreadable: {exc.strerror or exc}"
        return data, normalise_ext(path.suffix), path.stem, ""
    data, original = rows[(sample.parquet_file, sample.row_group, sample.row)]
    if not data:
        return None, "", "", "no image bytes"
    ext = sniff_ext(data)
    return data, ext or "", Path(original).stem, "" if ext else "unknown image format"


def _write_shard(task: _Task, shard: Shard, rows) -> dict:
    final = task.output / shard.name
    tmp = task.output / f".{shard.name}.tmp"  # hidden and not *.tar: never mistaken for a shard
    samples, skipped = [], []
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=TAR_FORMAT) as tar:
            for position, sample in enumerate(shard.samples, shard.start):
                data, ext, stem, reason = _load(sample, task.root, rows)
                reason = reason or check_image(data)
                if reason:
                    skipped.append([sample.source, reason])
                    continue
                key = make_key(position, stem)
                class_name = task.classes[sample.label]
                meta = {"source": sample.source, "class_name": class_name, "label": sample.label}
                add_member(tar, f"{key}.{ext}", data)
                add_member(tar, f"{key}.cls", str(sample.label).encode())
                add_member(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
                samples.append([key, sample.label, class_name, len(data), sample.source])
        f.flush()
        os.fsync(f.fileno())
    record = {
        "plan": task.fingerprint,
        "name": shard.name,
        "bytes": tmp.stat().st_size,
        "sha256": file_sha256(tmp),
        "count": len(samples),
        "samples": samples,
        "skipped": skipped,
    }
    os.replace(tmp, final)
    # The sidecar goes last: a shard without one is rewritten by the next run (same bytes).
    atomic_write_json(metadata_paths(task.output)["work"] / f"{shard.name}.json", record)
    return record


# --------------------------------------------------------------------------- output folder state


def _completed_shards(output: Path, plan: Plan, overwrite: bool) -> set[str] | None:
    """Shard names already written by this plan; None when the whole dataset is already complete.

    Refuses (before anything is written) to touch a folder holding a different dataset.
    """
    paths = metadata_paths(output)
    if output.exists() and not output.is_dir():
        raise DataToolError(f"output {output} exists and is not a directory")
    if overwrite:
        _clear(output)
        return set()
    names = {s.name for s in plan.shards}
    tars = {p.name for p in output.glob("*.tar")}
    manifest = _read_json(paths["dataset"])
    if manifest is not None:
        if manifest.get("plan_sha256") != plan.fingerprint:
            raise DataToolError(
                f"{output} already holds a different dataset ({paths['dataset'].name} has another plan: "
                "other input or options); choose another --output or pass --overwrite"
            )
        if tars == names and all(
            (output / n).stat().st_size == info["bytes"] for n, info in manifest["shard_files"].items()
        ):
            return None
    started = _read_json(paths["work"] / "plan.json")
    if started is not None and started.get("plan_sha256") != plan.fingerprint:
        raise DataToolError(
            f"{output} holds an unfinished run with other input or options; rerun that command or pass --overwrite"
        )
    if manifest is None and started is None and tars:
        raise DataToolError(f"{output} already contains *.tar files; choose another --output or pass --overwrite")
    if tars - names:
        raise DataToolError(f"{output} contains shards this plan does not write, e.g. {sorted(tars - names)[0]}")
    done = set()
    for name in names & tars:
        record = _read_json(paths["work"] / f"{name}.json")
        if record and record["plan"] == plan.fingerprint and (output / name).stat().st_size == record["bytes"]:
            done.add(name)
    return done


def _clear(output: Path) -> None:
    """Remove a previous dataset: only files this tool writes."""
    paths = metadata_paths(output)
    for path in [*output.glob("*.tar"), *output.glob(".*.tmp"), paths["dataset"], paths["index"], paths["skipped"]]:
        path.unlink(missing_ok=True)
    shutil.rmtree(paths["work"], ignore_errors=True)


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise DataToolError(f"{path} is not valid JSON ({exc}); pass --overwrite to replace it") from None


def _write_metadata(output: Path, plan: Plan, options: dict, crop_ratio: float | None = None) -> dict:
    """index.parquet, skipped.jsonl, then dataset.json (its presence marks a complete dataset)."""
    paths = metadata_paths(output)
    records = [_read_json(paths["work"] / f"{s.name}.json") for s in plan.shards]
    samples = [(*row, r["name"]) for r in records for row in r["samples"]]
    index = pa.table(
        {
            "key": pa.array([s[0] for s in samples], pa.string()),
            "shard": pa.array([s[5] for s in samples], pa.string()),
            "label": pa.array([s[1] for s in samples], pa.int64()),
            "class_name": pa.array([s[2] for s in samples], pa.string()),
            "size": pa.array([s[3] for s in samples], pa.int64()),
            "source": pa.array([s[4] for s in samples], pa.string()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(index, sink)
    atomic_write_bytes(paths["index"], sink.getvalue().to_pybytes())
    skipped = [{"source": src, "reason": why} for r in records for src, why in r["skipped"]]
    atomic_write_bytes(paths["skipped"], "".join(json.dumps(s) + "\n" for s in skipped).encode())
    manifest = {
        "tool": "data_tools.make_shards",
        "version": TOOL_VERSION,
        **options,
        "plan_sha256": plan.fingerprint,
        "total": len(samples),
        "num_skipped": len(skipped),
        "num_classes": len(plan.classes),
        "classes": plan.classes,
        "shards": {r["name"]: r["count"] for r in records},  # the loaders read this mapping
        "shard_files": {r["name"]: {"bytes": r["bytes"], "sha256": r["sha256"]} for r in records},
        "pattern": brace_pattern([r["name"] for r in records]),
        "index": paths["index"].name,
        "skipped": paths["skipped"].name,
        **({"crop_ratio": crop_ratio} if crop_ratio is not None else {}),  # the evaluation crop (mae_ray)
    }
    atomic_write_json(paths["dataset"], manifest)
    shutil.rmtree(paths["work"])
    return manifest


# --------------------------------------------------------------------------- driver


def make_shards(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    format: str = "imagefolder",
    prefix: str = "train",
    maxcount: int = 1000,
    maxsize: int | None = None,
    workers: int = 1,
    seed: int = 0,
    labels: str | os.PathLike | None = None,
    classes: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str = "label",
    shuffle_buffer: int = 5_000,
    overwrite: bool = False,
    progress: bool = True,
    fail_after: int | None = None,
    crop_ratio: float | None = None,
) -> dict:
    """Write ``input`` as shards in ``output``; returns dataset.json's content plus run statistics.

    Raises DataToolError for bad input before anything is written. ``fail_after`` (tests only)
    raises RuntimeError once that many jobs have finished, to simulate an interrupted run.
    ``crop_ratio``: the evaluation crop the training jobs use on these images (dataset.json's
    ``crop_ratio``; 1.0 keeps the whole image, e.g. for small full-frame pictures); metadata only,
    so changing it rewrites dataset.json but no shard.
    """
    if not _PREFIX_RE.match(prefix):
        raise DataToolError(f"--prefix {prefix!r}: use letters, digits, '-' and '_' only")
    if maxcount < 1 or workers < 1 or shuffle_buffer < 1 or (maxsize is not None and maxsize < 1):
        raise DataToolError("--maxcount, --maxsize, --workers and --shuffle-buffer must be positive")
    if crop_ratio is not None and not 0 < crop_ratio <= 1:
        raise DataToolError(f"--crop-ratio must be in (0, 1] (1.0: the whole image), got {crop_ratio}")
    source = Path(input)
    if not source.exists():
        raise DataToolError(f"input {source} does not exist")
    options = {"format": format, "prefix": prefix, "maxcount": maxcount, "maxsize": maxsize, "seed": seed}
    if format == "imagefolder":
        samples, class_names = scan_imagefolder(source, labels, classes)
        units = None
    elif format == "parquet":
        samples, class_names, units = scan_parquet(source, image_column, label_column, classes)
        options["shuffle_buffer"] = shuffle_buffer
    else:
        raise DataToolError(f"unknown --format {format!r} (imagefolder or parquet)")
    plan = build_plan(samples, class_names, options, units)
    output = Path(output)
    done = _completed_shards(output, plan, overwrite)
    if done is None:
        manifest = json.loads(metadata_paths(output)["dataset"].read_text())
        if crop_ratio is not None and manifest.get("crop_ratio") != crop_ratio:
            manifest["crop_ratio"] = crop_ratio  # metadata only: the shards stay
            atomic_write_json(metadata_paths(output)["dataset"], manifest)
        return {**manifest, "written_now": 0, "reused": len(manifest["shards"]), "seconds": 0.0,
                "empty_classes": _empty_classes(output, manifest["classes"])}

    work = metadata_paths(output)["work"]
    work.mkdir(parents=True, exist_ok=True)
    for stale in output.glob(".*.tar.tmp"):  # left by an interrupted run
        stale.unlink()
    atomic_write_json(work / "plan.json", {"plan_sha256": plan.fingerprint})
    metadata_paths(output)["dataset"].unlink(missing_ok=True)  # the folder is incomplete until the end
    parquet = units is not None
    pending = [[s for s in job if s.name not in done] for job in plan.jobs]
    tasks = [_Task(job, source, output, plan.fingerprint, class_names, image_column, parquet) for job in pending if job]
    todo = sum(len(s.samples) for t in tasks for s in t.shards)
    start = time.perf_counter()
    with tqdm(total=todo, unit="img", desc=f"writing {prefix}", disable=not progress or None) as bar:
        context = multiprocessing.get_context("spawn")  # fork after pyarrow/tqdm threads is unsafe
        pool = context.Pool(workers) if workers > 1 and len(tasks) > 1 else None
        try:
            results = pool.imap_unordered(_write_job, tasks) if pool else map(_write_job, tasks)
            for finished, (written, skipped) in enumerate(results, 1):
                bar.update(written + skipped)
                if fail_after is not None and finished >= fail_after:
                    raise RuntimeError(f"simulated interruption after {finished} jobs")
        finally:
            if pool:
                pool.terminate()
    seconds = time.perf_counter() - start
    manifest = _write_metadata(output, plan, options, crop_ratio)
    return {**manifest, "written_now": todo, "reused": len(done), "seconds": seconds,
            "empty_classes": _empty_classes(output, plan.classes)}


def _empty_classes(output: Path, classes: list[str]) -> list[str]:
    """Names of the classes without a single written sample (all their images skipped, or none given)."""
    labels = pq.read_table(metadata_paths(output)["index"], columns=["label"]).column("label")
    present = set(pc.unique(labels).to_pylist())
    return [name for index, name in enumerate(classes) if index not in present]


def summary_line(result: dict) -> str:
    head = f"{result['total']} samples written, {result['num_skipped']} skipped, {len(result['shards'])} shards"
    if not result["written_now"]:
        return f"{head}: already complete, nothing to do"
    reused = f", {result['reused']} reused from an earlier run" if result["reused"] else ""
    return f"{head}{reused} ({result['written_now'] / result['seconds']:.0f} images/s)"


def _make_in_bucket(source: str, uri: str, staging: str | None, progress: bool, options: dict) -> dict:
    """Shards written to ``staging`` (a temporary folder unless given), then uploaded under ``uri``."""
    from data_tools.bucket import check_target, upload_dataset

    check_target(uri, options.get("overwrite", False))  # before any image is read
    with tempfile.TemporaryDirectory(prefix="make_shards_") as tmp:
        folder = Path(staging or tmp)
        result = make_shards(source, folder, progress=progress, **options)
        sent = upload_dataset(folder, uri)
    print(f"uploaded {sent / 1e6:.1f} MB to {uri}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.make_shards", description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="image folder, parquet file or folder of *.parquet")
    parser.add_argument("--output", required=True, help="folder (or s3:// prefix) for the shards and their metadata")
    parser.add_argument("--staging", default=None,
                        help="with an s3:// --output: the local folder written first, then uploaded (default: a "
                             "temporary folder, removed afterwards; give one to resume an interrupted run)")
    parser.add_argument("--format", choices=["imagefolder", "parquet"], default="imagefolder")
    parser.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ...")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--maxsize", type=int, default=None, help="planned bytes per shard at most")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    parser.add_argument("--labels", help="flat folder: file mapping file name -> class (txt, csv or json)")
    parser.add_argument("--classes", help="class names in index order: a text file or a dataset.json")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--shuffle-buffer", type=int, default=5_000, help="parquet: rows shuffled together")
    parser.add_argument("--overwrite", action="store_true", help="replace a different dataset in --output")
    parser.add_argument("--crop-ratio", type=float, default=None,
                        help="evaluation crop for these images, written to dataset.json: resize to size / ratio, "
                             "centre crop (default: the jobs' 0.875; 1.0 keeps the whole image)")
    parser.add_argument("--no-progress", action="store_true")
    options = vars(parser.parse_args(argv))
    progress = not options.pop("no_progress")
    output, staging = options.pop("output"), options.pop("staging")
    try:
        if storage.is_object_uri(output):
            result = _make_in_bucket(options.pop("input"), output.rstrip("/"), staging, progress, options)
        else:
            result = make_shards(options.pop("input"), output, progress=progress, **options)
    except DataToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the output folder is not writable, or the disk is full
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to finish (complete shards are kept)", file=sys.stderr)
        return 130
    print(summary_line(result))
    empty = result["empty_classes"]
    if empty:  # kept (labels stay those of the class list) but a researcher wants to know
        shown = ", ".join(empty[:10]) + (f" (+{len(empty) - 10} more)" if len(empty) > 10 else "")
        print(f"warning: {len(empty)} of {len(result['classes'])} classes have no samples: {shown}; they keep "
              "their label index and count in num_classes (see skipped.jsonl for images that were skipped)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
