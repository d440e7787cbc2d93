"""MLflow plumbing: tracking URI resolution, one run per training run, exactly-once epoch metrics.

Uses ``MlflowClient`` with explicit run ids (no fluent "active run" state), so the driver can create
the run before Ray starts and rank 0 of every (re)started worker group can continue the same run.
A tracking server that is down does not stop training: failed metric batches are kept and retried
with the next epoch's, and reported if they are still pending at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlparse

import ray
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag

from mae_ray import provenance
from mae_ray.redaction import redact  # the one redaction (re-exported: tracking.redact)

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow 3's own default store, in the working directory
_PARAM_MAX = 6000  # MLflow's limit on a param value's length
NOT_PRETRAINED = "n/a: random init"  # a random-init evaluation's pre-training params (reproduce skips them)
# keys whose last part ends like these never become params (mask_token_in_encoder does not: it ends in "encoder")
_SECRET_KEY = re.compile(r"(password|passwd|secret|token|api_key|access_key|secret_key|credentials?)$", re.I)


def resolve_tracking_uri(uri: str | None = None, cwd: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else sqlite ``mlflow.db`` in the cwd — always absolute.

    Ray runs workers (and ``ray job submit`` jobs) in other working directories, where a relative
    ``sqlite:///mlflow.db`` would silently create a second, empty store.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    cwd = cwd or os.getcwd()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return "sqlite:///" + (path if os.path.isabs(path) else os.path.join(cwd, path))
    if uri.startswith("file:"):
        path = urlparse(uri).path
        return "file://" + (path if os.path.isabs(path) else os.path.join(cwd, path))
    if "://" not in uri and not uri.startswith("databricks"):
        return "file://" + os.path.abspath(os.path.join(cwd, uri))
    return uri


def params_from_config(flat: Mapping[str, Any]) -> dict[str, str]:
    """MLflow params: the flattened config, secrets kept out, values clipped to MLflow's limit. Not
    ``mlflow.run_name``: it is the run's own name (a sweep trial's id), and as a param it would lead every
    comparison of trials, whose differing params the MLflow UI shows first."""
    out = {}
    for key, value in flat.items():
        if key == "mlflow.run_name" or (_SECRET_KEY.search(key.rsplit(".", 1)[-1]) and key != "mlflow.tracking_uri"):
            continue
        out[key] = str(redact(value))[:_PARAM_MAX]
    return out


def _ray_submission_id() -> str | None:
    """The submission id of the ``ray job submit`` job this driver runs as, if any.

    Ray 2.x sets no ``RAY_JOB_SUBMISSION_ID``: the job supervisor hands the driver its job config
    (with ``metadata.job_submission_id``) in ``RAY_JOB_CONFIG_JSON_ENV_VAR``.
    """

    try:
        metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}
        return metadata.get("job_submission_id") or None
    except (ValueError, AttributeError):
        return None


def run_tags() -> dict[str, str]:
    """Ray job submission id (under ``ray job submit``), Ray job id (under Ray), git commit (in a checkout), and
    what produced the run (``provenance``: versions, hardware, command line, uncommitted changes)."""

    tags = {}
    submission = os.environ.get("RAY_JOB_SUBMISSION_ID") or _ray_submission_id()
    if submission:
        tags["ray.submission_id"] = submission
    try:

        if ray.is_initialized():
            tags["ray.job_id"] = ray.get_runtime_context().get_job_id()
    except Exception:  # tags are a courtesy; never fail a run over one
        pass
    env = provenance.environment()
    if "git_commit" in env:
        tags["mlflow.source.git.commit"] = env["git_commit"]
    tags.update({f"{ENV_TAG}{k}": redact(v)[:5000] for k, v in env.items()})
    return tags


ENV_TAG = "mae_ray.env."


def start_run(
    tracking_uri: str,
    experiment: str,
    run_name: str | None,
    params: Mapping[str, str],
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run (a child of ``parent_run_id`` if given) with its params; returns its id."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
        client.log_batch(run.info.run_id, params=items[i : i + 100])
    if all_tags.get(f"{ENV_TAG}git_dirty") == "true":  # the code that ran is not the commit alone

        client.log_text(run.info.run_id, redact(provenance.git_diff()), DIFF_ARTIFACT)
    return run.info.run_id


DIFF_ARTIFACT = "provenance/git_diff.patch"


def log_datasets(tracking_uri: str, run_id: str, shard_sets: Mapping[str, tuple[str, dict]]) -> None:
    """MLflow's own dataset tracking (the UI's Dataset column): each shard set, ``{context: (spec, lineage)}``
    with ``context`` e.g. ``training`` and ``lineage`` from ``data.shards.lineage``, as a dataset named by its
    folder, with that digest, its source (credentials redacted) and its counts as the profile."""

    class ShardSet(MetaDataset):
        def __init__(self, profile: dict, **kw):
            super().__init__(**kw)
            self._profile = profile

        @property
        def profile(self):
            return self._profile

        def to_dict(self) -> dict[str, str]:  # MetaDataset leaves the profile out of what MLflow stores
            return {**super().to_dict(), "profile": json.dumps(self._profile)}

    inputs = []
    for context, (spec, info) in shard_sets.items():
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local-file sources alike
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(redact(spec))
        dataset = ShardSet({k: info[k] for k in ("num_shards", "num_samples")}, source=source, name=info["name"],
                           digest=info["digest"])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)]))
    if inputs:
        MlflowClient(tracking_uri).log_inputs(run_id, datasets=inputs)


def run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether ``run_id`` is a run of this tracking store (a checkpoint may name a run of another store)."""
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except Exception:  # MlflowException (no such run, malformed id) or an unreachable store
        return False
    return True


def log_values(tracking_uri: str, run_id: str, metrics: Mapping[str, float]) -> None:
    """Final results (e.g. ``linprobe_top1``) on a run; a later evaluation adds the next step."""
    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    steps = {k: len(client.get_metric_history(run_id, k)) for k in metrics}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, steps[k]) for k, v in metrics.items()])


def share_runs_view(tracking_uri: str, experiment_id: str, key: str, name: str, search_filter: str,
                    params: Iterable[str], metrics: Iterable[str], order_by: str | None = None) -> str:
    """A runs table the MLflow UI opens with these columns already shown: returns its path (after the UI's
    address). The table's column choice is the UI's own state (the browser's, not the store's); the UI saves
    a view ("Views" -> "Save as new view", or "Share") as the experiment tag ``mlflow.sharedViewState.<key>``
    (a JSON envelope: name, times, the state as a JSON string) and opens it with ``?viewStateShareKey=<key>``:
    the same is written here, so the view is also listed under the experiment's "Views" as ``name``. (The
    key must be read on the runs tab: ``#/experiments/<id>?viewStateShareKey=`` loses it in a redirect.)"""
    client = MlflowClient(tracking_uri)

    def column(kind: str, key: str) -> str:  # the UI's canonical column key
        return f"{kind}.`{key}`"

    state = {"searchFilter": search_filter, "orderByAsc": False,
             "selectedColumns": [column("params", p) for p in params] + [column("metrics", m) for m in metrics]}
    if order_by:
        state["orderByKey"] = column("metrics", order_by)
    now = int(time.time() * 1000)
    view = {"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)}
    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(view))
    return f"#/experiments/{experiment_id}/runs?viewStateShareKey={key}"


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    """Mark the run ended. MLflow then prints "View run ... at: <tracking URI>/#/..." (to an HTTP server):
    printed here with the URI's credentials redacted."""

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            MlflowClient(tracking_uri).set_terminated(run_id, status=status)
    finally:
        sys.stdout.write(redact(printed.getvalue()))


def log_values_or_warn(tracking_uri: str, run_id: str, metrics: Mapping[str, float]) -> str | None:
    """:func:`log_values` at the end of a job, where an MLflow outage must not cost the job its report:
    MLflow's client has retried; what still failed is printed as one warning line and returned."""
    try:
        log_values(tracking_uri, run_id, metrics)
    except Exception as e:
        return _warn(f"{', '.join(metrics)} not recorded in MLflow run {run_id} ({_first_line(e)})")
    return None


def end_run_or_warn(tracking_uri: str, run_id: str, status: str) -> str | None:
    """:func:`end_run`, with an outage a warning as in :func:`log_values_or_warn` (the run stays RUNNING)."""
    try:
        end_run(tracking_uri, run_id, status)
    except Exception as e:
        return _warn(f"MLflow run {run_id} not marked {status} ({_first_line(e)})")
    return None


def _warn(text: str) -> str:
    line = redact(f"{text}; the job's result.json has its results")
    print(f"[mlflow] warning: {line}", flush=True)
    return line


# Measured, not computed: a re-run of an epoch (after a restart) gives them new values by nature. Every
# other per-epoch metric is a function of (checkpoint, seed, epoch): exact resume reproduces it bit for bit.
TIMED_METRICS = frozenset({"images_per_s", "epoch_time_s", "data_wait_frac", "mfu", "rss_mb", "checkpoint_s",
                           "cpu_hours", "gpu_hours", "cost"})
RERUN_METRIC = "epochs_rerun"  # how many epochs this run trained again after a restart (a running count)
MISMATCH_METRIC = "epochs_rerun_mismatched"  # epochs logged again with other values (timings aside): a count
MISMATCH_TAG = "mae_ray.rerun_mismatch.epoch_"  # + the epoch: what differed


class EpochLogger:
    """Logs per-epoch metrics to one run with step = epoch, each epoch exactly once.

    On (re)start it reads which epochs the run already holds, so a worker group restarted from a
    checkpoint neither duplicates an epoch nor loses one (``backfill`` logs epochs that the
    checkpoint's history has but MLflow missed).

    An epoch logged again is checked, never dropped unseen. Trained again (a group restarted from a
    checkpoint older than its last logged epoch): counted in ``epochs_rerun``, with a line. Its values
    that are not timings must equal the logged ones (exact resume); where they do not, a warning line,
    ``epochs_rerun_mismatched`` and a tag naming the epoch and the values. Not an error: the run's state
    is the checkpoint's either way, and a GPU's non-deterministic kernels (or another GPU model after
    a restart on another node) can break bit-exactness without making the run wrong; a days-long run
    is not to be killed over that, only marked. MLflow keeps the first values logged.
    """

    def __init__(self, tracking_uri: str, run_id: str, key: str = "train_loss"):
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.pending: list[Metric] = []
        self.logged = {m.step for m in self._history(key)}
        self._values: dict[str, dict[int, float]] = {}  # key -> epoch -> value logged, read when first needed
        self._totals: dict[str, float] = {}  # the running counts, read when first needed

    def _history(self, key: str) -> list[Metric]:
        try:
            return self.client.get_metric_history(self.run_id, key)
        except Exception as e:  # server down: assume nothing logged; duplicates are rejected below anyway
            log.warning("MLflow unreachable while reading history (%s); continuing", _first_line(e))
            return []

    def _logged(self, key: str) -> dict[int, float]:
        """epoch -> the value of ``key`` MLflow holds (read once; an unreachable server is asked again later)."""
        if key not in self._values:
            try:
                self._values[key] = {m.step: m.value for m in self.client.get_metric_history(self.run_id, key)}
            except Exception as e:
                log.warning("MLflow unreachable: %s not compared with the logged value (%s)", key, _first_line(e))
                return {}
        return self._values[key]

    def backfill(self, history: Iterable[Mapping[str, float]]) -> None:
        """The checkpoint's history: epochs MLflow lacks are logged; the others are the same measurements
        (checked, not counted as re-runs)."""
        for row in history:
            self.log_epoch(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"}, rerun=False)

    def log_epoch(self, epoch: int, metrics: Mapping[str, float], *, rerun: bool = True) -> None:
        """Log ``epoch``; one already logged is compared instead (``rerun``: it was trained again)."""
        if epoch in self.logged:
            self._again(epoch, metrics, rerun)
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
        self.logged.add(epoch)
        for k, v in metrics.items():  # what a later log of this epoch is compared with
            self._values.get(k, {})[epoch] = float(v)
        self.flush()

    def _again(self, epoch: int, metrics: Mapping[str, float], rerun: bool) -> None:
        differ = {}
        for k, v in metrics.items():
            old = self._logged(k).get(epoch)
            if k not in TIMED_METRICS and old is not None and not _same(old, float(v)):
                differ[k] = (old, float(v))
        # trained again by a group of another size (an elastic resize): other ranks drew other samples, so
        # its values differ by design; MLflow keeps the first ones, and that is no reproduction failure
        resized = differ.pop("workers", None) is not None
        if rerun:
            self._count(RERUN_METRIC, epoch)
            log.warning("epoch %d trained again after a restart (already in MLflow run %s): %s", epoch,
                        self.run_id, "on a group of another size" if resized else
                        "values differ" if differ else "same values, timings aside")
        if differ and not resized:
            shown = "; ".join(f"{k}: logged {a!r}, now {b!r}" for k, (a, b) in differ.items())
            log.warning("epoch %d %s does not reproduce the values MLflow holds (kept): %s", epoch,
                        "trained again" if rerun else "in the checkpoint", shown)
            self._count(MISMATCH_METRIC, epoch)
            self.set_tags({f"{MISMATCH_TAG}{epoch}": shown[:5000]})

    def _count(self, key: str, epoch: int) -> None:
        """One more in the running count ``key`` (over every attempt of the run), logged at step ``epoch``."""
        if key not in self._totals:
            self._totals[key] = max((m.value for m in self._history(key)), default=0.0)
        self._totals[key] += 1
        self.pending.append(Metric(key, self._totals[key], int(time.time() * 1000), epoch))
        self.flush()

    def flush(self) -> bool:
        """Send what is pending; on failure keep it for the next call. True when nothing is left."""
        if not self.pending:
            return True
        try:
            for i in range(0, len(self.pending), 1000):
                self.client.log_batch(self.run_id, metrics=self.pending[i : i + 1000])
        except Exception as e:
            log.warning("MLflow logging failed (%s); %d values kept for retry", _first_line(e), len(self.pending))
            return False
        self.pending = []
        return True

    def set_tags(self, tags: Mapping[str, str]) -> None:
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as e:
            log.warning("MLflow tags not logged (%s)", _first_line(e))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        try:
            self.client.log_artifact(self.run_id, path, artifact_path)
        except Exception as e:
            log.warning("MLflow artifact %s not logged (%s)", path, _first_line(e))


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN logged and NaN again: reproduced


def _first_line(e: BaseException) -> str:
    """An MLflow error in one line, redacted: MLflow quotes the whole URL, ``user:password`` included."""
    text = str(e).strip()
    return redact(text.splitlines()[0]) if text else type(e).__name__
