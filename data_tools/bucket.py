"""A finished shard folder copied to object storage (``make_shards --output s3://...``).

The shards are written to a local staging folder first (the writer's determinism, resume and checks are
all local-file logic), then uploaded: each object under a temporary key, copied to its final key on the
server and the temporary one deleted, and ``dataset.json`` last, so that a reader (the loader, a job's
driver) finds a complete dataset or none. Endpoint and credentials as for the jobs (mae_ray/storage.py):
``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... from the environment only.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.fs as pafs

from data_tools._common import DataToolError
from mae_ray import storage
from mae_ray.data.shards import MANIFEST_NAME

_CHUNK = 8 << 20


def check_target(uri: str, overwrite: bool) -> None:
    """Refuse, before any work, a prefix that already holds a dataset (unless ``overwrite``) or cannot be
    reached."""
    try:
        complete = storage.exists(f"{uri}/{MANIFEST_NAME}")
    except ValueError as exc:  # mae_ray's DataError: no endpoint, bucket or credentials that work
        raise DataToolError(str(exc)) from None
    if complete and not overwrite:
        raise DataToolError(f"{uri} already holds a dataset ({MANIFEST_NAME}); choose another --output or "
                            "pass --overwrite")


def upload_dataset(folder: Path, uri: str) -> int:
    """Copy ``folder``'s shards and metadata under ``uri``; returns the bytes uploaded."""
    fs, prefix = storage.filesystem(uri)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    files.sort(key=lambda p: p.name == MANIFEST_NAME)  # the dataset's completion mark goes last
    if not any(p.name == MANIFEST_NAME for p in files):
        raise DataToolError(f"{folder} holds no finished dataset ({MANIFEST_NAME} missing)")
    manifest = f"{prefix}/{MANIFEST_NAME}"
    if fs.get_file_info(manifest).type != pafs.FileType.NotFound:
        fs.delete_file(manifest)  # --overwrite: the prefix is incomplete until the new one lands
    sent = 0
    for path in files:
        final, tmp = f"{prefix}/{path.name}", f"{prefix}/.{path.name}.tmp"
        with open(path, "rb") as src, fs.open_output_stream(tmp) as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                sent += len(chunk)
        fs.copy_file(tmp, final)
        fs.delete_file(tmp)
    return sent

