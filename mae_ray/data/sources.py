"""Where a shard's bytes come from, and the bounds on what a shard may hand the loader.

Local files, ``s3://`` objects (pyarrow), ``http(s)://`` (streamed here, not by webdataset's ``curl`` pipe,
whose 30 retries per request made a refusing server an endless silent wait), ``pipe:`` commands (webdataset's
``gopen``, which runs them: only the user's own). A remote shard that cannot be opened is tried a bounded number
of times, then named in a ``DataError``. The bounds (``data.max_image_pixels``, ``data.max_member_bytes``,
``data.shard_tries``) travel to every process of a job through the environment, as the S3 endpoint does.
"""

from __future__ import annotations

import base64
import os
import time
import urllib.request
from typing import IO
from urllib.parse import unquote, urlsplit

from mae_ray import storage
from mae_ray.errors import DataError

REMOTE_PREFIXES = ("pipe:", "http://", "https://")


def is_local(url: str) -> bool:
    return not url.startswith(REMOTE_PREFIXES) and not storage.is_object_uri(url)


# data.max_image_pixels / max_member_bytes / shard_tries, exported by use_limits() (as storage.use_endpoint
# exports the endpoint) so that a Ray worker's loader processes, forked or spawned, read the job's values
LIMITS_ENV = {"max_image_pixels": "MAE_RAY_MAX_IMAGE_PIXELS", "max_member_bytes": "MAE_RAY_MAX_MEMBER_BYTES",
              "shard_tries": "MAE_RAY_SHARD_TRIES"}
_TRY_TIMEOUT_S = 60.0  # one attempt to open a remote shard (connect, and the wait for its first bytes)


def use_limits(data) -> None:
    """Put a job's ``data`` config bounds in force for this process and the ones it starts."""
    for key, env in LIMITS_ENV.items():
        os.environ[env] = str(int(getattr(data, key)))


def limit(key: str) -> int:
    """The bound ``key`` in force (``use_limits``), else the config's default."""
    from mae_ray.config import DataConfig

    value = os.environ.get(LIMITS_ENV[key])
    return int(value) if value else int(getattr(DataConfig, key))


def open_shard(url: str) -> IO[bytes]:
    """The shard's byte stream. A remote one (bucket, http) that cannot be opened is tried again, up to
    ``data.shard_tries`` in all with a growing pause, then a ``DataError`` names it: never an endless
    silent loop. ``pipe:`` commands (and gs://) go to webdataset's gopen, which runs them."""
    if is_local(url):  # not through gopen: WDS_SECURE=1 (which blocks local gopen) does not matter
        return open(url, "rb")
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    opener = storage.open_input if storage.is_object_uri(url) else _open_http
    tries = limit("shard_tries")
    for attempt in range(1, tries + 1):
        try:
            return opener(url)
        except Exception as exn:  # noqa: BLE001 - every failure to reach the shard counts as a try
            if attempt == tries:
                raise DataError(f"shard {url} could not be read ({tries} tries; data.shard_tries): "
                                f"{type(exn).__name__}: {str(exn).strip().splitlines()[0] if str(exn).strip() else ''}"
                                ) from None
            time.sleep(min(2.0 ** (attempt - 1), 10.0))
    raise AssertionError("unreachable")


def _open_http(url: str) -> IO[bytes]:
    """An http(s) shard, streamed (not webdataset's gopen: it runs curl with 30 retries per request). The
    URL's ``user:password`` becomes a basic-auth header; an error status raises."""

    parts = urlsplit(url)
    headers = {}
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        parts = parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
    return urllib.request.urlopen(urllib.request.Request(parts.geturl(), headers=headers), timeout=_TRY_TIMEOUT_S)


def check_remote_shard(urls: list[str]) -> None:
    """The first shard of a remote set (http(s)://, s3://) opened and its first block read, with
    ``data.shard_tries`` tries: a server that refuses, or credentials that do not open it, end the job
    here with one line, before Ray starts. ``pipe:`` commands are not run for a check."""
    url = urls[0]
    if is_local(url) or url.startswith("pipe:"):
        return
    with open_shard(url) as stream:
        stream.read(512)
