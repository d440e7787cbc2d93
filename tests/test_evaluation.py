"""Evaluation: linear probe, fine-tune, exact distributed accuracy, MLflow parent/child rows."""

from __future__ import annotations

import os

import pytest
import torch
from mlflow import MlflowClient

from mae_ray.config import load_config
from mae_ray.jobs import evaluate, finetune, linprobe, pretrain
from mae_ray.model.mae import build_model
from mae_ray.train import classify, engine, optim

MICRO = "mae_vit_micro_patch4"


# ----------------------------------------------------------------------------------- in-process
def test_linear_probe_recipe_separates_linearly_separable_features():
    torch.manual_seed(0)
    centers = torch.randn(5, 32) * 3
    y = torch.randint(0, 5, (2000,))
    x = centers[y] + torch.randn(2000, 32) * 0.5 + 10.0  # offset: the BN without affine must cope
    head = linprobe.LinearProbeHead(32, 5)
    data = linprobe.CachedFeatures(x, y, batch_size=100, rank=0, world=1, seed=0)
    plan = engine.StepPlan(len(data), 1, epochs=10, warmup_epochs=1)
    opt = optim.linprobe_optimizer(head.fc, lr=2.0, weight_decay=0.0)
    sched = optim.build_scheduler(opt, plan, 0.0)
    for epoch in range(10):
        data.set_epoch(epoch)
        classify.train_epoch(head, data, opt, sched, engine.Precision("none", torch.device("cpu")),
                             torch.nn.CrossEntropyLoss(), epoch=epoch, plan=plan, device=torch.device("cpu"))
    head.eval()
    scores = classify.score(head, [(x[i : i + 500], y[i : i + 500]) for i in range(0, 2000, 500)], "cpu")
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


def test_batch_head_norm_removes_what_every_image_shares():
    # finetune.head_norm=batch: the head sees the pooled feature centred and scaled per dimension over the batch
    # (what the linear probe's BatchNorm does); the release's LayerNorm keeps a part common to every image
    enc = build_model(MICRO)
    x = torch.randn(64, 3, 32, 32) + 3.0  # a large shared component in every image
    layer, batch = (finetune.build_classifier(enc, num_classes=10, drop_path=0.0, head_norm=norm).train()
                    for norm in ("layer", "batch"))
    with torch.no_grad():
        by_layer = layer.forward_head(layer.forward_features(x), pre_logits=True)  # [N, D] after fc_norm
        by_batch = batch.forward_head(batch.forward_features(x), pre_logits=True)
    assert by_batch.mean(0).abs().max() < 1e-4 and torch.allclose(by_batch.std(0), torch.ones(1), atol=0.02)
    assert by_layer.mean(0).norm() > 0.9 * by_layer.norm(dim=1).mean()  # LayerNorm: the shared part stays
    # the encoder's weights are the same in both; only fc_norm differs (no affine: nothing to learn there)
    assert {n for n, _ in batch.named_parameters()} == {n for n, _ in layer.named_parameters()} - {
        "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(batch.blocks[0].attn.qkv.weight, layer.blocks[0].attn.qkv.weight)


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


# Budgets at which learning shows on the demo data (10 classes: chance is 10 %), and each no larger.
# Pre-training: 3 x 12,000 images (30 passes over the 1,200 demo images, ~560 steps of 2 x 32), loss on
# normalised pixels, with the online kNN (cls token, the product's monitor) once at the end.
LEARN_PRETRAIN = ("model.norm_pix_loss=true", "data.samples_per_epoch=12000", "train.epochs=3", "train.lr=2e-3",
                  "train.warmup_epochs=0.1", "train.knn_every=3", "eval.knn_train_samples=1200",
                  "eval.knn_val_samples=300")
# Linear probe: cached features, mean-pooled patch tokens (which separate MAE from random init more
# clearly than the cls token on this task, docs/results.md), 500 epochs: LARS moves the head by a fixed
# fraction of its (0.01-std) weights per step, so 9 steps an epoch need that many to converge; at 50 the
# probe stopped ~9 points under a plain logistic regression and still moved (docs/results.md), at 300 the
# random-init probe ended one val image under it.
LEARN_PROBE = ("linprobe.pool=mean", "linprobe.epochs=500", "linprobe.blr=20")
# Fine-tune: 2 x 1,200 images, no mixup/cutmix (they slow a short run down), lr 1e-3.
LEARN_FINETUNE = ("finetune.epochs=2", "finetune.samples_per_epoch=1200", "finetune.blr=4e-3",
                  "finetune.warmup_epochs=0.2", "finetune.layer_decay=0.75", "finetune.mixup=0",
                  "finetune.cutmix=0")
CHANCE = 100 / 10
# The learning fixtures run each job in this process (ray.num_workers=0) with each worker's batch times the 2
# workers of eval_config: the same images, updates, lr and schedule as the 2-worker group, without three Ray
# Train start-ups (experiments/probe_margin.py's default, which calibrated the margins below). What they test
# is learning; distribution is test_distributed_eval_equals_single_process's and the other modules'.
IN_PROCESS = ("ray.num_workers=0", "train.batch_size=64", "linprobe.batch_size=128", "finetune.batch_size=64")


@pytest.fixture(scope="module")
def pretrained(local_ray, demo_data, tmp_path_factory):
    """One pre-training run for the module, long enough to have learnt something (see LEARN_PRETRAIN)."""
    tmp = tmp_path_factory.mktemp("pre")
    summary = pretrain.run(eval_config(demo_data, tmp, *LEARN_PRETRAIN, *IN_PROCESS, "output_dir=" + str(tmp / "pre")))
    return tmp, summary


@pytest.fixture(scope="module")
def evaluated(pretrained, demo_data):
    """``evaluate`` (linear probe, then fine-tune) of the pre-training run, by its MLflow run id."""
    tmp, pre = pretrained
    cfg = eval_config(demo_data, tmp, f"eval.checkpoint=runs:/{pre['mlflow_run_id']}", *LEARN_PROBE,
                      *LEARN_FINETUNE, *IN_PROCESS, f"output_dir={tmp}/ev")
    return cfg, evaluate.run(cfg)


@pytest.fixture(scope="module")
def random_probe(local_ray, demo_data, tmp_path_factory):
    """The same linear probe of the same architecture at its random initialisation: the baseline."""
    tmp = tmp_path_factory.mktemp("random")
    summary = linprobe.run(eval_config(demo_data, tmp, "eval.checkpoint=random", *LEARN_PROBE, *IN_PROCESS,
                                       f"output_dir={tmp}/lp"))
    return tmp, summary


@pytest.mark.ray
def test_distributed_eval_equals_single_process(local_ray, demo_data, tmp_path):
    """A fixed classifier evaluated by 2 Ray workers over the exact-once loader == one process."""
    import tempfile

    import ray.train
    from ray.train import Checkpoint, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from mae_ray.data.loader import make_eval_loader

    def scores(rank, world):
        torch.manual_seed(0)
        model = build_model(MICRO).eval()
        head = torch.nn.Linear(64, 10)
        loader = make_eval_loader(demo_data["val"], batch_size=64, img_size=32, rank=rank, world_size=world,
                                  num_workers=0)
        return classify.score(lambda x: head(model.forward_features(x)[:, 0]), loader, torch.device("cpu"))

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


# Learning, with margins calibrated over seeds: a throwaway run of the three fixtures above with
# train.seed 0-4 (which changes the pre-training, the random init and the data order), top-1 % on the
# 300 val images, demo crop ratio 1.0 (2026-11-30; the probe then ran 50 epochs, its rows are below):
#   seed                               0     1     2     3     4
#   fine-tune, MAE init             23.3  21.3  21.3  22.3  18.0   - chance:     +8.0 .. +13.3
#   online kNN (cls token, k=20)    29.3  27.3  25.3  24.7  23.3   - chance:    +13.3 .. +19.3
# The linear probe at this module's budget (LEARN_PRETRAIN, LEARN_PROBE: 500 epochs), re-measured by
# experiments/probe_margin.py (in-process jobs, same images, updates and lr; docs/results.md, 2026-12-06):
#   linear probe, MAE encoder       48.0  47.0  47.3  49.0  47.0
#   linear probe, random init       38.7  42.7  40.3  37.3  43.0   MAE - random: +4.0 .. +11.7
# (these fixtures themselves, in-process as below, seed 0: MAE 48.0, random init 38.7, +9.3; with 2 Ray Train
# workers: MAE 44.7, random init 38.7, +6.0)
# Each bound is about half the smallest margin measured over its reference (random init, chance).
PROBE_MARGIN = 2.0  # half of +4.0 (seed 4): 6 of the 300 val images


@pytest.mark.ray
def test_linear_probe_of_the_mae_encoder_beats_random_init(evaluated, random_probe):
    _, summary = evaluated
    _, baseline = random_probe
    assert summary["linprobe_top1"] > baseline["linprobe_top1"] + PROBE_MARGIN, (summary["linprobe_top1"], baseline)


@pytest.mark.ray
def test_finetuning_the_mae_encoder_beats_chance(evaluated):
    _, summary = evaluated
    assert summary["finetune_top1"] > CHANCE + 4, summary


@pytest.mark.ray
def test_every_run_records_what_produced_it(pretrained, evaluated):
    """Read back from the store after real runs: pre-training (a Ray Train driver) and both evaluations."""
    import importlib.metadata

    from mae_ray import provenance

    tmp, pre = pretrained
    _, summary = evaluated
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    commit, dirty = provenance.git_state()
    for run_id in (pre["mlflow_run_id"], summary["linprobe_run_id"], summary["finetune_run_id"]):
        tags = client.get_run(run_id).data.tags
        assert {p: tags[f"mae_ray.env.{p}"] for p in provenance.PACKAGES} == {
            p: importlib.metadata.version(p) for p in provenance.PACKAGES}
        assert tags["mae_ray.env.gpu_count"] == str(torch.cuda.device_count())
        assert tags["mae_ray.env.cpu_count"] == str(os.cpu_count()) and tags["mae_ray.env.ray_nodes"] == "1"
        assert tags["mae_ray.env.command"]  # this test process's (a CLI run records `mae-ray ...`)
        if commit:  # a checkout (CI's fresh clone is one)
            assert tags["mlflow.source.git.commit"] == commit and tags["mae_ray.env.git_dirty"] == str(dirty).lower()
        inputs = client.get_run(run_id).inputs.dataset_inputs  # the UI's Dataset column
        assert sorted(t.value for i in inputs for t in i.tags if t.key == "mlflow.data.context") == [
            "training", "validation"]


@pytest.mark.ray
def test_online_knn_of_the_pretraining_run_beats_chance(pretrained):
    _, pre = pretrained
    assert pre["metrics"]["knn_top1"] > CHANCE + 7, pre["metrics"]


@pytest.mark.ray
def test_evaluate_puts_both_accuracies_on_the_pretraining_run(pretrained, evaluated):
    tmp, pre = pretrained
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg, summary = evaluated
    client = MlflowClient(uri)
    parent = client.get_run(pre["mlflow_run_id"]).data.metrics
    assert parent["linprobe_top1"] == pytest.approx(summary["linprobe_top1"])
    assert parent["finetune_top1"] == pytest.approx(summary["finetune_top1"])
    for job in ("linprobe", "finetune"):
        child = client.get_run(summary[f"{job}_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == pre["mlflow_run_id"]
        assert child.data.tags["mae_ray.job"] == job
        assert child.data.params[f"{job}.epochs"] == str(getattr(cfg, job).epochs)
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
def test_evaluation_only_sweep_fine_tunes_one_encoder_partially_per_trial(pretrained, demo_data):
    """Fig. 9's shape of sweep (``pretrain: false``): every trial fine-tunes the same pre-trained encoder,
    the last 0 or 1 blocks; nothing is pre-trained again, the scores go to each trial's run (child of the
    sweep), the encoder's own run is left as it was, and the frozen blocks come out as they went in."""
    import json

    import yaml

    from mae_ray.jobs import sweep as sweeps
    from mae_ray.jobs.sweep_config import load_sweep

    tmp, pre = pretrained
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    before = client.get_run(pre["mlflow_run_id"]).data.metrics
    base = eval_config(demo_data, tmp, f"eval.checkpoint=runs:/{pre['mlflow_run_id']}", "finetune.mixup=0",
                       "finetune.cutmix=0", "finetune.blr=0.05", "ray.num_workers=1", "ray.cpus_per_worker=0.8",
                       f"output_dir={tmp}/unused").to_dict()
    (tmp / "fig9_base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": "fig9_base.yaml", "name": "fig9", "pretrain": False, "linprobe": False, "finetune": True,
            "random_baseline": False, "metric": "finetune_top1", "scheduler": {"type": "none"},
            "search": {"finetune.trainable_blocks": {"grid": [0, 1]}}, "max_concurrent_trials": 2,
            "paper": {0: {"finetune_top1": 73.5}, 1: {"finetune_top1": 81.0}}, "output_dir": str(tmp / "sweeps")}
    (tmp / "fig9.yaml").write_text(yaml.safe_dump(spec))
    sweep, base = load_sweep(str(tmp / "fig9.yaml"), [])
    report = sweeps.run(sweep, base, str(tmp / "fig9.yaml"))

    rows = {r["finetune.trainable_blocks"]: r for r in report["rows"]}
    assert set(rows) == {0, 1} and all(r["status"] == "finished" for r in rows.values())
    assert (rows[0]["paper_finetune_top1"], rows[1]["paper_finetune_top1"]) == (73.5, 81.0)
    assert client.get_run(pre["mlflow_run_id"]).data.metrics == before  # the encoder's run: untouched
    encoder = torch.load(pre["encoder"], weights_only=True)["model"]
    for blocks, row in rows.items():
        trial_run = client.get_run(row["mlflow_run_id"])
        assert trial_run.data.tags["mlflow.parentRunId"] == report["parent_run_id"]
        assert "train_loss" not in trial_run.data.metrics and trial_run.info.status == "FINISHED"  # no pre-training
        assert trial_run.data.metrics["finetune_top1"] == row["finetune_top1"]
        ft_dir = tmp / "sweeps" / "fig9" / "trials" / row["trial"] / "eval" / "finetune"
        result = json.loads((ft_dir / "result.json").read_text())
        ft_run = client.get_run(result["mlflow_run_id"])
        assert ft_run.data.tags["mlflow.parentRunId"] == row["mlflow_run_id"]
        assert ft_run.data.tags["mae_ray.encoder_run_id"] == pre["mlflow_run_id"]
        assert ft_run.data.params["finetune.trainable_blocks"] == str(blocks)
        tuned = torch.load(f"{result['checkpoint']}/model.pth", weights_only=True)["model"]
        for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "cls_token"):  # frozen in both
            assert torch.equal(tuned[key], encoder[key]), (blocks, key)
        assert torch.equal(tuned["blocks.1.mlp.fc2.weight"], encoder["blocks.1.mlp.fc2.weight"]) == (blocks == 0)
        assert tuned["head.weight"].abs().max() > 1e-3  # the head did learn (init std 2e-5)
    trials = tmp / "sweeps" / "fig9" / "trials"  # nothing pre-trained: each trial folder holds only eval/
    assert sorted(p.name for p in trials.glob("*/*")) == ["eval", "eval"]


@pytest.mark.ray
def test_official_layout_checkpoint_and_random_baseline_get_runs_of_their_own(random_probe, demo_data, tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "mae_pretrain_vit_micro.pth"
    model = build_model(MICRO)
    torch.save({"model": {k: v for k, v in model.state_dict().items() if not k.startswith("decoder")
                          and k != "mask_token"}}, path)  # the release's encoder-only file
    official = linprobe.run(eval_config(demo_data, tmp_path, f"eval.checkpoint={path}", f"output_dir={tmp_path}/a"))
    random_tmp, random = random_probe
    for tmp, s in ((tmp_path, official), (random_tmp, random)):
        run = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_run(s["mlflow_run_id"])
        assert "mlflow.parentRunId" not in run.data.tags and s["parent_run_id"] is None
        assert run.data.metrics["linprobe_top1"] == pytest.approx(s["linprobe_top1"])
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(official["mlflow_run_id"]).data.params["eval.encoder"] == str(path)
    random_params = MlflowClient(f"sqlite:///{random_tmp}/mlflow.db").get_run(random["mlflow_run_id"]).data.params
    assert random_params["eval.encoder"] == "random"
    # no pre-training, so no mask ratio or pre-training length: a sweep's random-init row must not show the base's
    assert random_params["model.mask_ratio"] == random_params["train.epochs"] == "n/a: random init"
    assert client.get_run(official["mlflow_run_id"]).data.params["model.mask_ratio"] == "0.75"


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_keys(tmp_path, demo_data):
    from mae_ray.errors import CheckpointError

    path = tmp_path / "wide.pth"
    torch.save({"model": build_model(MICRO, embed_dim=96, num_heads=2).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch \(file vs model\): blocks.0"):
        linprobe.run(eval_config(demo_data, tmp_path, f"eval.checkpoint={path}"))


def plain_probe_top1(encoder, cfg, demo) -> float:
    """``classify.plain_probe_top1`` on the probe job's own features (eval transform, its pooling, every image)."""
    from mae_ray.data.loader import make_eval_loader
    from mae_ray.data.transforms import eval_transform
    from mae_ray.train.classify import plain_probe_top1 as plain
    from mae_ray.train.knn import extract_features

    def features(shards):
        loader = make_eval_loader(shards, batch_size=256, transform=eval_transform(cfg.data, 32), img_size=32,
                                  rank=0, world_size=1, num_workers=0, num_classes=10)
        return extract_features(encoder, loader, "cpu", pool=cfg.linprobe.pool)

    return plain(features(demo["train"]), features(demo["val"]), 10)


@pytest.mark.ray
def test_the_probe_job_converges_and_meets_a_plain_logistic_regression(pretrained, evaluated, random_probe,
                                                                        demo_data):
    from mae_ray.jobs.encoders import EncoderSource, resolve_encoder

    tmp, pre = pretrained
    cfg, summary = evaluated
    random_tmp, baseline = random_probe
    mae = resolve_encoder(pre["checkpoint"], cfg, f"sqlite:///{tmp}/mlflow.db").build(cfg.train.seed)
    random = EncoderSource(None, cfg.model.kwargs(), None, "random").build(cfg.train.seed)  # as the job builds it
    for name, encoder, result, store in (("mae", mae, summary, tmp), ("random", random, baseline, random_tmp)):
        plain = plain_probe_top1(encoder.eval(), cfg, demo_data)
        run_id = result["linprobe_run_id"] if name == "mae" else result["mlflow_run_id"]
        top1 = result["linprobe_top1"]
        history = [m.value for m in sorted(MlflowClient(f"sqlite:///{store}/mlflow.db").get_metric_history(
            run_id, "val_top1"), key=lambda m: m.step)]
        # the plain probe's accuracy, to one val image: the job's last epochs still move by one image either way
        # (in-process fixtures, seed 0: MAE 48.00 vs plain 48.33, the last 10 epochs 47.67..48.33; with 2 Ray
        # workers it was 44.67 vs 44.00); at 50 epochs the probe stopped ~9 points under; settled: the last 10
        # epochs within 2 points
        assert top1 >= plain - 100 / 300, (name, top1, plain, history[-10:])
        assert max(history[-10:]) - min(history[-10:]) <= 2.0, (name, history[-10:])
