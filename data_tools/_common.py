"""Shared by the data tools: errors, image formats, tar members, atomic files, and input scanning."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from data_tools import __version__
from mae_ray.data.shards import IMAGE_EXTENSIONS, MANIFEST_NAME

# Extensions accepted as images in folders: those the loader reads (the shard format's owner,
# mae_ray/data/shards.py). Stored in shards normalised via EXT_ALIASES.
EXT_ALIASES = {"jpeg": "jpg", "tiff": "tif"}
# Extensions that verify_shards treats as the image member of a sample.
SHARD_IMAGE_EXTENSIONS = frozenset(EXT_ALIASES.get(e, e) for e in IMAGE_EXTENSIONS)

# ustar is plain POSIX: no PAX records (which would add ~1 KiB per member) and no GNU extensions.
TAR_FORMAT = tarfile.USTAR_FORMAT
_TAR_BLOCK = 512
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_STEM_MAX = 60  # keeps member names far below ustar's 100-character name field
_HASH_CHUNK = 1 << 20
_OBJECT_REPR = re.compile(r" <[^>]* at 0x[0-9a-f]+>")  # memory addresses would make reports differ per run

TOOL_VERSION = __version__


class DataToolError(Exception):
    """A user mistake (bad input, bad option): reported as one `error: ...` line, exit status 2."""


def normalise_ext(ext: str) -> str:
    ext = ext.lower().lstrip(".")
    return EXT_ALIASES.get(ext, ext)


def is_image_name(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in IMAGE_EXTENSIONS


def sniff_ext(data: bytes) -> str | None:
    """Shard extension from the magic bytes (parquet rows carry no trustworthy file name)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tif"
    return None


def check_image(data: bytes | None) -> str | None:
    """Cheap decodability check; returns a reason string when the image is unusable, else None.

    A full decode costs milliseconds per ImageNet JPEG, which would make writing decode-bound, so we
    parse the header (PIL ``verify``: for PNG this also checks every chunk CRC) and look for JPEG's
    end-of-image marker near the end: truncation is the most common corruption and JPEG's
    ``verify`` does not see it. Only a JPEG without that marker (truncated, or with data appended
    after the image) is decoded to tell which. verify_shards does the full decode of everything.
    """
    if not data:
        return "empty file"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        if data.startswith(b"\xff\xd8") and data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) < 0:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
    except Exception as exc:  # PIL raises many types for broken input; all mean "skip"
        return f"undecodable: {describe_error(exc)}"
    return None


def describe_error(exc: BaseException) -> str:
    """`Type: message` without object addresses, so that reports are identical between runs."""
    return f"{type(exc).__name__}: {_OBJECT_REPR.sub('', str(exc))}"


def make_key(index: int, stem: str) -> str:
    """Unique, dot-free sample key: webdataset splits member names at the first dot."""
    stem = _KEY_UNSAFE.sub("_", stem).strip("_")[:_STEM_MAX]
    return f"{index:09d}_{stem}" if stem else f"{index:09d}"


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one file with fixed metadata so identical input gives byte-identical archives."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def member_bytes(size: int) -> int:
    """Bytes one member takes in a tar: header block plus data padded to whole blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def brace_pattern(names: list[str]) -> str:
    """`train-{000000..000004}.tar` for consecutive shards named by shard_name (one: its name)."""
    if len(names) == 1:
        return names[0]
    stem = names[0][: -len("000000.tar")]
    return f"{stem}{{{names[0][-10:-4]}..{names[-1][-10:-4]}}}.tar"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def metadata_paths(output: Path) -> dict[str, Path]:
    """Files written beside the shards (one dataset per folder, as the loaders expect)."""
    return {
        "dataset": output / MANIFEST_NAME,
        "index": output / "index.parquet",
        "skipped": output / "skipped.jsonl",
        "work": output / ".make_shards",
    }


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- input scanning


@dataclass(frozen=True, slots=True)
class Sample:
    """One planned sample: where its bytes are and what the shard records about it."""

    source: str  # relative to the input ("n01440764/x.JPEG" or "train-0.parquet:17"): json, index, reports
    label: int
    est_bytes: int  # planned bytes in the tar, for --maxsize
    parquet_file: str = ""  # parquet only (a folder's image is input/source)
    row_group: int = -1  # parquet only
    row: int = -1  # parquet only: row within the row group


_SAMPLE_OVERHEAD = member_bytes(8) + member_bytes(300)  # the cls and json members
_INT = re.compile(r"-?\d+")
_CSV_HEADERS = {"filename", "file", "file_name", "image", "imageid", "image_id", "path", "name"}


def scan_imagefolder(
    root: Path, labels: str | os.PathLike | None, classes: str | os.PathLike | None
) -> tuple[list[Sample], list[str]]:
    """Class-folder layout (class index = sorted folder order, or --classes order), or a flat
    folder whose classes come from a --labels file. Samples come back sorted by path."""
    if not root.is_dir():
        raise DataToolError(f"input {root} is not a directory (--format imagefolder)")
    known = read_class_list(Path(classes)) if classes else None
    if labels:
        return _scan_flat(root, Path(labels), known)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        if any(is_image_name(p.name) for p in root.iterdir()):
            raise DataToolError(f"{root} holds images but no class folders; for a flat folder pass --labels FILE")
        raise DataToolError(f"no images found in {root}")
    known = known or [d.name for d in class_dirs]
    index = {name: i for i, name in enumerate(known)}
    unknown = [d.name for d in class_dirs if d.name not in index]
    if unknown:
        raise DataToolError(f"class folder(s) not in --classes: {', '.join(unknown[:5])}")
    samples = []
    for class_dir in class_dirs:
        files = _image_files(class_dir)
        if not files:
            raise DataToolError(f"class folder {class_dir} has no images")
        samples += [_file_sample(root, path, index[class_dir.name]) for path in files]
    return samples, known


def _image_files(folder: Path) -> list[Path]:
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(parent, f) for f in files if is_image_name(f) and not f.startswith(".")]
    return sorted(found)  # os.walk order depends on the file system


def _file_sample(root: Path, path: Path, label: int) -> Sample:
    try:
        size = path.stat().st_size
    except OSError:  # e.g. a dangling link: the writer reports it as unreadable
        size = 0
    return Sample(path.relative_to(root).as_posix(), label, member_bytes(size) + _SAMPLE_OVERHEAD)


def _scan_flat(root: Path, labels_file: Path, known: list[str] | None) -> tuple[list[Sample], list[str]]:
    files = sorted(p for p in root.iterdir() if p.is_file() and is_image_name(p.name) and not p.name.startswith("."))
    if not files:
        raise DataToolError(f"no images found in {root}")
    table = read_labels(labels_file)
    tokens = {p: table.get(p.name, table.get(p.stem)) for p in files}
    missing = [p.name for p, token in tokens.items() if token is None]
    if missing:
        raise DataToolError(f"{labels_file} has no entry for {len(missing)} image(s), e.g. {missing[0]}")
    values = set(tokens.values())
    ints = {v for v in values if _INT.fullmatch(v)}
    if known is not None:
        index = {name: i for i, name in enumerate(known)}
        unknown = sorted(v for v in values - ints if v not in index)
        if unknown:
            raise DataToolError(f"{labels_file}: class {unknown[0]!r} is not in --classes")
        to_label = {v: int(v) if v in ints else index[v] for v in values}
    elif ints == values:
        known = [str(i) for i in range(max(int(v) for v in values) + 1)]
        to_label = {v: int(v) for v in values}
    elif not ints:
        known = sorted(values)  # same rule as class folders: sorted names
        to_label = {v: known.index(v) for v in values}
    else:
        raise DataToolError(f"{labels_file} mixes class indices and class names")
    bad = next((v for v in values if not 0 <= to_label[v] < len(known)), None)
    if bad is not None:
        raise DataToolError(f"{labels_file}: label {bad} out of range 0..{len(known) - 1}")
    return [_file_sample(root, p, to_label[t]) for p, t in tokens.items()], known


def read_labels(path: Path) -> dict[str, str]:
    """File name (with or without extension) -> class token (index or name).

    .json: an object {"name": class}; .csv: first two columns, optional header row, only the first
    word of the class cell (so ImageNet's LOC_val_solution.csv works); otherwise text lines
    "name class" with blank lines and '#' comments ignored.
    """
    if not path.is_file():
        raise DataToolError(f"labels file {path} does not exist")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DataToolError(f"labels file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise DataToolError(f"labels file {path} must hold a JSON object {{file name: class}}")
        return {str(k): str(v) for k, v in data.items()}
    if path.suffix.lower() == ".csv":
        rows = [r for r in csv.reader(text.splitlines()) if len(r) >= 2 and r[1].split()]
        if rows and rows[0][0].strip().lower() in _CSV_HEADERS:
            rows = rows[1:]
        return {r[0].strip(): r[1].split()[0] for r in rows}
    table = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if fields and len(fields) != 2:
            raise DataToolError(f"{path}:{number}: expected 'filename class', got {line.strip()!r}")
        if fields:
            table[fields[0]] = fields[1]
    return table


def read_class_list(path: Path) -> list[str]:
    """Class names in index order: one per line, or the "classes" of a dataset.json."""
    if not path.is_file():
        raise DataToolError(f"--classes file {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            names = json.loads(path.read_text()).get("classes")
        except (ValueError, AttributeError):
            names = None
        if not isinstance(names, list) or not names:
            raise DataToolError(f'{path} has no "classes" list')
        names = [str(n) for n in names]
    else:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise DataToolError(f"--classes {path}: expected a non-empty list of distinct names")
    return names


def scan_parquet(
    source: Path, image_column: str, label_column: str, classes: str | os.PathLike | None
) -> tuple[list[Sample], list[str], list[list[int]]]:
    """Samples of every row, plus the (file, row group) units as index lists for the shuffle.

    Reads metadata and the label column only (streamed per batch); images are read by the writers.
    """
    files = [source] if source.is_file() else sorted(source.rglob("*.parquet"))
    if not files:
        raise DataToolError(f"no *.parquet files in {source}")
    base = source.parent if source.is_file() else source
    known = read_class_list(Path(classes)) if classes else None
    samples: list[Sample] = []
    units: list[list[int]] = []
    for file in files:
        parquet = _open_parquet(file, image_column, label_column)
        known = known or _hf_class_names(parquet.schema_arrow, label_column)
        relative, name, row = file.relative_to(base).as_posix(), str(file), 0
        for group in range(parquet.num_row_groups):
            meta = parquet.metadata.row_group(group)
            image_bytes = sum(
                meta.column(i).total_compressed_size
                for i in range(meta.num_columns)
                if meta.column(i).path_in_schema.split(".")[0] == image_column
            )
            # Sizes are unknown without reading the images: plan with the row group's average.
            est = member_bytes(image_bytes // max(meta.num_rows, 1)) + _SAMPLE_OVERHEAD
            labels = [
                label
                for batch in parquet.iter_batches(batch_size=65_536, row_groups=[group], columns=[label_column])
                for label in batch.column(0).to_pylist()
            ]
            bad = next((r for r, label in enumerate(labels) if label is None or label < 0), None)
            if bad is not None:
                raise DataToolError(f"{file}: row {row + bad} has label {labels[bad]} (need an integer >= 0)")
            units.append(list(range(len(samples), len(samples) + len(labels))))
            samples += [Sample(f"{relative}:{row + r}", y, est, name, group, r) for r, y in enumerate(labels)]
            row += len(labels)
    if not samples:
        raise DataToolError(f"no rows in the parquet files of {source}")
    top = max(s.label for s in samples)
    if known is None:
        known = [str(i) for i in range(top + 1)]
    elif top >= len(known):
        raise DataToolError(f"label {top} out of range for {len(known)} classes")
    return samples, known, [unit for unit in units if unit]


def read_parquet_images(samples: list[Sample], image_column: str) -> dict[tuple, tuple[bytes | None, str]]:
    """(parquet file, row group, row) -> (image bytes or None, original path) for exactly these
    samples, streamed batch by batch from the image column only."""
    wanted: dict[tuple[str, int], set[int]] = {}
    for s in samples:
        wanted.setdefault((s.parquet_file, s.row_group), set()).add(s.row)
    images = {}
    for (file, group), rows in sorted(wanted.items()):
        offset = 0
        batches = pq.ParquetFile(file, pre_buffer=False).iter_batches(256, row_groups=[group], columns=[image_column])
        for batch in batches:
            column = batch.column(0)
            is_struct = pa.types.is_struct(column.type)
            data = column.field("bytes") if is_struct else column
            paths = column.field("path") if is_struct and column.type.get_field_index("path") >= 0 else None
            for i in range(len(batch)):
                if offset + i in rows:
                    value = data[i].as_py() if column[i].is_valid else None
                    images[(file, group, offset + i)] = (value, (paths[i].as_py() if paths is not None else None) or "")
            offset += len(batch)
    return images


def _open_parquet(file: Path, image_column: str, label_column: str) -> pq.ParquetFile:
    try:
        parquet = pq.ParquetFile(file, pre_buffer=False)
    except (OSError, pa.ArrowException) as exc:
        raise DataToolError(f"{file}: not a readable parquet file ({exc})") from None
    schema = parquet.schema_arrow
    for column in (image_column, label_column):
        if column not in schema.names:
            raise DataToolError(f"{file}: missing column {column!r} (columns: {', '.join(schema.names)})")
    image_type = schema.field(image_column).type
    if pa.types.is_struct(image_type):
        index = image_type.get_field_index("bytes")
        image_type = image_type.field(index).type if index >= 0 else None
    if image_type is None or not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise DataToolError(f"{file}: column {image_column!r} must be binary or a struct with binary 'bytes'")
    if not pa.types.is_integer(schema.field(label_column).type):
        raise DataToolError(f"{file}: column {label_column!r} must hold integers")
    return parquet


def _hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """Class names that the Hugging Face `datasets` library stores in the schema metadata."""
    try:
        feature = json.loads(schema.metadata[b"huggingface"])["info"]["features"][label_column]
        names = feature.get("names")
    except (TypeError, KeyError, ValueError, AttributeError):
        return None
    return [str(n) for n in names] if isinstance(names, list) and names else None
