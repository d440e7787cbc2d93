"""No secret leaves the jobs. Credentials planted in the environment, in the shard URLs (which need them:
the shards are served only with them) and in the MLflow URL; a one-trial sweep (pre-training, then the
trial's linear probe) and an ``evaluate`` of the trial's MLflow run (linear probe and fine-tuning), on
Ray, against a real ``mlflow server``; then everything they stored is read back and searched.

The failure paths (a shard server that refuses, wrong S3 credentials, MLflow down mid-run and at the
end, the CLI's own error lines) are in test_untrusted.py and test_faults.py; a ``ray job submit`` job
in test_job_submit.py.

Searched: every MLflow run's name, params, tags and metric keys, every artifact (downloaded; zip members
of torch files and parquet tables decoded too), the server's own stores, every file and file name the
jobs wrote (checkpoints, ``result.json``, the sweep folder, Tune's experiment state and trial files),
the console (the driver's and, via Ray's session folder, every Ray process's and worker's) and Ray's
metadata of the jobs (job and actor tables, Ray Train's run records).

One exception, by design: ``<output_dir>/config.yaml``, the job's own copy of the config the user gave
(local, never logged or uploaded), keeps the URLs as typed; the test pins exactly which files those are.
"""

from __future__ import annotations

import base64
import gzip
import json
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from _helpers import AuthShardServer, MlflowServer
from mlflow import MlflowClient
from mlflow.entities import ViewType

from mae_ray import tracking
from mae_ray.config import load_config
from mae_ray.jobs import evaluate
from mae_ray.jobs import sweep as sweeps
from mae_ray.jobs.sweep_config import load_sweep

pytestmark = pytest.mark.ray

ENV_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAPLANTEDENV0001",
    "AWS_SECRET_ACCESS_KEY": "planted-aws-secret-wJalrXUtnFEMI",
    "AWS_SESSION_TOKEN": "planted-aws-session-token-77",
    "MLFLOW_TRACKING_PASSWORD": "planted-mlflow-env-pass",
    "MLFLOW_TRACKING_TOKEN": "planted-mlflow-bearer-42",
    "HF_TOKEN": "hf_plantedHuggingFaceToken",
}
SHARD_USER, SHARD_PASS = "shard-user", "planted-shard-pass"
TRAIN_TOKEN = "planted-train-token-9f8e"
VAL_CREDENTIAL, VAL_SIGNATURE = "AKIAPLANTEDURL0002", "planted-signature-0123abcd"
AXIS_TOKEN = "planted-sweep-axis-token"  # in a value the sweep searches over
MLFLOW_USER, MLFLOW_PASS = "mlflow-user", "planted-mlflow-url-pass"


def _b64(pair: str) -> str:
    return base64.b64encode(pair.encode()).decode()


# every secret, and the forms they travel in (HTTP basic auth headers)
SECRETS = [*ENV_SECRETS.values(), SHARD_PASS, TRAIN_TOKEN, VAL_CREDENTIAL, VAL_SIGNATURE, AXIS_TOKEN, MLFLOW_PASS,
           _b64(f"{SHARD_USER}:{SHARD_PASS}"), _b64(f"{MLFLOW_USER}:{MLFLOW_PASS}")]


@pytest.mark.parametrize("url, shown", [
    ("https://alice:s3cr3t-pass@mlflow.example.org", "https://***@mlflow.example.org"),
    ("https://h/train-{0..3}.tar?X-Amz-Credential=AKIAEXAMPLEKEY&X-Amz-Signature=sig-0123456789abcdef&n=1",
     "https://h/train-{0..3}.tar?X-Amz-Credential=***&X-Amz-Signature=***&n=1"),
    ("https://h/val.tar?token=bearer-tok-42", "https://h/val.tar?token=***"),
    ("pipe:curl -s https://u:s3cr3t-pass@h/x.tar", "pipe:curl -s https://***@h/x.tar"),
    ("/data/shards/train-{000000..000009}.tar", "/data/shards/train-{000000..000009}.tar"),
])
def test_urls_lose_their_credentials(url, shown):
    assert tracking.redact(url) == shown


# --------------------------------------------------------------------------- the jobs, run once
class _Tee:
    """sys.stdout / sys.stderr that also keeps what is written (the driver's prints, MLflow's, and the
    workers' lines Ray forwards to the driver)."""

    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text):
        self.parts.append(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


@pytest.fixture(scope="module")
def planted():
    """The environment of the whole module, Ray's processes included (they are started after this)."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in ENV_SECRETS.items():
            mp.setenv(key, value)
        mp.setenv("MLFLOW_TRACKING_USERNAME", "mlflow-env-user")
        mp.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")  # Ray Train keeps run records (the dashboard's Train view)
        yield mp


@pytest.fixture(scope="module")
def mlflow_server(planted, tmp_path_factory):
    """A real ``mlflow server``, starting (in a thread) while Ray starts."""
    import threading

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    starting = threading.Thread(target=server.start, daemon=True)
    starting.start()
    yield server, starting
    starting.join()
    server.stop()


@pytest.fixture(scope="module")
def local_ray(planted, mlflow_server, local_ray):  # the conftest's Ray, started once the secrets are planted
    return local_ray


@pytest.fixture(scope="module")
def ran(planted, mlflow_server, local_ray, demo_data, tmp_path_factory):
    """A one-trial sweep (pre-training + linear probe, each a Ray Train run), then a linear probe and a
    fine-tuning of the trial's MLflow run (in this process: one Train start-up less per job)."""
    import ray

    root = tmp_path_factory.mktemp("secrets")
    server, starting = mlflow_server
    starting.join()
    if server.proc is None:
        raise RuntimeError("mlflow server did not start")
    shards = AuthShardServer(Path(demo_data["train_dir"]).parent, SHARD_USER, SHARD_PASS,
                             [("token", TRAIN_TOKEN), ("token", AXIS_TOKEN), ("X-Amz-Signature", VAL_SIGNATURE)])
    base = f"http://{SHARD_USER}:{SHARD_PASS}@127.0.0.1:{shards.port}"
    train = f"{base}/train/{Path(demo_data['train']).name}?token={TRAIN_TOKEN}"
    val = f"{base}/val/{Path(demo_data['val']).name}?X-Amz-Credential={VAL_CREDENTIAL}&X-Amz-Signature={VAL_SIGNATURE}"
    axis_val = f"{base}/val/{Path(demo_data['val']).name}?token={AXIS_TOKEN}"
    out, inputs = root / "out", root / "inputs"  # inputs: what the user wrote, the only place secrets stay
    inputs.mkdir()
    tee_out, tee_err = _Tee(sys.stdout), _Tee(sys.stderr)
    try:
        uri = server.uri.replace("http://", f"http://{MLFLOW_USER}:{MLFLOW_PASS}@")
        sys.stdout, sys.stderr = tee_out, tee_err
        (inputs / "base.yaml").write_text(yaml.safe_dump({
            "model": {"name": "mae_vit_micro_patch4", "img_size": 32},
            "data": {"train_shards": train, "val_shards": val, "num_classes": 10, "num_workers": 1,
                     "samples_per_epoch": 64, "shuffle_buffer": 32},
            "train": {"epochs": 2, "batch_size": 16, "lr": 1e-3, "warmup_epochs": 0},
            "linprobe": {"epochs": 2, "batch_size": 64, "blr": 5, "warmup_epochs": 0, "cache_features": True},
            "ray": {"num_workers": 1, "cpus_per_worker": 0.8},
            "mlflow": {"tracking_uri": uri, "experiment": "secrets-sweep"},
        }))
        (inputs / "sweep.yaml").write_text(yaml.safe_dump({
            "base": "base.yaml", "name": "s", "output_dir": str(out / "sweeps"),
            "overrides": {"data": {"train_shards": train}, "mlflow": {"tracking_uri": uri}},
            "search": {"data.val_shards": {"grid": [axis_val]}},  # evaluated on a second signed copy
            "scheduler": {"type": "none"}, "finetune": False, "random_baseline": False,
            "max_concurrent_trials": 1, "trial_cpus": 0.2,
        }))
        sweep, sweep_base = load_sweep(str(inputs / "sweep.yaml"), [])
        report = sweeps.run(sweep, sweep_base, str(inputs / "sweep.yaml"))

        # the documented way to name the server: $MLFLOW_TRACKING_URI; the encoder comes from MLflow
        planted.setenv("MLFLOW_TRACKING_URI", uri)
        (trial,) = [r for r in report["rows"] if r["status"] == "finished"]
        probe = evaluate.run(load_config(inputs / "base.yaml", [
            "mlflow.tracking_uri=null", f"eval.checkpoint=runs:/{trial['mlflow_run_id']}",
            "mlflow.experiment=secrets", f"output_dir={out}/eval", "finetune.epochs=1", "finetune.batch_size=16",
            "finetune.warmup_epochs=0", "ray.num_workers=0"]))  # in this process: the trial's jobs were Train runs
    finally:
        sys.stdout, sys.stderr = tee_out.stream, tee_err.stream
        shards.stop()
    return {"out": out, "server": server, "client": MlflowClient(server.uri), "shards": shards, "probe": probe,
            "report": report, "console": "".join(tee_out.parts + tee_err.parts),
            "session_dir": ray._private.worker._global_node.get_session_dir_path()}


# --------------------------------------------------------------------------- searching
def _found(data: bytes | str) -> set[str]:
    text = data if isinstance(data, str) else data.decode("latin-1")
    return {s for s in SECRETS if s in text}


def _scan_file(path: Path) -> set[str]:
    """Secrets in a file: its bytes, and what compression hides (zip members, gzip, parquet columns)."""
    data = path.read_bytes()
    hits = _found(data)
    if zipfile.is_zipfile(path):  # torch .pt / .pth
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                hits |= _found(name) | _found(zf.read(name))
    if data[:2] == b"\x1f\x8b":
        hits |= _found(gzip.decompress(data))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        hits |= _found(json.dumps(pq.read_table(path).to_pylist(), default=str))
    return hits


def _scan_tree(folder: Path, skip=()) -> dict[str, set[str]]:
    """``relative path -> secrets`` for every file (and file name) under ``folder`` that holds any."""
    leaks = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        hits = _found(rel)
        if path.is_file() and path not in skip:
            hits |= _scan_file(path)
        if hits:
            leaks[rel] = hits
    return leaks


def _show(leaks: dict[str, set[str]]) -> str:
    return "secrets found:\n" + "\n".join(f"  {where}: {', '.join(sorted(hits))}" for where, hits in leaks.items())


def _config_copies(out: Path) -> list[Path]:
    """The jobs' own config.yaml (beside each job's result.json), the documented exception."""
    return sorted(p for p in out.rglob("config.yaml") if (p.parent / "result.json").exists())


# --------------------------------------------------------------------------- the checks
def test_jobs_used_the_secrets_and_finished(ran):
    """The credentials were real: the shards were served only with them, and every job got its results."""
    assert ran["shards"].served > 0 and ran["shards"].refused == 0
    (trial,) = [r for r in ran["report"]["rows"] if r["status"] == "finished"]
    client = ran["client"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], run_view_type=ViewType.ALL)
    # each result is the one its MLflow run recorded (the jobs really ran against the credentialed server)
    for job in ("linprobe", "finetune"):
        logged = client.get_run(ran["probe"][f"{job}_run_id"]).data.metrics[f"{job}_top1"]
        assert ran["probe"][f"{job}_top1"] == pytest.approx(logged)
    assert any(r.data.metrics.get("linprobe_top1") == pytest.approx(trial["linprobe_top1"]) for r in runs)
    # the sweep, its trial and the trial's probe; the probe and the fine-tuning of the trial's run
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}
    params = client.get_run(trial["mlflow_run_id"]).data.params
    assert params["data.train_shards"].startswith("http://***@127.0.0.1")  # still there, redacted
    assert params["data.val_shards"].endswith("?token=***") and trial["data.val_shards"] == params["data.val_shards"]
    assert ran["probe"]["parent_run_id"] == trial["mlflow_run_id"]  # its encoder came from MLflow


def test_nothing_secret_in_mlflow(ran, tmp_path):
    import mlflow

    leaks = {}
    client = ran["client"]
    for exp in client.search_experiments(view_type=ViewType.ALL):
        leaks[f"experiment {exp.name}"] = _found(json.dumps([exp.name, exp.artifact_location, exp.tags]))
        for run in client.search_runs([exp.experiment_id], run_view_type=ViewType.ALL):
            where = f"run {run.info.run_name} ({exp.name})"
            leaks[f"{where} name/info"] = _found(json.dumps(dict(run.info)))
            for kind, values in (("param", run.data.params), ("tag", run.data.tags), ("metric", run.data.metrics)):
                for key, value in values.items():
                    leaks[f"{where} {kind} {key}"] = _found(f"{key}={value}")
            dst = tmp_path / run.info.run_id
            mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="", dst_path=str(dst),
                                                tracking_uri=ran["server"].uri)
            for rel, hits in _scan_tree(dst).items():
                leaks[f"{where} artifact {rel}"] = hits
    # the server's own stores (the sqlite database and the artifact folder), as bytes
    for rel, hits in _scan_tree(ran["server"].root).items():
        leaks[f"mlflow server store {rel}"] = hits
    leaks = {k: v for k, v in leaks.items() if v}
    assert not leaks, _show(leaks)
    # what was read is what the jobs logged: the sweep's files and the encoder's config among them
    parent = ran["report"]["parent_run_id"]
    assert {a.path for a in client.list_artifacts(parent, "sweep")} == {"sweep/sweep.yaml", "sweep/base_config.yaml"}
    sweep_file = (tmp_path / parent / "sweep" / "sweep.yaml").read_text()
    assert "token=***" in sweep_file and "http://***@127.0.0.1" in sweep_file  # redacted, not dropped


def test_nothing_secret_in_the_files_the_jobs_wrote(ran):
    """Output folders, checkpoints, result.json, the sweep folder, Tune's state and trial files, names too."""
    out = ran["out"]
    copies = _config_copies(out)
    leaks = _scan_tree(out, skip=copies)
    assert not leaks, _show(leaks)
    # the exception: each job's own config.yaml, what the user gave, beside its result.json (and only there)
    (trial,) = [r["trial"] for r in ran["report"]["rows"] if r["status"] == "finished"]
    assert [str(p.relative_to(out)) for p in copies] == [
        "eval/finetune/config.yaml", "eval/linprobe/config.yaml", f"sweeps/s/trials/{trial}/config.yaml",
        f"sweeps/s/trials/{trial}/eval/linprobe/config.yaml"]
    assert all(TRAIN_TOKEN in p.read_text() for p in copies)


def test_nothing_secret_on_the_console(ran):
    """The driver's console (and what Ray forwarded from workers), and every file in Ray's session folder
    (the logs of every Ray process and worker, Tune's driver artifacts)."""
    console = ran["console"]
    assert "[pretrain] epoch 2/2" in console and "View run" in console  # the capture saw workers and MLflow
    lines = {f"console: {line.strip()[:300]}": _found(line) for line in console.splitlines() if _found(line)}
    assert not lines, _show(lines)
    session = _scan_tree(Path(ran["session_dir"]))
    assert not session, _show(session)


def test_nothing_secret_in_ray_job_metadata(ran):
    """What Ray keeps about the jobs: its job table and its actor table (runtime environments included:
    Ray Tune copies AWS_* credentials into its trial actors' unless told not to)."""
    import ray
    from ray.core.generated import gcs_pb2

    leaks = {}
    for job in ray._private.state.jobs():
        leaks[f"job {job['JobID']}"] = _found(json.dumps(job, default=str))
    actors = ray._private.state.state._connect_and_get_accessor().get_actor_table(None, None)
    assert any(b"PL_DISABLE_FORK" in raw for raw in actors)  # the trial's actor, with the runtime env Tune gave it
    for raw in actors:
        actor = gcs_pb2.ActorTableData.FromString(raw)
        leaks[f"actor {actor.class_name} {actor.actor_id.hex()}"] = _found(raw)
    leaks = {k: v for k, v in leaks.items() if v}
    assert not leaks, _show(leaks)


def test_nothing_secret_in_ray_train_run_records(ran):
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    runs = ray.get(get_state_actor().get_train_runs.remote())
    assert len(runs) == 2  # the trial's pre-training and linear probe (the evaluation of its run: in-process)
    leaks = {f"train run {run.name} ({run.id})": _found(run.model_dump_json()) for run in runs.values()}
    leaks = {k: v for k, v in leaks.items() if v}
    assert not leaks, _show(leaks)
