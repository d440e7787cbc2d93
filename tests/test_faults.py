"""The fault matrix: what must hold after each fault a long run meets (real Ray, real MLflow, real disks).

The sweep driver killed and resumed is in test_sweep.py; a worker killed right after a checkpoint and a
non-finite loss are in test_pretrain.py; a pre-training worker killed mid-epoch, restarted from an older
checkpoint with the re-run epoch counted, is in test_resume.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _helpers import MlflowServer, tiny_config
from mlflow import MlflowClient

from mae_ray import tracking
from mae_ray.cluster.checkpoints import load_state
from mae_ray.errors import CheckpointError
from mae_ray.jobs import finetune, pretrain

pytestmark = pytest.mark.ray


def steps(uri: str, run_id: str, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def checkpoint_epochs(storage: Path) -> list[int]:
    """The epochs in the newest checkpoint's history: what a resumed run believes it has done."""
    newest = sorted(p for p in storage.iterdir() if p.name.startswith("epoch_"))[-1]
    return [int(row["epoch"]) for row in load_state(str(newest))["history"]]


# ---------------------------------------------------------------------------- storage full
FILL_DISK = r"""
set -u
mount -t tmpfs -o size=64m mae-ray-test "$MNT" || exit 90
"$PY" -m mae_ray pretrain --config "$CFG" >"$KEEP/stdout" 2>"$KEEP/stderr" &
job=$!
until ls "$MNT"/run/ray/*/epoch_000000/state.pt >/dev/null 2>&1; do
    kill -0 $job 2>/dev/null || break
    sleep 0.2
done
if [ "$BREAK" = full ]; then
    dd if=/dev/zero of="$MNT/filler" bs=1M >/dev/null 2>&1  # stops when the disk is full
else
    mount -o remount,ro "$MNT" || exit 91
fi
wait $job
echo $? >"$KEEP/rc"
cp -r "$MNT/run" "$KEEP/run"
"""


def can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs mount privileges to make a real full disk (tmpfs)")
@pytest.mark.parametrize("fault, errno_text", [("full", "No space left on device"), ("ro", "Read-only file system")])
def test_full_or_read_only_storage_is_one_clear_error_and_the_last_checkpoint_stays_valid(
    demo_data, tmp_path, fault, errno_text
):
    # output_dir on a 64 MB tmpfs in a private mount namespace; once epoch 0's checkpoint is stored the
    # disk is filled (or remounted read-only), so epoch 1's checkpoint cannot be written. MLflow's sqlite
    # file stays off it.
    mnt, keep = tmp_path / "disk", tmp_path / "keep"
    mnt.mkdir(), keep.mkdir()
    # a full disk under a Ray Train worker, its copies made in Ray's background upload thread (a failed one stops
    # the run at the next checkpoint, before anything more is written: upload.Background); a read-only one
    # under a job in this process (ray.num_workers=0): one Ray Train start less, and the in-process copy's error
    workers = 1 if fault == "full" else 0
    cfg = tiny_config(demo_data, tmp_path, f"output_dir={mnt}/run", f"ray.num_workers={workers}",
                      "ray.failure_max_retries=1", "train.epochs=4")
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    env = {**os.environ, "MNT": str(mnt), "KEEP": str(keep), "PY": sys.executable, "CFG": str(tmp_path / "cfg.yaml"),
           "BREAK": fault}
    subprocess.run(["unshare", "-m", "sh", "-c", FILL_DISK], env=env, timeout=400, check=True)

    stderr = (keep / "stderr").read_text().strip().splitlines()
    assert (keep / "rc").read_text().strip() == "2", stderr[-5:]
    line = stderr[-1]  # above it: Ray's log of the worker's exception, once per attempt
    # the worker's copy of epoch 1's checkpoint fails, or Ray's controller's own write to storage does
    assert line.startswith("error: pre-training failed: cannot write"), line
    assert errno_text in line and line.endswith("epoch_000000")  # names the last good one
    storage = keep / "run" / "ray" / "run"
    assert sorted(p.name for p in storage.iterdir() if "epoch_" in p.name) == ["epoch_000000"]  # no .tmp- left
    assert load_state(str(storage / "epoch_000000"))["epoch"] == 0  # still whole and loadable
    assert not (keep / "run" / "result.json").exists()
    assert only_run(f"sqlite:///{tmp_path}/mlflow.db", "test").info.status == "FAILED"


# ---------------------------------------------------------------------------- killed mid-epoch
# One worker, killed half-way through an epoch. The restarted worker must continue from the newest checkpoint
# (its ``attempts`` record says where) and end with the bits of the same job never interrupted, run here in
# this process (ray.num_workers=0): the same bits as one Ray Train worker, measured for both jobs (weights,
# optimiser, per-epoch loss), and seconds instead of another Ray Train run. Training is deterministic, so the
# bits alone would also hold for a restart from scratch; the attempts and the kept history tell them apart.
def uninterrupted(job, cfg) -> dict:
    """``job`` run in this process with the CPU threads a 1-CPU Ray worker has (Ray sets OMP_NUM_THREADS=1;
    pre-training pins its own, fine-tuning does not): float sums in the same order, so the same bits."""
    assert cfg.ray.num_workers == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(int(cfg.ray.cpus_per_worker))
    try:
        return job.run(cfg)
    finally:
        torch.set_num_threads(threads)


def tensors(tree, path: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a (nested) state dict, by path."""
    if isinstance(tree, torch.Tensor):
        return {path: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else ()
    return {k: v for key, sub in items for k, v in tensors(sub, f"{path}/{key}").items()}


def computed(history: list[dict]) -> list[dict]:
    """Per-epoch metrics but the timings: what exact resume reproduces."""
    return [{k: v for k, v in row.items() if k not in tracking.TIMED_METRICS} for row in history]


def assert_resumed_bit_identically(killed: dict, reference: dict, uri: str, resumed_at: int) -> dict:
    """The killed run's last checkpoint: a second attempt that began at ``resumed_at`` from the checkpoint
    before it, and the uninterrupted run's bits (state and per-epoch metrics); each epoch once in MLflow."""
    final, ref = load_state(killed["checkpoint"]), load_state(reference["checkpoint"])
    assert final["attempts"][0] == {"start_epoch": 0, "start_update": 0, "resumed_from": "", "workers": 1}
    assert [a["start_epoch"] for a in final["attempts"]] == [0, resumed_at], final["attempts"]
    assert final["attempts"][1]["resumed_from"].rstrip("/").endswith(f"epoch_{resumed_at - 1:06d}")
    for part in ("model", "optimizer", "scheduler", "scaler"):
        mine, theirs = tensors(final[part]), tensors(ref[part])
        assert mine.keys() == theirs.keys(), part
        differ = [k for k in mine if not torch.equal(mine[k], theirs[k])]
        assert not differ, f"{part}: {len(differ)} tensors differ from the uninterrupted run's, e.g. {differ[:3]}"
    assert computed(final["history"]) == computed(ref["history"])
    losses = MlflowClient(uri).get_metric_history(killed["mlflow_run_id"], "train_loss")
    assert sorted((m.step, m.value) for m in losses) == [(h["epoch"], h["train_loss"]) for h in ref["history"]]
    return final


def test_finetuning_worker_killed_mid_epoch_resumes_from_the_last_checkpoint(
    local_ray, demo_data, tmp_path, monkeypatch
):
    # drop path, mixup/cutmix, RandAugment and random erasing all draw random numbers: each restarted epoch
    # must draw what the uninterrupted run drew (the fixed-group and --resume-from cases: test_resume.py)
    def config(tmp, *extra):
        return tiny_config(demo_data, tmp, "eval.checkpoint=random", "finetune.epochs=2", "finetune.batch_size=32",
                           "finetune.warmup_epochs=0", "finetune.drop_path=0.1", "finetune.mixup=0.8",
                           "finetune.cutmix=1.0", "data.samples_per_epoch=128", "ray.num_workers=1",
                           "mlflow.run_name=ft", *extra)

    monkeypatch.setenv("MAE_RAY_FAULTS", "kill:rank=0:mid_epoch=1")
    killed = finetune.run(config(tmp_path / "kill", "ray.failure_max_retries=2"))
    monkeypatch.delenv("MAE_RAY_FAULTS")
    assert (tmp_path / "kill" / "run" / ".fault-kill-mid_epoch-1-0").exists()
    uri = f"sqlite:///{tmp_path}/kill/mlflow.db"
    reference = uninterrupted(finetune, config(tmp_path / "ref", "ray.num_workers=0"))
    final = assert_resumed_bit_identically(killed, reference, uri, 1)
    # epoch 0's record is the first attempt's: the throughput MLflow holds (logged before the kill) is the
    # checkpoint's, not a second measurement
    [logged] = [m.value for m in MlflowClient(uri).get_metric_history(killed["mlflow_run_id"], "images_per_s")
                if m.step == 0]
    assert final["history"][0]["images_per_s"] == logged
    assert steps(uri, killed["mlflow_run_id"], "val_top1") == [0, 1]
    assert only_run(uri, "test").info.status == "FINISHED"
    # the reported accuracy is the last epoch's, measured by the restarted worker: the uninterrupted run's
    last = max(MlflowClient(uri).get_metric_history(killed["mlflow_run_id"], "val_top1"), key=lambda m: m.step)
    assert killed["finetune_top1"] == pytest.approx(last.value)
    assert killed["finetune_top1"] == reference["finetune_top1"]


# ---------------------------------------------------------------------------- MLflow outage
def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if time.time() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.1)


SECRET = "planted-outage-pass-77c1"  # in the tracking URI: MLflow quotes it in every connection error


def test_mlflow_server_down_for_two_epochs_loses_nothing(local_ray, demo_data, tmp_path, capfd):
    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    uri = server.uri.replace("http://", f"http://user:{SECRET}@")  # the server ignores it; MLflow sends it
    cfg = tiny_config(demo_data, tmp_path, f"mlflow.tracking_uri={uri}", "ray.num_workers=1", "train.epochs=6")
    storage = tmp_path / "run" / "ray" / "run"
    outage: dict[str, float] = {}

    def take_server_down():  # from epoch 0's checkpoint until epoch 2's: epochs 1 and 2 log into the void
        wait_for(storage / "epoch_000000")
        server.stop()
        outage["down"] = time.time() * 1000
        wait_for(storage / "epoch_000002")
        outage["up"] = time.time() * 1000
        server.start()

    thread = threading.Thread(target=take_server_down, daemon=True)
    thread.start()
    try:
        summary = pretrain.run(cfg)  # must not crash while the server is away
        thread.join(timeout=120)
        assert set(outage) == {"down", "up"}
        history = MlflowClient(uri).get_metric_history(summary["mlflow_run_id"], "train_loss")
        assert sorted(m.step for m in history) == [0, 1, 2, 3, 4, 5]  # every epoch, once
        stamp = {m.step: m.timestamp for m in history}
        assert outage["down"] <= stamp[1] <= outage["up"]  # measured while down, delivered later
        assert MlflowClient(uri).get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    finally:
        server.stop()
    state = load_state(summary["checkpoint"])  # the checkpoint is intact
    assert state["epoch"] == 5 and [int(r["epoch"]) for r in state["history"]] == list(range(6))
    console = "".join(capfd.readouterr())  # the driver's, and the worker's lines Ray forwarded
    assert "MLflow logging failed" in console and SECRET not in console


def test_mlflow_down_at_the_very_end_still_leaves_result_json_and_a_resume_completes_the_record(
        local_ray, demo_data, tmp_path, monkeypatch, capfd):
    """The server stops just before the run's last MLflow call: result.json is written all the same, the
    missing call is a warning (console and result.json, redacted); a resume of the finished run trains
    nothing, marks it FINISHED, and a second resume is a no-op that leaves it FINISHED."""
    from mae_ray.jobs import lifecycle

    (tmp_path / "mlflow").mkdir()
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    uri = server.uri.replace("http://", f"http://user:{SECRET}@")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the outage is known at once, not after minutes
    cfg = tiny_config(demo_data, tmp_path, f"mlflow.tracking_uri={uri}", "ray.num_workers=0", "data.num_workers=0",
                      "train.epochs=2")
    write_result = lifecycle.write_result

    def write_then_stop_the_server(output_dir, summary):
        path = write_result(output_dir, summary)
        server.stop()  # right after the report, before the run's last MLflow calls
        return path

    try:
        monkeypatch.setattr(lifecycle, "write_result", write_then_stop_the_server)
        summary = pretrain.run(cfg)
        monkeypatch.setattr(lifecycle, "write_result", write_result)
        console = "".join(capfd.readouterr())
        result = (tmp_path / "run" / "result.json").read_text()
        assert summary["mlflow_incomplete"] == [f"MLflow run {summary['mlflow_run_id']} not marked FINISHED "
                                                f"({summary['mlflow_incomplete'][0].split('(', 1)[1]}"]
        assert "[mlflow] warning: MLflow run" in console and "mlflow_incomplete" in result
        assert SECRET not in console and SECRET not in result
        server.start()
        client = MlflowClient(server.uri)
        assert client.get_run(summary["mlflow_run_id"]).info.status == "RUNNING"
        history = steps(server.uri, summary["mlflow_run_id"])
        for _ in range(2):  # the first completes the record, the second finds nothing to do
            again = pretrain.run(cfg, resume_from=summary["checkpoint"])
            assert again["mlflow_run_id"] == summary["mlflow_run_id"] and "mlflow_incomplete" not in again
            assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
            assert steps(server.uri, summary["mlflow_run_id"]) == history == [0, 1]  # no epoch trained again
            assert load_state(again["checkpoint"])["history"] == load_state(summary["checkpoint"])["history"]
    finally:
        server.stop()


def test_a_half_written_checkpoint_is_never_taken_for_a_whole_one(tmp_path):
    (tmp_path / "epoch_000003").mkdir()
    (tmp_path / "epoch_000003" / "state.pt").write_bytes(b"PK\x03\x04 cut off")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state(str(tmp_path / "epoch_000003"))
