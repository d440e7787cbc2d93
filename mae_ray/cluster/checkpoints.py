"""The checkpoint: what it holds, how it is written, found, loaded and recognised, what goes to MLflow.

A checkpoint is a folder ``epoch_NNNNNN`` (the epoch just finished, from 0), or ``epoch_NNNNNN_uMMMMMM`` (taken
inside epoch N after M of its updates: ``train.checkpoint_every_minutes``, a preemption notice), under the run's
storage (``ray.storage_path/<run name>/``, a local path or a bucket) holding:

- ``state.pt``: a plain dict, read back with ``torch.load(weights_only=True)`` (nothing is unpickled):
  one state_dict per object the job's ``EpochLoop`` was given (``model``, ``optimizer``, ``scheduler``,
  ``scaler``; the linear probe's ``head``), and ``epoch``, ``step``, ``history`` (every epoch's metrics,
  for MLflow back-fill), ``attempts`` (where each start of the run resumed from), ``mlflow_run_id``;
  pre-training adds ``config`` (the run's YAML), which is what makes a folder a *pre-training* checkpoint
  (:func:`pretraining_parts`);
- in the last checkpoint of a run only, the job's final files (``FINAL_FILES``): the encoder in the
  release's layout and as safetensors for timm, and ``config.yaml`` (pre-training); ``model.pth``
  (fine-tuning); ``head.pt`` (linear probe).

Rank 0 writes it (:func:`report`); on a local or mounted filesystem it is copied to ``.tmp-epoch_*`` and
renamed when whole, in a bucket ``state.pt`` is written last (``upload.py``), so no reader ever sees
half a checkpoint. A restarted worker group
resumes from the newest one that loads (:func:`latest_checkpoint`). At the end, pre-training logs
``MLFLOW_ARTIFACTS`` to its MLflow run, which is how ``runs:/ID`` finds an encoder.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import mlflow
import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointUploadMode

from mae_ray import storage
from mae_ray.cluster import launch
from mae_ray.cluster.upload import Background, address, upload
from mae_ray.errors import CheckpointError
from mae_ray.model import weights

log = logging.getLogger(__name__)

# Every file name of the format is here, and only here: the jobs, the evaluations and runs:/ go through them.
STATE_FILE = "state.pt"
KEEP = 2  # checkpoints a run keeps: the newest two (the one before the newest: in case that one will not load)
CHECKPOINT_PREFIX = "epoch_"
UPDATE_MARK = "_u"  # a checkpoint inside an epoch: epoch_NNNNNN_uMMMMMM, after M of epoch N's updates
ENCODER_FILE = "encoder.pth"  # the release's {"model": ...} layout, encoder only
ENCODER_SAFETENSORS = "encoder.safetensors"  # the same weights for timm
CONFIG_FILE = "config.yaml"  # the pre-training run's config
FINETUNED_FILE = "model.pth"  # the fine-tuned ViT, the release's layout
HEAD_FILE = "head.pt"  # the linear probe's head
FINAL_FILES = {
    "pretrain": (ENCODER_FILE, ENCODER_SAFETENSORS, CONFIG_FILE),
    "finetune": (FINETUNED_FILE,),
    "linprobe": (HEAD_FILE,),
}
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")  # a file, not a checkpoint folder, when a name ends so
# file of a finished pre-training checkpoint -> the MLflow artifact folder it goes to (runs:/ID reads them back)
MLFLOW_ENCODER, MLFLOW_CHECKPOINT = "encoder", "checkpoint"
MLFLOW_ARTIFACTS = {CONFIG_FILE: MLFLOW_ENCODER, ENCODER_FILE: MLFLOW_ENCODER, ENCODER_SAFETENSORS: MLFLOW_ENCODER,
                    STATE_FILE: MLFLOW_CHECKPOINT}


class TrainingState(TypedDict, total=False):
    """What ``state.pt`` holds (a plain dict on disk: tensors, numbers, strings, lists)."""

    epoch: int  # the epoch just finished, from 0
    step: int  # optimiser updates so far
    history: list[dict[str, float]]  # every epoch's metrics, so MLflow can be back-filled after a restart
    attempts: list[dict[str, Any]]  # per start of the run: start_epoch, start_update, resumed_from, workers
    # a checkpoint taken inside an epoch: where it stands (``EpochLoop``): epoch, updates, workers, loader
    # workers, and per rank [loss sum, samples, samples each loader worker consumed]
    in_epoch: dict[str, Any]
    mlflow_run_id: str
    config: str  # pre-training only: the run's config YAML (makes the folder a pre-training checkpoint)
    model: dict[str, torch.Tensor]  # the job's stateful objects, by the names the job gave its EpochLoop
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any]
    head: dict[str, torch.Tensor]  # the linear probe's


def folder_name(epoch: int, updates: int | None = None) -> str:
    """``epoch_NNNNNN`` once epoch N is over; inside it, after ``updates`` of its updates, ``epoch_NNNNNN_uMMMMMM``."""
    return f"{CHECKPOINT_PREFIX}{epoch:06d}" + ("" if updates is None else f"{UPDATE_MARK}{updates:06d}")


def age(path: str) -> tuple[int, float, str]:
    """Sort key of checkpoint folders, oldest first: epoch N's end comes after every checkpoint inside it."""
    name = os.path.basename(path.rstrip("/"))
    head, _, updates = name[len(CHECKPOINT_PREFIX):].partition(UPDATE_MARK)
    try:
        return int(head), float(updates) if updates else float("inf"), name
    except ValueError:
        return -1, 0.0, name


def location(checkpoint: Checkpoint) -> str:
    """A Ray checkpoint's full address: ``s3://bucket/...`` in a bucket (Ray gives the path without its
    scheme), else its local path."""
    return address(checkpoint.filesystem, checkpoint.path)


def pretraining_parts(obj: Any) -> tuple[str, dict[str, torch.Tensor], str | None] | None:
    """(config YAML, model state_dict, MLflow run id) when ``obj`` (a loaded ``state.pt``) is a mae-ray
    pre-training state; None for anything else (an official ``.pth``, another job's state)."""
    if isinstance(obj, dict) and isinstance(obj.get("config"), str) and isinstance(obj.get("model"), dict):
        return obj["config"], obj["model"], obj.get("mlflow_run_id")
    return None


def final_paths(where: str) -> dict[str, str]:
    """Where a finished pre-training checkpoint at ``where`` keeps its encoder, for ``result.json``."""
    return {"checkpoint": where, "encoder": f"{where}/{ENCODER_FILE}",
            "encoder_safetensors": f"{where}/{ENCODER_SAFETENSORS}"}


def log_final_to_mlflow(checkpoint: Checkpoint, logger) -> None:
    """Pre-training's last checkpoint to its MLflow run (``MLFLOW_ARTIFACTS``; ``logger``: an EpochLogger)."""
    with checkpoint.as_directory() as path:
        for file, folder in MLFLOW_ARTIFACTS.items():
            logger.log_artifact(os.path.join(path, file), folder)


def encoder_from_mlflow(run_id: str, tracking_uri: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """(encoder weights, the run's config YAML or None) that pre-training run ``run_id`` logged to MLflow
    (:func:`log_final_to_mlflow`), downloaded to a temporary folder that is removed again."""

    with tempfile.TemporaryDirectory(prefix="mae_ray_encoder_") as tmp:
        try:
            folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MLFLOW_ENCODER,
                                                         tracking_uri=tracking_uri, dst_path=tmp)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointError(f"cannot fetch the encoder of MLflow run {run_id}: {first}") from None
        config = os.path.join(folder, CONFIG_FILE)
        text = Path(config).read_text() if os.path.isfile(config) else None
        return weights.read_state_dict(os.path.join(folder, ENCODER_FILE)), text


def read_weights_source(source: str) -> Any:
    """What a checkpoint folder's state file, a ``.pt``/``.pth`` or a ``.safetensors`` file holds, on disk or
    in a bucket (``s3://``): tensors and plain values, nothing unpickled (``weights_only``)."""
    name = source.rstrip("/")
    if storage.is_object_uri(name):  # streamed to a temporary file: a large state is never held twice in memory
        uri = name if name.endswith(WEIGHT_SUFFIXES) else f"{name}/{STATE_FILE}"
        with tempfile.TemporaryDirectory(prefix="mae_ray_encoder_") as tmp:
            local = os.path.join(tmp, uri.rsplit("/", 1)[-1])
            try:
                with storage.open_input(uri) as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            except FileNotFoundError:
                raise CheckpointError(f"checkpoint not found: {source}") from None
            except OSError as e:
                raise CheckpointError(f"cannot read {uri}: {e}") from None
            return read_weights_source(local)
    file = os.path.join(source, STATE_FILE) if os.path.isdir(source) else source
    if not os.path.isfile(file):
        raise CheckpointError(f"checkpoint not found: {source}")
    return weights.read_state_dict(file) if file.endswith(".safetensors") else _torch_load(file)


# --------------------------------------------------------------------------- worker side: write, find, load
def report(metrics: dict[str, Any], state: TrainingState | None, epoch: int,
           files: dict[str, Callable[[str], None]] | None = None, retry_s: float = 60.0,
           updates: int | None = None, background: bool = False, last_good: str | None = None) -> None:
    """Report ``metrics``; with ``state``, rank 0 also writes a checkpoint ``epoch_NNNNNN`` beside them
    (``updates``: one taken inside the epoch, after that many of its updates: :func:`folder_name`).

    Every worker must call this the same number of times (it is a barrier in Ray Train).
    ``files`` maps file names to writers that put extra files in the checkpoint directory; ``retry_s``:
    how long an upload to object storage keeps trying (``storage.upload_retry_s``). ``background``: the
    checkpoint is written to local disk here, and copied to the run's storage by Ray Train's upload thread
    (one, so checkpoints arrive in order) while training goes on; it is visible only once whole, as ever
    (:func:`_upload`). An upload that fails for good then fails the run, with ``last_good`` named, at the next
    report (``upload.Background``); a checkpoint copied while training waits (a run's last) is written once every
    copy before it has finished.
    """
    rank, _ = launch.world()
    local = launch.in_process_run()
    if state is None or rank != 0:
        _report(metrics, local)
        return
    if local is None:  # a copy that failed in the background stops the run here, before anything more is written
        _BACKGROUND.check(wait_s=0.0 if background else WAIT_FOR_COPIES_S)
    tmp = tempfile.mkdtemp(prefix="mae_ray_ckpt_")
    try:
        torch.save(state, os.path.join(tmp, STATE_FILE))
        for name, write in (files or {}).items():
            write(os.path.join(tmp, name))
        name = folder_name(epoch, updates)
        if local is None and background:
            copy = functools.partial(_upload, retry_s=retry_s, last_good=last_good or "none", background=_BACKGROUND)
            _BACKGROUND.queued()
            try:
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name,
                                 checkpoint_upload_fn=copy, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                                 delete_local_checkpoint_after_upload=True)  # Ray removes tmp once copied
            except BaseException:
                _BACKGROUND.finished()  # not queued after all
                raise
            tmp = None
            return
        if local is None:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name,
                             checkpoint_upload_fn=functools.partial(_upload, retry_s=retry_s))
            return
        # in-process: the same copy (and pruning) as Ray Train's workers make, called here (``launch.InProcessRun``)
        local.checkpoint = _upload(Checkpoint.from_directory(tmp), name, retry_s)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _report(metrics, local)


def _report(metrics: dict[str, Any], local) -> None:
    if local is None:
        ray.train.report(metrics)
        return
    local.metrics = local.unsent = metrics  # to Tune once the epoch is logged (launch.forward_report)


def _run_storage() -> tuple[Any, str] | None:
    """(pyarrow filesystem, the run's folder) of the job running here; None outside a job."""
    local = launch.in_process_run()
    if local is not None:
        return local.fs, local.root
    try:
        ray_storage = ray.train.get_context().get_storage()
    except (NotImplementedError, RuntimeError):  # not in a Ray Train worker
        return None
    return ray_storage.storage_filesystem, ray_storage.experiment_fs_path


def _upload(checkpoint: Checkpoint, dir_name: str, retry_s: float = 60.0, last_good: str | None = None,
            background: Background | None = None) -> Checkpoint:
    """Ray's copy of a checkpoint to the run's storage, made safe (``upload.upload``: whole or invisible, with
    ``state.pt``, by which every reader recognises a checkpoint, written last). ``background``: a copy in Ray's
    upload thread, counted there; none is begun after one failed."""
    if background is None:
        fs, root = _run_storage()
        stored = upload(checkpoint, fs, root, dir_name, STATE_FILE, retry_s, last_good)
        _prune(fs)
        return stored
    error = None
    try:
        if background.failed is not None:
            raise CheckpointError(f"checkpoint {dir_name} not copied: an earlier copy failed ({background.failed})")
        return _upload(checkpoint, dir_name, retry_s, last_good)
    except BaseException as e:
        error = e
        raise
    finally:
        background.finished(error)


def _prune(fs) -> None:
    """Keep the run's ``KEEP`` newest checkpoints, once a new one is whole: every run, Ray Train's (whose own
    ``num_to_keep`` is off) and in-process ones, by this one rule and the one order (:func:`age`)."""
    stored = sorted((c.path for c in _stored_checkpoints()), key=age)
    for old in stored[:-KEEP]:
        with contextlib.suppress(OSError):
            fs.delete_dir(old)


# rank 0's copies in Ray's background upload thread (one Ray Train worker process per rank and attempt)
_BACKGROUND = Background()
# how long the run's last checkpoint waits for the copies before it (each is bounded by storage.upload_retry_s)
WAIT_FOR_COPIES_S = 3600.0


def checkpoint_location(epoch: int, updates: int | None = None) -> str:
    """Where the checkpoint of ``epoch`` (``updates``: inside it) is (or would be) stored, for messages."""
    name = folder_name(epoch, updates)
    where = _run_storage()
    return address(where[0], f"{where[1]}/{name}") if where else name


def latest_checkpoint(explicit: str | None = None) -> tuple[TrainingState | None, str | None]:
    """The newest loadable training state and where it came from, or (None, None) for a fresh start.

    Ray 2.60 registers checkpoints asynchronously: a worker killed just after writing one can come
    back with ``get_checkpoint()`` naming the previous one, and resuming from that would run an epoch
    twice. So the run's storage folder is also listed, and the highest ``epoch_*`` state that loads
    wins. ``explicit`` (``--resume-from``) is used only when the run has no checkpoint of its own.
    """
    candidates = _stored_checkpoints()
    registered = None if launch.in_process_run() else ray.train.get_checkpoint()
    if registered is not None:
        candidates.append(registered)
    for ckpt in sorted(candidates, key=lambda c: age(c.path), reverse=True):
        try:
            return load_state(ckpt), location(ckpt)
        except CheckpointError as e:
            log.warning("skipping unreadable checkpoint %s: %s", ckpt.path, e)
    if explicit:
        return load_state(explicit), explicit
    return None, None


def newest_checkpoint_dir(folder: str) -> str:
    """The newest ``epoch_*`` folder with a state file under a run folder (local or ``s3://``), or 'none'."""
    found = checkpoint_folders(folder)
    return found[-1] if found else "none"


def checkpoint_folders(folder: str, with_state: bool = True) -> list[str]:
    """The ``epoch_*`` folders under a run folder (local or ``s3://``), oldest first; with ``with_state``
    only those holding a state file."""
    if storage.is_object_uri(folder):  # a bucket has no folders: the objects under the run's prefix
        prefix, has_state = folder.rstrip("/"), {}
        for uri in storage.list_files(prefix + "/", recursive=True):
            name, _, rest = uri[len(prefix) + 1:].partition("/")
            if name.startswith(CHECKPOINT_PREFIX):
                has_state[name] = has_state.get(name, False) or rest == STATE_FILE
        return [f"{prefix}/{n}" for n in sorted(has_state, key=age) if has_state[n] or not with_state]
    if "://" in folder or not os.path.isdir(folder):
        return []
    return [os.path.join(folder, p) for p in sorted(os.listdir(folder), key=age) if p.startswith(CHECKPOINT_PREFIX)
            and (not with_state or os.path.isfile(os.path.join(folder, p, STATE_FILE)))]


def newest_stored() -> Checkpoint | None:
    """The newest checkpoint of the run in this process: what Ray Train's result names when a resumed run had
    nothing left to train (a finished run resumed)."""
    stored = sorted(_stored_checkpoints(), key=lambda c: age(c.path))
    return stored[-1] if stored else None


def _stored_checkpoints() -> list[Checkpoint]:
    where = _run_storage()
    if where is None:
        return []

    fs, root = where
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:
        return []
    return [
        Checkpoint(path=info.path, filesystem=fs)
        for info in infos
        if info.type == pafs.FileType.Directory and os.path.basename(info.path).startswith(CHECKPOINT_PREFIX)
    ]


def load_state(source: Checkpoint | str) -> TrainingState:
    """Read a training state with ``weights_only=True`` from a Ray checkpoint, a local directory/file, or a
    checkpoint folder / state file in a bucket (``s3://``)."""
    if isinstance(source, str) and storage.is_object_uri(source):
        uri = source.rstrip("/")
        uri = uri if uri.endswith(".pt") else f"{uri}/{STATE_FILE}"
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise CheckpointError(f"no checkpoint at {uri}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {uri}: {e}") from None
        return _torch_load(io.BytesIO(data), uri)
    if isinstance(source, str):
        source = os.path.join(source, STATE_FILE) if os.path.isdir(source) else source
        if not os.path.isfile(source):
            raise CheckpointError(f"no checkpoint at {source}")
        return _torch_load(source)
    with source.as_directory() as path:
        file = os.path.join(path, STATE_FILE)
        if not os.path.isfile(file):
            raise CheckpointError(f"{source.path} has no {STATE_FILE}")
        return _torch_load(file)


def _torch_load(file, name: str | None = None) -> TrainingState:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(weights.unreadable_checkpoint(name or file, e)) from None
