"""Exact resume and gradient synchronisation, on real Ray with real checkpoints and MLflow (sqlite).

A run stopped after epoch ``STOP`` and continued, by ``--resume-from`` or by Ray's automatic retry after a
SIGKILLed worker, must end with the same bits as the uninterrupted run: the same weights, optimiser state
and per-epoch loss. That alone would also hold for a job that silently re-ran from scratch (training is
deterministic), so each test also proves the continuation started at epoch STOP + 1 (the checkpoint's
``attempts`` record, and the stopped attempt's epoch timings kept as they were).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from _helpers import tiny_config
from mlflow import MlflowClient

from mae_ray.cluster.checkpoints import load_state
from mae_ray.errors import UserError
from mae_ray.jobs import finetune, pretrain

pytestmark = pytest.mark.ray

EPOCHS, STOP = 4, 1  # 4 epochs; the interrupted runs stop after epoch 1's checkpoint and resume at epoch 2


def mlflow_losses(tmp: Path, run_id: str) -> list[tuple[int, float]]:
    history = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_metric_history(run_id, "train_loss")
    return sorted((m.step, m.value) for m in history)


def tensors(tree, prefix=""):
    """Every tensor of a (nested) state dict, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {}
    out = {}
    for k, v in items:
        out.update(tensors(v, f"{prefix}/{k}"))
    return out


def assert_bit_identical(a: dict, b: dict, what: str) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), what
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def digest(folder: Path) -> dict[str, tuple[str, int]]:
    """name -> (sha256, mtime) of every file of a checkpoint folder."""
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def assert_same_run(full: dict, full_tmp: Path, other: dict, other_tmp: Path, resumed_from: str) -> None:
    a, b = load_state(full["checkpoint"]), load_state(other["checkpoint"])
    how = other_tmp.name
    assert all(h.get("data/skipped", 0) == 0 for h in a["history"] + b["history"]), how  # every sample read
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]], (
        how, b["history"], a["history"], b["attempts"])  # where it forks
    for part in ("model", "optimizer", "scheduler", "scaler"):
        assert_bit_identical(a[part], b[part], f"{how}: {part}")
    assert mlflow_losses(other_tmp, other["mlflow_run_id"]) == mlflow_losses(full_tmp, full["mlflow_run_id"])
    assert [s for s, _ in mlflow_losses(other_tmp, other["mlflow_run_id"])] == list(range(EPOCHS))
    # it resumed: the second attempt began at STOP + 1, from the checkpoint named
    assert a["attempts"] == [{"start_epoch": 0, "resumed_from": ""}]
    assert [x["start_epoch"] for x in b["attempts"]] == [0, STOP + 1]
    assert b["attempts"][1]["resumed_from"].rstrip("/").endswith(resumed_from)


def stop_then_resume(job, cfg, tmp: Path, monkeypatch, name: str) -> tuple[dict, Path]:
    """Run ``job`` until it fails before epoch STOP + 1's report, then ``--resume-from`` epoch STOP's checkpoint
    into another output folder. (Continued in place, Ray's retention of the newest checkpoints prunes the
    older ones as new ones arrive, as it does in an uninterrupted run; the kill test continues in place.)"""
    monkeypatch.setenv("MAE_RAY_FAULTS", f"fail:rank=0:before_report={STOP + 1}")
    with pytest.raises(UserError, match=f"injected failure at before_report={STOP + 1}"):
        job.run(cfg)
    monkeypatch.delenv("MAE_RAY_FAULTS")
    store = tmp / "run" / "ray" / name
    assert sorted(p.name for p in store.glob("epoch_*")) == ["epoch_000000", f"epoch_{STOP:06d}"]
    before = {p.name: digest(p) for p in store.glob("epoch_*")}
    stopped_state = load_state(str(store / f"epoch_{STOP:06d}"))
    cfg.output_dir = str(tmp / "resumed")
    resumed = job.run(cfg, resume_from=str(store / f"epoch_{STOP:06d}"))
    # the checkpoints it resumed from are untouched: same bytes, not even rewritten
    assert {p: digest(store / p) for p in before} == before
    # the stopped attempt's epochs were not trained again: their timings are the ones measured then
    final = load_state(resumed["checkpoint"])
    assert final["history"][: STOP + 1] == stopped_state["history"]
    run = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED" and resumed["mlflow_run_id"] == stopped_state["mlflow_run_id"]
    return resumed, store


@pytest.mark.parametrize("workers", [1, 2])
def test_pretraining_resumes_bit_identically(local_ray, demo_data, tmp_path, monkeypatch, workers):
    def config(tmp, *extra):
        return tiny_config(demo_data, tmp, f"train.epochs={EPOCHS}", f"ray.num_workers={workers}", *extra)

    full = pretrain.run(config(tmp_path / "full"))

    resumed, store = stop_then_resume(pretrain, config(tmp_path / "stop"), tmp_path / "stop", monkeypatch, "run")
    assert_same_run(full, tmp_path / "full", resumed, tmp_path / "stop", f"epoch_{STOP:06d}")

    # the last rank SIGKILLed right after epoch STOP's checkpoint: Ray restarts the group, which resumes
    monkeypatch.setenv("MAE_RAY_FAULTS", f"kill:rank={workers - 1}:after_report={STOP}")
    retried = pretrain.run(config(tmp_path / "kill", "ray.failure_max_retries=1"))
    assert (tmp_path / "kill" / "run" / f".fault-kill-after_report-{STOP}-{workers - 1}").exists()  # it was killed
    assert_same_run(full, tmp_path / "full", retried, tmp_path / "kill", f"epoch_{STOP:06d}")


def test_in_process_jobs_keep_prune_and_resume_checkpoints_as_ray_train_does(local_ray, demo_data, tmp_path,
                                                                               monkeypatch):
    """``ray.num_workers=0`` (a sweep trial's own process): no Ray Train, the same checkpoints. A run that
    failed and is started again in place (a sweep trial restarted by Tune) continues bit for bit."""
    def config(tmp):
        return tiny_config(demo_data, tmp, f"train.epochs={EPOCHS}", "ray.num_workers=0")

    full = pretrain.run(config(tmp_path / "full"))
    kept = sorted(p.name for p in (tmp_path / "full" / "run" / "ray" / "run").iterdir())
    assert kept == [f"epoch_{EPOCHS - 2:06d}", f"epoch_{EPOCHS - 1:06d}"]  # the newest two, as Ray's num_to_keep
    assert full["checkpoint"].endswith(kept[-1])

    monkeypatch.setenv("MAE_RAY_FAULTS", f"fail:rank=0:before_report={STOP + 1}")
    with pytest.raises(UserError, match=f"injected failure at before_report={STOP + 1}"):
        pretrain.run(config(tmp_path / "stop"))
    monkeypatch.delenv("MAE_RAY_FAULTS")
    continued = pretrain.run(config(tmp_path / "stop"), continue_existing=True)
    assert_same_run(full, tmp_path / "full", continued, tmp_path / "stop", f"epoch_{STOP:06d}")


def test_finetuning_resumes_bit_identically(local_ray, demo_data, tmp_path, monkeypatch):
    # 2 workers; drop path, mixup/cutmix, RandAugment and random erasing all draw random numbers
    def config(tmp, *extra):
        return tiny_config(demo_data, tmp, "eval.checkpoint=random", f"finetune.epochs={EPOCHS}",
                           "finetune.batch_size=32", "finetune.warmup_epochs=1", "finetune.drop_path=0.1",
                           "finetune.mixup=0.8", "finetune.cutmix=1.0", *extra)

    full = finetune.run(config(tmp_path / "full"))
    name = "finetune-run"
    resumed, _ = stop_then_resume(finetune, config(tmp_path / "stop"), tmp_path / "stop", monkeypatch, name)
    assert_same_run(full, tmp_path / "full", resumed, tmp_path / "stop", f"epoch_{STOP:06d}")

    monkeypatch.setenv("MAE_RAY_FAULTS", f"kill:rank=0:after_report={STOP}")
    retried = finetune.run(config(tmp_path / "kill", "ray.failure_max_retries=1"))
    assert (tmp_path / "kill" / "run" / f".fault-kill-after_report-{STOP}-0").exists()
    assert_same_run(full, tmp_path / "full", retried, tmp_path / "kill", f"epoch_{STOP:06d}")


def test_ranks_that_drift_apart_stop_the_run_naming_the_epoch(local_ray, demo_data, tmp_path, monkeypatch):
    # one weight of rank 1 nudged after epoch 1, as a lost all-reduce would leave it: the per-epoch
    # comparison of every rank's parameter fingerprints must catch it at that epoch, not later
    monkeypatch.setenv("MAE_RAY_FAULTS", "desync:rank=1:end_epoch=1")
    with pytest.raises(UserError, match=r"ranks diverged after epoch 1: pretrain 'model' differs between ranks "
                                        r"in 1 tensor\(s\) \(cls_token"):
        pretrain.run(tiny_config(demo_data, tmp_path, "train.epochs=3"))
    assert (tmp_path / "run" / ".fault-desync-end_epoch-1-1").exists()


# ------------------------------------------------------------------------------------------ gradient sync
class NoiseInInput(torch.nn.Module):
    """MAE whose masking noise rides in a 4th image channel, so that any split of a batch over ranks or
    micro-batches masks every sample exactly as the whole batch does."""

    def __init__(self, mae):
        super().__init__()
        self.mae = mae

    def forward(self, x, mask_ratio):
        p = self.mae.patch_embed.patch_size[0]
        noise = x[:, 3, ::p, ::p].reshape(x.shape[0], -1)  # [N, L]
        return self.mae(x[:, :3].contiguous(), mask_ratio=mask_ratio, noise=noise)


STEPS, BIG = 4, 16  # 4 updates of 16 samples


def sync_data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(STEPS, BIG, 3, 32, 32, generator=g),
                      torch.rand(STEPS, BIG, 1, 32, 32, generator=g)], dim=2)  # [S, B, 4, H, W]


MODEL = {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2,
         "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "mlp_ratio": 2.0}


def train_steps(config: dict) -> None:
    """A Ray Train worker: the steps below on this rank's share, then rank 0 saves what it has."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    wrap = ray.train.torch.prepare_model if config["ddp"] else (lambda m: m)
    params, prints = steps(config, rank, world, wrap)
    if world > 1:  # every rank's fingerprints after every micro-batch, for the driver to compare
        every = [torch.empty_like(prints) for _ in range(world)]
        dist.all_gather(every, prints)
        prints = torch.stack(every)
    if rank == 0:
        torch.save({"params": params, "prints": prints}, config["out"])
    ray.train.report({})


def steps(config: dict, rank: int, world: int, wrap) -> tuple[dict, torch.Tensor]:
    """``STEPS`` updates of engine.train_one_epoch over this rank's share of every batch of ``sync_data``."""
    from mae_ray.model.mae import MaskedAutoencoderViT
    from mae_ray.train import engine, optim

    accum, cpu = config["accum"], torch.device("cpu")
    torch.manual_seed(0)
    raw = NoiseInInput(MaskedAutoencoderViT(**MODEL))
    model = wrap(raw)
    data = sync_data()
    share = BIG // world // accum  # rank r's micro-batch j of step s: rows (r*accum + j)*share ...
    batches = [(data[s, (rank * accum + j) * share:(rank * accum + j + 1) * share], None)
               for s in range(STEPS) for j in range(accum)]
    plan = engine.StepPlan(len(batches), accum, 1, 0)
    # plain SGD: what is tested is the gradient (DDP's average, no_sync, the loss / accum scaling); Adam would
    # turn float-rounding differences of near-zero gradients into lr-sized steps
    optimizer = torch.optim.SGD(raw.parameters(), lr=0.5)
    prints = []
    engine.train_one_epoch(model, batches, optimizer, optim.build_scheduler(optimizer, plan, 0.0),
                           engine.Precision("none", cpu), epoch=0, plan=plan, mask_ratio=0.75, device=cpu,
                           on_step=lambda i, _: prints.append(engine.param_fingerprint(raw)))
    return {k: v.clone() for k, v in raw.mae.state_dict().items()}, torch.stack(prints)


def run_steps(tmp_path: Path, name: str, workers: int, accum: int, ddp: bool = True) -> dict:
    import sys

    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/ modules

    out = tmp_path / f"{name}.pt"
    TorchTrainer(train_steps, train_loop_config={"accum": accum, "ddp": ddp, "out": str(out)},
                 scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
                 run_config=RunConfig(name=name, storage_path=str(tmp_path / "ray"))).fit()
    return torch.load(out, weights_only=True)


def max_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_workers_follow_one_worker_with_the_whole_batch(local_ray, tmp_path):
    from mae_ray.model.mae import MaskedAutoencoderViT

    torch.manual_seed(0)
    init = NoiseInInput(MaskedAutoencoderViT(**MODEL)).mae.state_dict()
    whole, _ = steps({"accum": 1}, 0, 1, lambda m: m)  # 1 process x 16 samples a step
    assert max_difference(whole, init) > 0.05  # training moved the weights far beyond the tolerance below

    for name, accum in (("ddp", 1), ("ddp_accum", 2)):  # 2 workers x 8, and 2 workers x 2 micro-batches of 4
        split = run_steps(tmp_path, name, workers=2, accum=accum)
        # float tolerance: the same sums added in another order (measured 6e-8 and 1.2e-7; SGD moved the
        # weights by up to 0.12, and 2 workers without the all-reduce land 6.6e-3 away)
        assert max_difference(whole, split["params"]) < 1e-6, name
        rank0, rank1 = split["prints"]
        assert torch.equal(rank0, rank1), f"{name}: ranks differ after some micro-batch"  # identical every step

    # the control: the same 2 workers without DDP's all-reduce neither follow the whole batch nor agree
    alone = run_steps(tmp_path, "no_ddp", workers=2, accum=1, ddp=False)
    assert max_difference(whole, alone["params"]) > 1e-3
    assert not torch.equal(*alone["prints"])
