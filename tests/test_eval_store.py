"""Evaluating a checkpoint whose pre-training run is in another MLflow store, or in none (issue 14).

The checkpoint records its pre-training run id (``mlflow_run_id`` in state.pt); the evaluation must
not make a run of another store its parent nor log to it, must name where the encoder came from, and
must end normally with result.json.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from mlflow import MlflowClient

from mae_ray import tracking
from mae_ray.config import load_config
from mae_ray.jobs import linprobe
from mae_ray.jobs.encoders import resolve_encoder
from mae_ray.model.mae import build_model

MICRO = "mae_vit_micro_patch4"


def checkpoint_from_other_store(tmp_path, demo):
    """A mae-ray checkpoint directory (checkpoints.load_state's format: config, model, mlflow_run_id) whose
    pre-training run lives in the sqlite store ``other.db``, not in the one the evaluation uses."""
    other = f"sqlite:///{tmp_path}/other.db"
    pre_cfg = load_config(None, [f"model.name={MICRO}", f"data.train_shards={demo['train']}",
                                 f"mlflow.tracking_uri={other}", f"output_dir={tmp_path}/pre"])
    run_id = tracking.start_run(other, "pre", "pretrain-elsewhere", {})
    torch.manual_seed(0)
    folder = tmp_path / "copied" / "epoch_000002"
    folder.mkdir(parents=True)
    torch.save({"config": pre_cfg.to_yaml(), "model": build_model(MICRO).state_dict(), "mlflow_run_id": run_id,
                "epoch": 2}, folder / "state.pt")
    return str(folder), other, run_id


def eval_config(demo, tmp_path, checkpoint, uri):
    return load_config(None, [
        f"model.name={MICRO}", f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
        "data.num_workers=0", "linprobe.epochs=2", "linprobe.batch_size=64", "linprobe.warmup_epochs=1",
        "linprobe.cache_features=true", "ray.num_workers=1", "ray.cpus_per_worker=1",
        f"mlflow.tracking_uri={uri}", "mlflow.experiment=eval", f"eval.checkpoint={checkpoint}",
        f"output_dir={tmp_path}/lp",
    ])


def test_a_parent_run_of_another_store_is_named_not_used(tmp_path, demo_data):
    """In-process: the run id is kept as the origin, the parent dropped; a run of this store stays parent."""
    ckpt, other, run_id = checkpoint_from_other_store(tmp_path, demo_data)
    here = f"sqlite:///{tmp_path}/here.db"
    source = resolve_encoder(ckpt, eval_config(demo_data, tmp_path, ckpt, here), here)
    assert source.parent_run_id is None and source.origin_run_id == run_id
    assert source.tags() == {"mae_ray.encoder_source": ckpt, "mae_ray.encoder_run_id": run_id}
    same = resolve_encoder(ckpt, eval_config(demo_data, tmp_path, ckpt, other), other)
    assert same.parent_run_id == run_id == same.origin_run_id


def test_encoder_source_tag_is_redacted():
    from mae_ray.jobs.encoders import EncoderSource

    s = EncoderSource(None, {}, None, "https://user:pw@host/ckpt/state.pt?X-Amz-Signature=abc")
    assert s.tags() == {"mae_ray.encoder_source": "https://***@host/ckpt/state.pt?X-Amz-Signature=***"}


@pytest.mark.ray
def test_linear_probe_of_a_checkpoint_from_another_store_ends_with_its_result(local_ray, demo_data, tmp_path):
    ckpt, other, run_id = checkpoint_from_other_store(tmp_path, demo_data)
    here = f"sqlite:///{tmp_path}/here.db"
    cfg = eval_config(demo_data, tmp_path, ckpt, here)
    summary = linprobe.run(cfg)

    result = os.path.join(cfg.output_dir, "result.json")
    assert os.path.isfile(result)
    with open(result) as f:
        assert json.load(f)["linprobe_top1"] == pytest.approx(summary["linprobe_top1"])
    assert summary["parent_run_id"] is None and summary["encoder_run_id"] == run_id
    run = MlflowClient(here).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in run.data.tags
    assert run.data.tags["mae_ray.encoder_source"] == ckpt
    assert run.data.tags["mae_ray.encoder_run_id"] == run_id
    assert run.data.metrics["linprobe_top1"] == pytest.approx(summary["linprobe_top1"])
    # the other store's run is left as it was: nothing logged there from this store's evaluation
    assert "linprobe_top1" not in MlflowClient(other).get_run(run_id).data.metrics
