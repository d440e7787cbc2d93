"""Evaluation: linear probe, fine-tune, exact distributed accuracy, MLflow parent/child rows."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from mae_ray import classify, engine, evaluate, finetune, linprobe, pretrain
from mae_ray.config import load_config
from mae_ray.models import build_model

MICRO = "mae_vit_micro_patch4"


# ----------------------------------------------------------------------------------- in-process
def test_linear_probe_recipe_separates_linearly_separable_features():
    from timm.optim import Lars

    torch.manual_seed(0)
    centers = torch.randn(5, 32) * 3
    y = torch.randint(0, 5, (2000,))
    x = centers[y] + torch.randn(2000, 32) * 0.5 + 10.0  # offset: the BN without affine must cope
    head = linprobe.LinearProbeHead(32, 5)
    data = linprobe.CachedFeatures(x, y, batch_size=100, rank=0, world=1, seed=0)
    plan = engine.StepPlan(len(data), 1, epochs=10, warmup_epochs=1)
    opt = Lars([{"params": [head.fc.weight], "always_adapt": True}, {"params": [head.fc.bias]}],
               lr=2.0, momentum=0.9, weight_decay=0.0)
    sched = engine.build_scheduler(opt, plan, 0.0)
    for epoch in range(10):
        data.set_epoch(epoch)
        classify.train_epoch(head, data, opt, sched, engine.Precision("none", torch.device("cpu")),
                             torch.nn.CrossEntropyLoss(), epoch=epoch, plan=plan, device=torch.device("cpu"))
    head.eval()
    scores = classify.evaluate(head, [(x[i : i + 500], y[i : i + 500]) for i in range(0, 2000, 500)], "cpu")
    assert scores["top1"] > 99.0 and scores["count"] == 2000


def test_partial_finetune_freezes_all_but_the_last_blocks_and_head():
    enc = build_model(MICRO)
    vit = finetune.build_classifier(enc, num_classes=10, drop_path=0.1)
    finetune.freeze_for_partial(vit, 0)
    assert {n for n, p in vit.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    vit = finetune.build_classifier(enc, num_classes=10, drop_path=0.1)
    finetune.freeze_for_partial(vit, 1)
    trainable = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
                 for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.1", "fc_norm", "head"}
    assert torch.equal(vit.blocks[0].attn.qkv.weight, enc.blocks[0].attn.qkv.weight)  # encoder weights loaded


# ----------------------------------------------------------------------------------- on Ray
def eval_config(demo, tmp_path, *extra):
    return load_config(None, [
        f"model.name={MICRO}", f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
        "data.num_workers=0", "data.samples_per_epoch=256", "data.shuffle_buffer=100",
        "train.epochs=1", "train.batch_size=32", "train.lr=1e-3", "train.warmup_epochs=0",
        "linprobe.epochs=3", "linprobe.batch_size=64", "linprobe.blr=5", "linprobe.warmup_epochs=1",
        "linprobe.cache_features=true",
        "finetune.epochs=1", "finetune.batch_size=32", "finetune.warmup_epochs=0",
        "ray.num_workers=2", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment=eval",
        f"output_dir={tmp_path}/out", *extra,
    ])


@pytest.fixture(scope="module")
def pretrained(local_ray, demo_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pre")
    summary = pretrain.run(eval_config(demo_data, tmp, "output_dir=" + str(tmp / "pre")))
    return tmp, summary


@pytest.mark.ray
def test_distributed_eval_equals_single_process(local_ray, demo_data, tmp_path):
    """A fixed classifier evaluated by 2 Ray workers over the exact-once loader == one process."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mae_ray.data import make_eval_loader

    def scores(rank, world):
        torch.manual_seed(0)
        model = build_model(MICRO).eval()
        head = torch.nn.Linear(64, 10)
        loader = make_eval_loader(demo_data["val"], batch_size=64, img_size=32, rank=rank, world_size=world,
                                  num_workers=0)
        return classify.evaluate(lambda x: head(model.forward_features(x)[:, 0]), loader, torch.device("cpu"))

    def worker():
        ctx = ray.train.get_context()
        result = scores(ctx.get_world_rank(), ctx.get_world_size())
        with tempfile.TemporaryDirectory() as tmp:  # Train V2 keeps metrics only of reports with a checkpoint
            ray.train.report(result, checkpoint=Checkpoint.from_directory(tmp) if ctx.get_world_rank() == 0 else None)

    result = TorchTrainer(worker, scaling_config=ScalingConfig(num_workers=2),
                          run_config=RunConfig(storage_path=str(tmp_path), name="eval")).fit()
    single = scores(0, 1)
    assert single["count"] == 300 and result.metrics["count"] == 300
    assert result.metrics["top1"] == pytest.approx(single["top1"]) and result.metrics["top5"] == pytest.approx(
        single["top5"])


@pytest.mark.ray
def test_evaluate_puts_both_accuracies_on_the_pretraining_run(pretrained, demo_data):
    tmp, pre = pretrained
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = eval_config(demo_data, tmp, f"eval.checkpoint=runs:/{pre['mlflow_run_id']}", f"output_dir={tmp}/ev")
    summary = evaluate.run(cfg)
    assert 0 <= summary["linprobe_top1"] <= 100 and 0 <= summary["finetune_top1"] <= 100
    client = MlflowClient(uri)
    parent = client.get_run(pre["mlflow_run_id"]).data.metrics
    assert parent["linprobe_top1"] == pytest.approx(summary["linprobe_top1"])
    assert parent["finetune_top1"] == pytest.approx(summary["finetune_top1"])
    for job in ("linprobe", "finetune"):
        child = client.get_run(summary[f"{job}_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == pre["mlflow_run_id"]
        assert child.data.tags["mae_ray.job"] == job
        assert child.data.params[f"{job}.epochs"] in ("3", "1")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_top1")]
        assert steps == list(range(cfg.linprobe.epochs if job == "linprobe" else cfg.finetune.epochs))


@pytest.mark.ray
def test_augmented_linear_probe_the_papers_protocol(pretrained, demo_data):
    # RandomResizedCrop + flip on every epoch (uint8 batches, normalised in the job), not cached features
    tmp, pre = pretrained
    cfg = eval_config(demo_data, tmp, f"eval.checkpoint={pre['checkpoint']}", "linprobe.cache_features=false",
                      "linprobe.epochs=2", f"output_dir={tmp}/lp-aug")
    summary = linprobe.run(cfg)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    losses = client.get_metric_history(summary["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in losses) == [0, 1]
    assert client.get_run(summary["mlflow_run_id"]).data.params["linprobe.cache_features"] == "False"
    assert summary["linprobe_top1"] == pytest.approx(
        client.get_run(summary["mlflow_run_id"]).data.metrics["linprobe_top1"])
    head = torch.load(f"{summary['checkpoint']}/head.pt", weights_only=True)
    assert head["fc.weight"].abs().max() > 0.02  # learnt (init std 0.01)


@pytest.mark.ray
def test_head_only_finetune_leaves_the_encoder_unchanged(pretrained, demo_data):
    tmp, pre = pretrained
    cfg = eval_config(demo_data, tmp, f"eval.checkpoint={pre['checkpoint']}", "finetune.trainable_blocks=0",
                      "finetune.mixup=0", "finetune.cutmix=0", "finetune.blr=0.05", f"output_dir={tmp}/ft0")
    summary = finetune.run(cfg)
    tuned = torch.load(f"{summary['checkpoint']}/model.pth", weights_only=True)["model"]
    encoder = torch.load(pre["encoder"], weights_only=True)["model"]
    for key in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "patch_embed.proj.weight", "cls_token"):
        assert torch.equal(tuned[key], encoder[key]), key
    assert tuned["head.weight"].abs().max() > 1e-3  # the head did learn (init std 2e-5)


@pytest.mark.ray
def test_official_layout_checkpoint_and_random_baseline_get_runs_of_their_own(local_ray, demo_data, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "mae_pretrain_vit_micro.pth"
    model = build_model(MICRO)
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("decoder")
                          and k != "mask_token"}}, path)  # the release's encoder-only file
    official = linprobe.run(eval_config(demo_data, tmp_path, f"eval.checkpoint={path}", f"output_dir={tmp_path}/a"))
    random = linprobe.run(eval_config(demo_data, tmp_path, "eval.checkpoint=random", f"output_dir={tmp_path}/b"))
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    for s in (official, random):
        run = client.get_run(s["mlflow_run_id"])
        assert "mlflow.parentRunId" not in run.data.tags and s["parent_run_id"] is None
        assert run.data.metrics["linprobe_top1"] == pytest.approx(s["linprobe_top1"])
    assert client.get_run(official["mlflow_run_id"]).data.params["eval.encoder"] == str(path)


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path, demo_data):
    from mae_ray.errors import CheckpointError

    path = tmp_path / "wide.pth"
    torch.save({"model": build_model(MICRO, embed_dim=96, num_heads=2).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch \(file vs model\): blocks.0"):
        linprobe.run(eval_config(demo_data, tmp_path, f"eval.checkpoint={path}"))
