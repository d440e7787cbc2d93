"""Pre-training end to end on real Ray (one local instance for the module), real MLflow sqlite, demo shards."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from _helpers import tiny_config
from mlflow import MlflowClient

from mae_ray import pretrain
from mae_ray.errors import UserError

pytestmark = pytest.mark.ray


def history(uri, run_id, key):
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_two_workers_finish_loss_falls_and_mlflow_has_one_row_per_epoch(local_ray, demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path, "train.epochs=4", "train.knn_every=2", "eval.knn_train_samples=300",
                      "eval.knn_val_samples=100")
    summary = pretrain.run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    on_disk = json.loads((tmp_path / "run" / "result.json").read_text())
    assert on_disk == summary
    assert summary["metrics"]["epoch"] == 3
    losses = history(uri, summary["mlflow_run_id"], "train_loss")
    assert [s for s, _ in losses] == [0, 1, 2, 3]  # each epoch exactly once, step = epoch
    assert losses[-1][1] < losses[0][1] * 0.8
    for key in ("lr", "images_per_s", "epoch_time_s", "data/skipped"):
        assert [s for s, _ in history(uri, summary["mlflow_run_id"], key)] == [0, 1, 2, 3], key
    assert all(v == 0 for _, v in history(uri, summary["mlflow_run_id"], "data/skipped"))
    knn = history(uri, summary["mlflow_run_id"], "knn_top1")
    assert [s for s, _ in knn] == [1, 3] and all(0 <= v <= 100 for _, v in knn)
    assert summary["metrics"]["knn_top1"] == knn[-1][1]  # reported to Ray too (what Tune sees)

    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "mae_vit_micro_patch4" and run.data.params["ray.num_workers"] == "2"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "encoder")}
    assert {"encoder/encoder.pth", "encoder/encoder.safetensors", "encoder/config.yaml"} <= arts
    pics = client.list_artifacts(run.info.run_id, "reconstructions")
    assert [a.path for a in pics] == ["reconstructions/epoch_0004.png"]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # the exported encoder is the official layout and loads into timm's ViT
    import timm
    from safetensors.torch import load_file

    from mae_ray.models import MaskedAutoencoderViT
    from mae_ray.weights import timm_vit_kwargs

    state = torch.load(summary["encoder"], weights_only=True)["model"]
    vit = timm.create_model("vit_base_patch16_224", **timm_vit_kwargs(MaskedAutoencoderViT(**cfg.model.kwargs())))
    vit.load_state_dict(load_file(summary["encoder_safetensors"]))
    assert torch.equal(vit.state_dict()["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])


def test_killed_worker_restarts_from_checkpoint_without_losing_or_repeating_epochs(
    local_ray, demo_data, tmp_path, monkeypatch
):
    # SIGKILL rank 1 right after the epoch-0 checkpoint: the group restarts from it and finishes.
    monkeypatch.setenv("MAE_RAY_FAULTS", "kill:rank=1:after_report=0")
    cfg = tiny_config(demo_data, tmp_path, "ray.failure_max_retries=2")
    summary = pretrain.run(cfg)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert (tmp_path / "run" / ".fault-kill-after_report-0-1").exists()  # the kill really happened
    assert summary["metrics"]["epoch"] == 2
    assert [s for s, _ in history(uri, summary["mlflow_run_id"], "train_loss")] == [0, 1, 2]
    exp = MlflowClient(uri).get_experiment_by_name("test")
    assert len(MlflowClient(uri).search_runs([exp.experiment_id])) == 1


def test_resume_after_stop_continues_the_schedule(local_ray, demo_data, tmp_path, monkeypatch):
    full = pretrain.run(tiny_config(demo_data, tmp_path / "a", "ray.num_workers=1"))
    uri_a = f"sqlite:///{tmp_path}/a/mlflow.db"

    monkeypatch.setenv("MAE_RAY_FAULTS", "fail:rank=0:before_report=2")  # stops after epoch 1's checkpoint
    cfg = tiny_config(demo_data, tmp_path / "b", "ray.num_workers=1")
    with pytest.raises(UserError, match="injected failure at before_report=2"):
        pretrain.run(cfg)
    monkeypatch.delenv("MAE_RAY_FAULTS")
    uri_b = f"sqlite:///{tmp_path}/b/mlflow.db"
    [stopped] = MlflowClient(uri_b).search_runs([MlflowClient(uri_b).get_experiment_by_name("test").experiment_id])
    assert stopped.info.status == "FAILED"

    ckpts = sorted(p for p in (tmp_path / "b" / "run" / "ray" / "run").iterdir() if p.name.startswith("epoch_"))
    assert [p.name for p in ckpts] == ["epoch_000000", "epoch_000001"]
    cfg.output_dir = str(tmp_path / "b" / "resumed")
    resumed = pretrain.run(cfg, resume_from=str(ckpts[-1]))
    assert resumed["mlflow_run_id"] == stopped.info.run_id  # the same MLflow run continues
    lr_full = history(uri_a, full["mlflow_run_id"], "lr")
    lr_resumed = history(uri_b, resumed["mlflow_run_id"], "lr")
    assert [s for s, _ in lr_resumed] == [0, 1, 2]
    assert [v for _, v in lr_resumed] == pytest.approx([v for _, v in lr_full])  # schedule continues exactly
    assert MlflowClient(uri_b).get_run(resumed["mlflow_run_id"]).info.status == "FINISHED"


@pytest.mark.parametrize("extra, asked", [
    (["ray.num_workers=3"], r"asked for 3 worker\(s\) x 1 CPU, but the cluster has 2 CPU and 0 GPU"),
    (["ray.num_workers=1", "ray.cpus_per_worker=4"], r"asked for 1 worker\(s\) x 4 CPU, but the cluster has 2 CPU"),
    (["ray.num_workers=1", "ray.use_gpu=true"], r"asked for 1 worker\(s\) x 1 CPU \+ 1 GPU, but the cluster has 2 CPU "
                                                r"and 0 GPU"),
])
def test_more_workers_cpus_or_gpus_than_the_cluster_has_is_refused_at_once(local_ray, demo_data, tmp_path, extra,
                                                                            asked):
    start = time.time()
    with pytest.raises(UserError, match=asked):
        pretrain.run(tiny_config(demo_data, tmp_path, *extra))
    assert time.time() - start < 60  # Ray Train alone would wait for the resources forever
    assert not os.path.exists(tmp_path / "run")  # nothing written


def test_non_finite_loss_stops_the_run_naming_step_and_checkpoint(local_ray, demo_data, tmp_path):
    # an absurd lr blows the weights up within a few updates of epoch 1, after epoch 0's checkpoint
    cfg = tiny_config(demo_data, tmp_path, "ray.num_workers=1", "train.lr=1e12", "train.warmup_epochs=1")
    with pytest.raises(UserError) as info:
        pretrain.run(cfg)
    message = str(info.value)
    assert "non-finite loss" in message and "at epoch" in message and "last good checkpoint" in message
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
