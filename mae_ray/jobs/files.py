"""The small files a job writes beside its run (``result.json``, ``sweep.json``, config copies) and the
lock that keeps two jobs out of one folder.

Every write is whole or absent: a temporary name in the same folder, fsync, rename, fsync of the
folder (a crash or a full disk leaves the previous file, never half of a new one); in a bucket, one
PUT. The lock is ``fcntl.flock`` on ``<folder>/.mae-ray.lock``: the kernel drops it when its process
ends, however it ends, so a killed job never leaves its folder locked (its file stays, unlocked, and the
next job takes it); a job that ends normally removes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from typing import Any

from mae_ray import storage
from mae_ray.errors import UserError
from mae_ray.redaction import redact, redact_all

LOCK_NAME = ".mae-ray.lock"
_held: dict[str, int] = {}  # folder -> fd of the lock this process holds (a nested claim reuses it)


def write_text(path: str, text: str) -> str:
    """``text`` at ``path`` (local or ``s3://``), atomically; returns ``path``."""
    if storage.is_object_uri(path):
        storage.write_bytes(path, text.encode())
        return path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)
    return path


def write_json(path: str, data: dict[str, Any], *, redacted: bool = True) -> str:
    """``data`` as JSON, atomically, secrets redacted (``result.json`` and ``sweep.json`` are shared files)."""
    return write_text(path, json.dumps(redact_all(data) if redacted else data, indent=2))


def read_json(path: str) -> dict[str, Any] | None:
    """A small JSON record on disk or in a bucket; None when there is none."""
    if storage.is_object_uri(path):
        return json.loads(storage.read_bytes(path)) if storage.exists(path) else None
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def claim(folder: str, what: str) -> Iterator[None]:
    """Hold ``folder`` for this job while the block runs; another live job holding it: one ``UserError`` line.

    A folder this claim created is removed again if the block leaves nothing in it but the lock (a job
    refused by a check that needed the lock held first leaves no trace).
    """
    folder = os.path.abspath(folder)
    if folder in _held:  # this process holds it already (an evaluation inside its sweep's trial)
        yield
        return
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    fd = _lock(path, folder)
    command = shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    # The holder's name goes in through a descriptor closed at once: the lock's own is read-only, so a held
    # folder has no file open for writing (an admin's `mount -o remount,ro` is not refused as busy).
    with open(path, "w") as holder:
        holder.write(redact(f"pid {os.getpid()} ({what}, since {time.strftime('%H:%M:%S')}: {command})"))
    _held[folder] = fd
    try:
        yield
    finally:
        del _held[folder]
        try:  # the folder may have gone read-only or vanished under us: the job's own error is the one to show
            os.unlink(path)  # still held: a job waiting on this file finds it gone and takes a fresh one (_lock)
            if created and not os.listdir(folder):
                os.rmdir(folder)  # a job refused by its checks leaves no folder behind
        except OSError:
            pass  # an unlocked lock file left behind is taken by the next job as it is
        finally:
            os.close(fd)  # releases the lock


def _lock(path: str, folder: str) -> int:
    """An fd of ``path`` holding its exclusive lock; the holder named in a ``UserError`` if another has it."""
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{folder} is in use by {holder}: wait for it to end, or use another folder") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # its holder removed it between our open and our lock: take the new one
