"""Copying a checkpoint folder to a run's storage (a local or mounted path, or a bucket), whole or not at all.

Ray Train calls this (as ``checkpoint_upload_fn``, via ``checkpoints``) on rank 0, in the training thread or in
its background upload thread; the in-process runs call it directly. What is in the folder is ``checkpoints``'.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import pyarrow.fs as pafs
from ray.train import Checkpoint

from mae_ray.errors import CheckpointError

log = logging.getLogger(__name__)

# Waits between the tries of a checkpoint upload to object storage, doubling up to the last, for as long as
# storage.upload_retry_s allows: a brief outage, a throttled burst or a dropped connection passes.
UPLOAD_RETRY_WAITS_S = (1.0, 2.0, 4.0, 8.0, 16.0)


class Background:
    """The copies queued to Ray Train's background upload thread on rank 0: how many are still to finish, and the
    first that failed for good. Ray raises such a failure into the training loop only when it next polls the
    worker, which may be after the loop began later checkpoints (a copy cut short leaves a ``.tmp-`` folder);
    with this, a failure stops the run at its next report, before anything more is written, a copy queued
    behind a failed one writes nothing, and the run's last checkpoint (copied while training waits) is
    written only after every copy before it has finished."""

    def __init__(self):
        self._done = threading.Condition()
        self._in_flight = 0
        self.failed: BaseException | None = None

    def queued(self) -> None:
        with self._done:
            self._in_flight += 1

    def finished(self, error: BaseException | None = None) -> None:
        with self._done:
            self._in_flight -= 1
            self.failed = self.failed or error
            self._done.notify_all()

    def check(self, wait_s: float = 0.0) -> None:
        """Raise the first failed copy's error; ``wait_s``: first wait up to that long for the copies in flight."""
        with self._done:
            if wait_s:
                self._done.wait_for(lambda: self._in_flight == 0, timeout=wait_s)
            if self.failed is not None:
                raise self.failed


def address(fs, path: str) -> str:
    """``path`` on the pyarrow filesystem ``fs`` as a URI: ``s3://`` in a bucket, else the local path."""
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def upload(checkpoint: Checkpoint, fs, root: str, dir_name: str, written_last: str, retry_s: float = 60.0,
           last_good: str | None = None) -> Checkpoint:
    """Copy ``checkpoint`` to ``root/dir_name`` on ``fs`` (a pyarrow filesystem) so that no reader ever sees half
    of it. On a local or mounted filesystem the files go to ``.tmp-<dir_name>`` first and the folder is renamed
    once whole. An object store has no rename: there each object is written whole or not at all, and
    ``written_last`` (the file by which every reader recognises a checkpoint) is written last
    (:func:`copy_last`). Either way a full or read-only disk, a lost connection or a worker killed mid-copy
    leaves nothing that looks like a complete checkpoint. Uploads to object storage are tried again for
    ``retry_s`` seconds before the run fails; ``last_good`` is named in that error (an upload in the
    background, whose error reaches no caller that knows it).
    """
    local = isinstance(fs, pafs.LocalFileSystem)
    start, tries = time.monotonic(), 0
    while True:
        tries += 1
        try:
            return _put(checkpoint, fs, root, dir_name, local, written_last)
        except OSError as e:
            text = str(e).strip().splitlines()
            error = text[0] if text else type(e).__name__
        if tries == 1:  # the window opens at the first failure; a full disk does not heal in seconds
            deadline = time.monotonic() + (0 if local else retry_s)
        wait = min(UPLOAD_RETRY_WAITS_S[min(tries, len(UPLOAD_RETRY_WAITS_S)) - 1], deadline - time.monotonic())
        if wait <= 0:
            break
        log.warning("checkpoint %s: upload to %s failed (%s); trying again in %.0f s", dir_name,
                    address(fs, root), error, wait)
        time.sleep(wait)
    tried = f" (tried {tries} times in {time.monotonic() - start:.0f} s)" if tries > 1 else ""
    named = f"; last good checkpoint: {last_good}" if last_good else ""
    raise CheckpointError(f"cannot write checkpoint {dir_name} to {address(fs, root)}{tried}: {error}{named}")


def _put(checkpoint: Checkpoint, fs, root: str, dir_name: str, local: bool, written_last: str) -> Checkpoint:
    """One try of :func:`upload`; on failure it removes what it wrote and raises the OSError."""
    final, tmp = f"{root}/{dir_name}", f"{root}/.tmp-{dir_name}"
    try:
        if local:
            fs.delete_dir_contents(tmp, missing_dir_ok=True)
            fs.create_dir(tmp)
            pafs.copy_files(checkpoint.path, tmp, source_filesystem=checkpoint.filesystem, destination_filesystem=fs)
        if fs.get_file_info(final).type != pafs.FileType.NotFound:
            fs.delete_dir(final)  # the same epoch written again after a restart
        if local:
            fs.move(tmp, final)
        else:
            with checkpoint.as_directory() as src:
                copy_last(src, fs, final, written_last)
    except OSError:
        with contextlib.suppress(OSError):
            fs.delete_dir(tmp if local else final)  # frees what the failed copy took
        raise
    return Checkpoint(path=final, filesystem=fs)


def copy_last(src: str, fs, dest: str, last: str) -> None:
    """Copy the files of local folder ``src`` to ``dest`` on ``fs`` (a pyarrow filesystem), ``last`` last."""
    for name in sorted(os.listdir(src), key=lambda n: (n == last, n)):
        with open(os.path.join(src, name), "rb") as f, fs.open_output_stream(f"{dest}/{name}") as out:
            while chunk := f.read(8 << 20):
                out.write(chunk)
