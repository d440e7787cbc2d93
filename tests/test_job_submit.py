"""Pre-training sent to a real ``ray start`` head through Ray's job API, as the README documents.

The module starts its own head (``ray start --head --block`` as a child process, every port chosen
free, its own ``--temp-dir``, token authentication with a token of its own), submits tiny jobs with
the ``ray job submit`` CLI and with ``JobSubmissionClient``, and stops the head by its pid at the end,
failing loudly if any process of that head survives.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from _helpers import processes_mentioning, reserve_ports
from mlflow import MlflowClient

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's python, ray; the package is installed there (editable)
RAY = str(BIN / "ray")
JOB_TIMEOUT_S = 240
PLANTED = "planted-submit-pass-3b9d"
# Ports `ray start` would otherwise take at fixed defaults (6379, 8265, 10001, 52365, ...) or at random.
PORT_FLAGS = (
    "--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
    "--node-manager-port", "--object-manager-port",
)


@dataclass
class Head:
    url: str  # the dashboard, where the job API lives
    token: str
    env: dict[str, str]  # what a shell on this machine needs to talk to the head (RAY_AUTH_*)
    temp_dir: str
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.url, headers=self.headers)




def _group_members(pgid: int) -> dict[int, str]:
    """pid -> command line of every process in process group ``pgid``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
            found[int(entry)] = cmdline.strip()
    return found


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> list[str]:
    """Stop the head we started, by pid; returns what had to be killed by force (empty: clean stop)."""
    forced = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` then stops its gcs, raylet, dashboard, ...
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            forced.append(f"ray start pid {proc.pid} ignored SIGTERM for 60 s")
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
            proc.wait(timeout=30)
    deadline = time.time() + 20  # workers notice a dead raylet within seconds
    while (left := {**processes_mentioning(temp_dir), **_group_members(proc.pid)}) and time.time() < deadline:
        time.sleep(0.5)
    for pid, cmdline in left.items():
        forced.append(f"pid {pid} outlived the head: {cmdline[:200]}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return forced


@pytest.fixture(scope="module")
def head():
    """A real head bound to 127.0.0.1 with token auth, on 2 CPUs, stopped (and checked gone) afterwards."""
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")  # short: Ray's unix socket paths live under it
    held = reserve_ports(len(PORT_FLAGS))  # held until the head is gone: no other process is handed them
    ports = {flag: r.port for flag, r in zip(PORT_FLAGS, held, strict=True)}
    token = secrets.token_hex(32)
    # The token goes in the environment, never in ~/.ray/auth_token: this head does not depend on,
    # or change, whatever token file the machine has (`ray start` turns on token auth when one exists,
    # and `ray job submit` then needs RAY_AUTH_MODE=token; here both are explicit).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
               RAY_DEDUP_LOGS="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")  # as with the venv activated
    log = Path(temp_dir) / "head.out"
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--include-dashboard", "true", "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    h = Head(url=f"http://127.0.0.1:{ports['--dashboard-port']}", token=token, env=env, temp_dir=temp_dir, log=log)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                h.client().list_jobs()
                break
            except Exception as e:  # noqa: BLE001 - not up yet
                if time.time() > deadline:
                    pytest.fail(f"the job API at {h.url} did not answer in 120 s ({e}):\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield h
    finally:
        forced = _stop_head(proc, temp_dir)
        for r in held:
            r.release()
        time.sleep(1)
        left = {**processes_mentioning(temp_dir), **_group_members(proc.pid)}
        shutil.rmtree(temp_dir, ignore_errors=True)
        if forced or left or proc.poll() is None:
            pytest.fail("the test's Ray head did not stop cleanly:\n" + "\n".join(forced)
                        + "".join(f"\nstill running: pid {pid} {cmd[:200]}" for pid, cmd in left.items()))


def _overrides(demo, tmp_path: Path) -> list[str]:
    return [
        "model.name=mae_vit_micro_patch4", "model.img_size=32",
        f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
        "data.num_workers=0", "data.samples_per_epoch=128", "data.shuffle_buffer=100",
        "train.batch_size=32", "train.epochs=2", "train.lr=2e-3", "train.warmup_epochs=1",
        "train.checkpoint_every=1", "train.visualize_every=0",
        "ray.num_workers=1", "ray.cpus_per_worker=1",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment=submitted",
        f"output_dir={tmp_path}/run",
    ]


def _wait_for(client, job_id: str) -> str:
    from ray.job_submission import JobStatus

    deadline = time.time() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.time() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {JOB_TIMEOUT_S} s:\n{client.get_job_logs(job_id)[-4000:]}")
        time.sleep(2)
    return status


def _check_outputs(tmp_path: Path) -> dict:
    """result.json, the checkpoint it names, and the MLflow run: FINISHED, one train_loss per epoch."""
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["metrics"]["epoch"] == 1
    ckpt = Path(result["checkpoint"])
    assert ckpt.name == "epoch_000001" and ckpt.is_relative_to(tmp_path / "run")
    assert {"state.pt", "encoder.pth", "encoder.safetensors", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mae_vit_micro_patch4"
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert [s for s, _ in losses] == [0, 1]
    assert all(v == v and 0 < v < 10 for _, v in losses)  # finite
    assert "encoder/encoder.pth" in {a.path for a in client.list_artifacts(run.info.run_id, "encoder")}
    exp = client.get_experiment_by_name("submitted")
    assert len(client.search_runs([exp.experiment_id])) == 1
    return result


def _assert_ran_on_head(head: Head, tags: dict[str, str], entrypoint: str) -> str:
    """The MLflow run's ``ray.submission_id`` tag names a job of *this* head that SUCCEEDED running
    ``entrypoint``, and its ``ray.job_id`` is the Ray job the head gave that submission's driver."""
    from ray.job_submission import JobStatus

    submission_id = tags.get("ray.submission_id")
    assert submission_id, f"no ray.submission_id tag on the run: {sorted(tags)}"
    client = head.client()
    jobs = {job.submission_id: job for job in client.list_jobs()}
    assert submission_id in jobs, f"{submission_id} is not in the head's job list {sorted(jobs, key=str)}"
    job = jobs[submission_id]
    assert job.status == JobStatus.SUCCEEDED and client.get_job_status(submission_id) == JobStatus.SUCCEEDED
    assert entrypoint in job.entrypoint, job.entrypoint
    assert tags.get("ray.job_id") == job.job_id, (tags.get("ray.job_id"), job.job_id)
    return submission_id


def test_head_refuses_the_job_api_without_the_token(head):
    for path in ("/api/version", "/api/jobs/"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(head.url + path, timeout=30)
        assert err.value.code == 401, path


def test_documented_cli_submit_with_working_dir(head, demo_data, tmp_path):
    """The README's command, literally: `ray job submit --address URL --working-dir . -- python -m ...`
    from the repository root, with no excludes: Ray 2.60 leaves `.git/` and `.venv/` (GBs) behind by
    default (RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES) and honours the repository's .gitignore
    (`mlruns/`, `outputs/`, `data/`; RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 would undo that). The relative
    --config path resolves only inside the uploaded copy, the job's working directory."""
    cmd = [RAY, "job", "submit", "--address", head.url, "--working-dir", ".", "--",
           "python", "-m", "mae_ray", "pretrain", "--config", "mae_ray/shipped/configs/demo_cpu.yaml"]
    for item in _overrides(demo_data, tmp_path):
        cmd += ["--set", item]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    assert "[pretrain] epoch 2/2 " in out and "[pretrain] done: 2 epochs" in out, out[-4000:]
    assert "Uploading package" in out or "already exists" in out, out[-4000:]  # a working_dir went up
    result = _check_outputs(tmp_path)
    # the config file came from the uploaded copy: its values that no --set overrode are in the run
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result["mlflow_run_id"])
    assert run.data.params["model.norm_pix_loss"] == "True" and run.data.params["model.mask_ratio"] == "0.75"
    # it ran as a job of this head: the id the CLI printed is the run's tag, SUCCEEDED in the head's list
    submission_id = _assert_ran_on_head(head, run.data.tags, "python -m mae_ray pretrain --config")
    assert f"Job '{submission_id}' succeeded" in out, out[-4000:]
    print(f"cli job: {time.time() - t0:.1f}s")


def test_python_client_submit_with_explicit_excludes(head, demo_data, tmp_path):
    """JobSubmissionClient with the venv's python by absolute path and a working_dir with explicit excludes."""
    from ray.job_submission import JobStatus

    client = head.client()
    # a credential on the command line (an S3 endpoint these local shards never use): what Ray keeps of the
    # job, beyond the entrypoint the user typed, and what mae-ray logs and records must not show it
    planted = [f"storage.endpoint_url=http://s3-user:{PLANTED}@127.0.0.1:9"]
    entrypoint = shlex.join([sys.executable, "-m", "mae_ray", "pretrain",
                             *(a for item in _overrides(demo_data, tmp_path) + planted for a in ("--set", item))])
    t0 = time.time()
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(REPO),
                     "excludes": [".git", ".venv", ".venv-ci", "mlruns", "mlartifacts", "outputs", "data"]},
    )
    status = _wait_for(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert "[pretrain] done: 2 epochs" in logs, logs[-4000:]
    info = client.get_job_info(job_id)
    assert info.runtime_env["working_dir"].startswith("gcs://")  # uploaded to the head, not a local path
    result = _check_outputs(tmp_path)
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(result["mlflow_run_id"])
    assert _assert_ran_on_head(head, run.data.tags, "-m mae_ray pretrain --set") == job_id
    assert run.data.params["storage.endpoint_url"] == "http://***@127.0.0.1:9"  # recorded, redacted
    assert "storage.endpoint_url=http://***@127.0.0.1:9" in run.data.tags["mae_ray.env.command"]
    kept = info.model_dump(mode="json") if hasattr(info, "model_dump") else info.__dict__
    kept = json.dumps({k: v for k, v in kept.items() if k != "entrypoint"}, default=str)
    assert PLANTED in info.entrypoint  # the user's own text, as Ray keeps it (and echoes at the top of the logs)
    ours = "\n".join(ln for ln in logs.splitlines() if "Running entrypoint for job" not in ln)  # Ray echoes it
    for where, text in (("job logs", ours), ("Ray's job record", kept), ("MLflow params", json.dumps(run.data.params)),
                        ("MLflow tags", json.dumps(run.data.tags)), ("result.json", json.dumps(result))):
        assert PLANTED not in text, where
    print(f"python client job: {time.time() - t0:.1f}s")


def test_sweep_submitted_to_the_head_succeeds(head, demo_data, tmp_path):
    """`python -m mae_ray sweep` as a submitted job: it joins the head, each trial trains and is evaluated."""
    import pyarrow.parquet as pq
    import yaml
    from ray.job_submission import JobStatus

    base = {"model": {"name": "mae_vit_micro_patch4"},
            "data": {"train_shards": demo_data["train"], "val_shards": demo_data["val"], "num_workers": 0,
                     "samples_per_epoch": 128, "shuffle_buffer": 100},
            "train": {"epochs": 2, "batch_size": 32, "lr": 2e-3, "warmup_epochs": 0, "knn_every": 1},
            "eval": {"knn_train_samples": 200, "knn_val_samples": 100},
            "linprobe": {"epochs": 1, "batch_size": 64, "blr": 5, "warmup_epochs": 0, "cache_features": True},
            "ray": {"num_workers": 1, "cpus_per_worker": 0.8},
            "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "submitted-sweep"}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": "base.yaml", "name": "job", "search": {"model.mask_ratio": {"grid": [0.75]}},
             "max_concurrent_trials": 1, "scheduler": {"type": "none"}, "finetune": False,
             "random_baseline": False, "output_dir": str(tmp_path / "sweeps")}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    client = head.client()
    job_id = client.submit_job(entrypoint=shlex.join([sys.executable, "-m", "mae_ray", "sweep", "--config",
                                                      str(tmp_path / "sweep.yaml")]))
    status = _wait_for(client, job_id)
    assert status == JobStatus.SUCCEEDED, client.get_job_logs(job_id)[-4000:]
    [row] = pq.read_table(tmp_path / "sweeps" / "job" / "sweep_results.parquet").to_pylist()
    assert row["status"] == "finished" and 0 <= row["linprobe_top1"] <= 100
    mlflow = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    child = mlflow.get_run(row["mlflow_run_id"])
    assert child.info.status == "FINISHED" and "mlflow.parentRunId" in child.data.tags
    parent = mlflow.get_run(child.data.tags["mlflow.parentRunId"])  # the sweep's run, made by the job's driver
    assert _assert_ran_on_head(head, parent.data.tags, "-m mae_ray sweep --config") == job_id
