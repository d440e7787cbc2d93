"""Pre-training across two Ray nodes (both on this machine, 1 CPU each): the two workers cannot share a
node, so DDP really runs between nodes, each reading the shards from its own node's filesystem."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from _helpers import S3Server, local_cluster
from mlflow import MlflowClient

from mae_ray.config import load_config
from mae_ray.jobs import pretrain

pytestmark = pytest.mark.ray






@pytest.fixture(scope="module")
def s3():
    """The module's S3 server, started before the cluster so that both nodes' processes have its endpoint and
    (dummy) credentials in their environment, as real nodes would have theirs."""
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def two_nodes(s3):
    """A head and a second node with 1 CPU each; the driver (this process) connected to the head."""
    with local_cluster(1, 1) as cluster:
        yield cluster


def test_two_workers_on_two_nodes_train_and_checkpoint(two_nodes, demo_data, tmp_path, capfd):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    cfg = load_config(None, [
        "model.name=mae_vit_micro_patch4", "model.img_size=32",
        f"data.train_shards={demo_data['train']}", f"data.val_shards={demo_data['val']}",
        "data.num_workers=0", "data.samples_per_epoch=128", "data.shuffle_buffer=100",
        "train.batch_size=32", "train.epochs=2", "train.lr=2e-3", "train.warmup_epochs=1",
        "train.checkpoint_every=1", "train.visualize_every=0",
        "ray.num_workers=2", "ray.cpus_per_worker=1",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment=multinode",
        f"output_dir={tmp_path}/run",
    ])
    summary = pretrain.run(cfg)
    assert ray.is_initialized()  # run() joined the cluster it found and left it up

    # the job finished and checkpointed
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == summary
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == "epoch_000001"
    assert {"state.pt", "encoder.pth", "encoder.safetensors", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    assert summary["metrics"]["epoch"] == 1 and math.isfinite(summary["metrics"]["train_loss"])

    # both workers read data: the metrics are reduced over the two ranks (DDP would hang if one rank
    # ran out of batches), none of the samples either rank read was skipped, the loss stays finite
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["ray.num_workers"] == "2"
    for key in ("train_loss", "data/skipped", "images_per_s"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in history] == [0, 1], key
        assert all(math.isfinite(v) for _, v in history), key
        if key == "data/skipped":
            assert all(v == 0 for _, v in history)
    out = capfd.readouterr().out
    line = "[pretrain] 2 worker(s) x batch 32 x accumulation 1 = effective batch 64, 2 batches/epoch"
    assert line in out, out[-3000:]

    # ...on two different nodes: Ray's actor table (GCS; kept for dead actors) says where each
    # Train worker ran. (ray.util.state.list_actors would say the same but needs a dashboard.)
    from ray._private import state

    workers = [a for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]
    assert len(workers) == 2, [a["ActorClassName"] for a in state.actors().values()]
    assert {a["Address"]["NodeID"] for a in workers} == {n["NodeID"] for n in nodes}


def test_two_nodes_share_nothing_but_the_bucket_and_a_killed_worker_resumes_from_it(
        s3, two_nodes, demo_data, tmp_path, monkeypatch):
    from mae_ray.cluster.checkpoints import checkpoint_folders, load_state

    train, val = (s3.upload(Path(demo_data[split]).parent, f"multinode/{split}") for split in ("train", "val"))
    runs = f"s3://{s3.bucket}/multinode/runs"
    monkeypatch.setenv("MAE_RAY_FAULTS", "kill:rank=1:mid_epoch=1")  # SIGKILL rank 1 half-way through epoch 1
    cfg = load_config(None, [
        "model.name=mae_vit_micro_patch4", "model.img_size=32", f"data.train_shards={train}/",
        f"data.val_shards={val}/", "data.num_workers=0", "data.samples_per_epoch=128", "data.shuffle_buffer=100",
        "train.batch_size=32", "train.epochs=2", "train.lr=2e-3", "train.warmup_epochs=1",
        "train.checkpoint_every=1", "train.visualize_every=0", "ray.num_workers=2", "ray.cpus_per_worker=1",
        f"ray.storage_path={runs}", "ray.failure_max_retries=1", f"storage.endpoint_url={s3.endpoint}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment=multinode-s3",
        f"output_dir={tmp_path}/run",
    ])
    summary = pretrain.run(cfg)
    assert (tmp_path / "run" / ".fault-kill-mid_epoch-1-1").exists()  # the kill really happened
    assert summary["checkpoint"] == f"{runs}/run/epoch_000001"
    assert checkpoint_folders(f"{runs}/run") == [f"{runs}/run/epoch_000000", f"{runs}/run/epoch_000001"]
    attempts = load_state(summary["checkpoint"])["attempts"]
    assert attempts == [{"start_epoch": 0, "resumed_from": "", "workers": 2},  # the restarted group read epoch 0
                        {"start_epoch": 1, "resumed_from": f"{runs}/run/epoch_000000", "workers": 2}], attempts
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(summary["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in history) == [0, 1]  # nothing lost, nothing twice
    local = [p for p in tmp_path.rglob("*") if p.suffix in (".tar", ".pt", ".pth", ".safetensors")]
    assert not local, f"written to local disk: {local}"  # checkpoints (and the shards read): the bucket only
