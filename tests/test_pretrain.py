"""Pre-training end to end on real Ray (one local instance for the module), real MLflow sqlite, demo shards."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from _helpers import tiny_config
from mlflow import MlflowClient

from mae_ray.errors import UserError
from mae_ray.jobs import pretrain

pytestmark = pytest.mark.ray


def history(uri, run_id, key):
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def test_two_workers_finish_loss_falls_and_mlflow_has_one_row_per_epoch(local_ray, demo_data, tmp_path):
    cfg = tiny_config(demo_data, tmp_path, "train.epochs=4", "train.knn_every=2", "eval.knn_train_samples=300",
                      "eval.knn_val_samples=100", "cost.per_cpu_hour=3")
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
    # what the 2 workers of 1 CPU held so far, every epoch: more than their epochs' training, less than the run's
    # wall time (which includes Ray Train's start), and its price at cost.per_cpu_hour
    held = history(uri, summary["mlflow_run_id"], "cpu_hours")
    assert [s for s, _ in held] == [0, 1, 2, 3] and all(a[1] < b[1] for a, b in zip(held, held[1:], strict=False))
    trained = sum(v for _, v in history(uri, summary["mlflow_run_id"], "epoch_time_s")) * 2 / 3600
    assert trained < held[-1][1] < summary["wall_time_s"] * 2 / 3600, (trained, held, summary["wall_time_s"])
    assert summary["metrics"]["cpu_hours"] == held[-1][1]
    cost = history(uri, summary["mlflow_run_id"], "cost")
    assert [c for _, c in cost] == pytest.approx([3 * h for _, h in held], rel=1e-9)

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

    from mae_ray.model.mae import MaskedAutoencoderViT
    from mae_ray.model.weights import timm_vit_kwargs

    state = torch.load(summary["encoder"], weights_only=True)["model"]
    vit = timm.create_model("vit_base_patch16_224", **timm_vit_kwargs(MaskedAutoencoderViT(**cfg.model.kwargs())))
    vit.load_state_dict(load_file(summary["encoder_safetensors"]))
    assert torch.equal(vit.state_dict()["blocks.1.attn.qkv.weight"], state["blocks.1.attn.qkv.weight"])


# Resume after a stop and the automatic retry after a killed worker: tests/test_resume.py (bit-identical).


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


def test_non_finite_loss_stops_the_run_naming_step_and_checkpoint(local_ray, demo_data, tmp_path, monkeypatch):
    # a weight set to NaN half-way through epoch 2, after epoch 1's checkpoint: the next loss is NaN
    monkeypatch.setenv("MAE_RAY_FAULTS", "nan:rank=0:mid_epoch=2")
    cfg = tiny_config(demo_data, tmp_path, "ray.num_workers=1", "train.epochs=4")
    with pytest.raises(UserError) as info:
        pretrain.run(cfg)
    assert (tmp_path / "run" / ".fault-nan-mid_epoch-2-0").exists()
    last_good = tmp_path / "run" / "ray" / "run" / "epoch_000001"
    assert str(info.value) == (f"pre-training failed: non-finite loss (nan) at epoch 2, batch 4, "
                               f"update 20; last good checkpoint: {last_good}")
    assert (last_good / "state.pt").is_file()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    [run] = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
