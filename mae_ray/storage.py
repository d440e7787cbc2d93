"""Object storage: which filesystem a URI names, and the one setting that points S3 at a server.

``s3://`` URIs go through pyarrow's own S3 client (``pyarrow.fs``), the same one Ray Train uses for
``storage_path``: no external CLI on the workers. It reads the standard environment, so credentials
come only from there (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, or the instance's role) and never from a config file. An S3-compatible server other
than AWS (MinIO, Ceph, R2, moto in the tests) is named by ``storage.endpoint_url`` in the config or by
the standard ``AWS_ENDPOINT_URL``; the config's value wins, and :func:`use_endpoint` exports it so that
every process of a job (the driver, each Ray Train worker, their loader processes) sees the same one.

Knows nothing of torch, Ray or MLflow.
"""

from __future__ import annotations

import os
import threading
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from mae_ray.errors import DataError

ENDPOINT_ENV = "AWS_ENDPOINT_URL"
OBJECT_SCHEMES = ("s3://",)

_filesystems: dict[tuple[str, str, str], object] = {}
_lock = threading.Lock()


def is_object_uri(uri: str) -> bool:
    return uri.startswith(OBJECT_SCHEMES)


def use_endpoint(endpoint_url: str | None) -> None:
    """Make ``endpoint_url`` (the config's ``storage.endpoint_url``) this process's S3 endpoint and that of
    every process it starts from now on; None leaves ``$AWS_ENDPOINT_URL`` (or AWS itself) in force."""
    if endpoint_url:
        if urlsplit(endpoint_url).scheme not in ("http", "https"):
            raise DataError(f"storage.endpoint_url must be an http(s):// URL, got {endpoint_url!r}")
        os.environ[ENDPOINT_ENV] = endpoint_url


def filesystem(uri: str):
    """(pyarrow FileSystem, path inside it) for an ``s3://bucket/key`` URI; one client per bucket and
    endpoint per process (creating one resolves the bucket's region: a request)."""

    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc:
        raise DataError(f"not an s3://bucket/key URI: {uri!r}")
    endpoint = os.environ.get(ENDPOINT_ENV, "")
    key = (parts.scheme, parts.netloc, endpoint)
    with _lock:
        fs = _filesystems.get(key)
        if fs is None:
            try:  # pyarrow reads $AWS_ENDPOINT_URL and the credentials from the environment itself
                fs = pafs.FileSystem.from_uri(f"s3://{parts.netloc}")[0]
            except OSError as exn:
                raise DataError(f"cannot reach the bucket of {uri}: {_first_line(exn)}") from None
            _filesystems[key] = fs
    return fs, f"{parts.netloc}{parts.path}"


def _first_line(exn: Exception) -> str:
    text = str(exn).strip().splitlines()
    return text[0] if text else type(exn).__name__


def check_writable(uri: str) -> None:
    """Write and delete a small marker under ``uri``: a missing bucket, credentials that may not write, or an
    endpoint that does not answer is one DataError here, before a job starts Ray."""
    fs, path = filesystem(uri)
    marker = f"{path.rstrip('/')}/.mae-ray-write-check"
    try:
        with fs.open_output_stream(marker) as f:
            f.write(b"ok")
        fs.delete_file(marker)
    except OSError as exn:
        raise DataError(f"cannot write to {uri}: {_first_line(exn)}") from None


def bucket_exists(uri: str) -> bool:

    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path.split("/")[0]).type != pafs.FileType.NotFound
    except OSError as exn:
        raise DataError(f"cannot reach {uri}: {_first_line(exn)}") from None


def list_files(uri: str, suffix: str = "", recursive: bool = False) -> list[str]:
    """The ``s3://`` URIs of the objects under the prefix ``uri`` (directly, unless ``recursive``) whose names
    end in ``suffix``, sorted."""

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), allow_not_found=True, recursive=recursive))
    except OSError as exn:
        raise DataError(f"cannot list {uri}: {_first_line(exn)}") from None
    return sorted(f"s3://{i.path}" for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))


def exists(uri: str) -> bool:

    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type == pafs.FileType.File
    except OSError as exn:
        raise DataError(f"cannot reach {uri}: {_first_line(exn)}") from None


def open_input(uri: str, buffer_size: int = 1 << 20):
    """A readable binary stream of the object (read sequentially; no seeking). Buffered: unbuffered, every
    small read (tarfile reads 512-byte headers) would be a request of its own."""
    fs, path = filesystem(uri)
    return fs.open_input_stream(path, compression=None, buffer_size=buffer_size)


def read_bytes(uri: str) -> bytes:
    with open_input(uri) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """One object, whole: an S3 PUT is atomic, so a reader sees the old object or the new one."""
    fs, path = filesystem(uri)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exn:
        raise DataError(f"cannot write {uri}: {_first_line(exn)}") from None
