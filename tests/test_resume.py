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

from mae_ray import tracking
from mae_ray.cluster.checkpoints import load_state
from mae_ray.errors import UserError
from mae_ray.jobs import pretrain

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
    assert a["attempts"] == [{"start_epoch": 0, "start_update": 0, "resumed_from": "",
                             "workers": b["attempts"][0]["workers"]}]
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


# 2 workers only: one worker's exact continuation after a kill is test_faults.py's (fine-tuning, against an
# uninterrupted in-process run), and --resume-from takes the same path whatever the group size
@pytest.mark.parametrize("workers", [2])
def test_pretraining_resumes_bit_identically(local_ray, demo_data, tmp_path, monkeypatch, workers):
    def config(tmp, *extra):
        return tiny_config(demo_data, tmp, f"train.epochs={EPOCHS}", f"ray.num_workers={workers}", *extra)

    full = pretrain.run(config(tmp_path / "full"))

    resumed, store = stop_then_resume(pretrain, config(tmp_path / "stop"), tmp_path / "stop", monkeypatch, "run")
    assert_same_run(full, tmp_path / "full", resumed, tmp_path / "stop", f"epoch_{STOP:06d}")

    # A checkpoint after every update (train.checkpoint_every_minutes), copied to storage in Ray's background
    # thread; the last rank SIGKILLed half-way through epoch STOP + 2, just after the checkpoint of that epoch's
    # update 2: Ray restarts the group, which resumes inside that epoch, from update 2 or, when the kill cut that
    # checkpoint's copy short, update 1 (a copy cut short is invisible: state.pt goes last, or the folder is
    # renamed once whole). Each rank's place in its data comes back from the checkpoint: the same bits again.
    kill_at = STOP + 2
    monkeypatch.setenv("MAE_RAY_FAULTS", f"kill:rank={workers - 1}:mid_epoch={kill_at}")
    retried = pretrain.run(config(tmp_path / "kill", "ray.failure_max_retries=1", "train.checkpoint_every=2",
                                  "train.checkpoint_every_minutes=1e-6"))
    assert (tmp_path / "kill" / "run" / f".fault-kill-mid_epoch-{kill_at}-{workers - 1}").exists()  # it was killed
    final = load_state(retried["checkpoint"])
    second = final["attempts"][1]
    assert second["start_epoch"] == kill_at and second["start_update"] in (1, 2), final["attempts"]
    assert second["resumed_from"].endswith(f"epoch_{kill_at:06d}_u{second['start_update']:06d}")
    a = load_state(full["checkpoint"])
    for part in ("model", "optimizer", "scheduler", "scaler"):
        assert_bit_identical(a[part], final[part], f"killed inside an epoch: {part}")
    assert [h["train_loss"] for h in final["history"]] == [h["train_loss"] for h in a["history"]]
    client = MlflowClient(f"sqlite:///{tmp_path}/kill/mlflow.db")
    assert mlflow_losses(tmp_path / "kill", retried["mlflow_run_id"]) == mlflow_losses(tmp_path / "full",
                                                                                        full["mlflow_run_id"])
    metrics = client.get_run(retried["mlflow_run_id"]).data.metrics
    assert tracking.RERUN_METRIC not in metrics and tracking.MISMATCH_METRIC not in metrics  # no epoch twice


def test_in_process_jobs_keep_prune_and_resume_checkpoints_as_ray_train_does(local_ray, demo_data, tmp_path,
                                                                               monkeypatch):
    """``ray.num_workers=0`` (a sweep trial's own process): no Ray Train, the same checkpoints. A run that
    failed and is started again in place (a sweep trial restarted by Tune) continues bit for bit."""
    def config(tmp):
        return tiny_config(demo_data, tmp, f"train.epochs={EPOCHS}", "ray.num_workers=0")

    full = pretrain.run(config(tmp_path / "full"))
    kept = sorted(p.name for p in (tmp_path / "full" / "run" / "ray" / "run").iterdir())
    assert kept == [f"epoch_{EPOCHS - 2:06d}", f"epoch_{EPOCHS - 1:06d}"]  # the newest two (checkpoints.KEEP)
    assert full["checkpoint"].endswith(kept[-1])

    monkeypatch.setenv("MAE_RAY_FAULTS", f"fail:rank=0:before_report={STOP + 1}")
    with pytest.raises(UserError, match=f"injected failure at before_report={STOP + 1}"):
        pretrain.run(config(tmp_path / "stop"))
    monkeypatch.delenv("MAE_RAY_FAULTS")
    continued = pretrain.run(config(tmp_path / "stop"), continue_existing=True)
    assert_same_run(full, tmp_path / "full", continued, tmp_path / "stop", f"epoch_{STOP:06d}")


def test_a_run_stopped_inside_an_epoch_continues_bit_identically(demo_data, tmp_path, monkeypatch):
    """Checkpoints inside an epoch (``train.checkpoint_every_minutes``, here after every update): a run that fails
    half-way through epoch 1 continues from the checkpoint after that epoch's update 2, and ends with the same
    bits as the uninterrupted run: the same data in the same order (two loader workers, whose round robin a
    restart resets), the same augmentations and masks, and the epoch's loss summed over both attempts."""
    extra = ("ray.num_workers=0", "data.num_workers=2", "train.accum_iter=2", "train.epochs=2")
    full = pretrain.run(tiny_config(demo_data, tmp_path / "full", *extra))

    def config():
        return tiny_config(demo_data, tmp_path / "stop", *extra, "train.checkpoint_every_minutes=1e-6")

    monkeypatch.setenv("MAE_RAY_FAULTS", "fail:rank=0:mid_epoch=1")  # before micro-batch 4 of 8: after update 2
    with pytest.raises(UserError, match="injected failure at mid_epoch=1"):
        pretrain.run(config())
    monkeypatch.delenv("MAE_RAY_FAULTS")
    store = tmp_path / "stop" / "run" / "ray" / "run"
    assert sorted(p.name for p in store.iterdir()) == ["epoch_000001_u000001", "epoch_000001_u000002"]
    continued = pretrain.run(config(), continue_existing=True)

    a, b = load_state(full["checkpoint"]), load_state(continued["checkpoint"])
    assert b["attempts"][1]["start_epoch"] == 1 and b["attempts"][1]["start_update"] == 2, b["attempts"]
    assert b["attempts"][1]["resumed_from"].endswith("epoch_000001_u000002")
    for part in ("model", "optimizer", "scheduler"):
        assert_bit_identical(a[part], b[part], part)
    assert [h["train_loss"] for h in b["history"]] == [h["train_loss"] for h in a["history"]]
    assert mlflow_losses(tmp_path / "stop", continued["mlflow_run_id"]) == mlflow_losses(tmp_path / "full",
                                                                                         full["mlflow_run_id"])


def test_ranks_that_drift_apart_stop_the_run_naming_the_epoch(local_ray, demo_data, tmp_path, monkeypatch):
    # one weight of rank 1 nudged after epoch 1, as a lost all-reduce would leave it: the per-epoch
    # comparison of every rank's parameter fingerprints must catch it at that epoch, not later
    monkeypatch.setenv("MAE_RAY_FAULTS", "desync:rank=1:end_epoch=1")
    with pytest.raises(UserError, match=r"ranks diverged after epoch 1: pretrain 'model' differs between ranks "
                                        r"in 1 tensor\(s\) \(cls_token"):
        pretrain.run(tiny_config(demo_data, tmp_path, "train.epochs=3"))
    assert (tmp_path / "run" / ".fault-desync-end_epoch-1-1").exists()


# ------------------------------------------------------------------------------------------ gradient sync
SYNC_STEPS = ("train.epochs=1", "train.batch_size=16", "train.accum_iter=2", "data.samples_per_epoch=128",
              "train.warmup_epochs=0", "train.checkpoint_every=1")  # 4 micro-batches of 16 per rank, 2 updates


class ReplayedMasks(torch.nn.Module):
    """The MAE fed the masking noise its micro-batches drew in the job, one [N, L] draw per forward."""

    def __init__(self, mae, noises: list[torch.Tensor]):
        super().__init__()
        self.mae, self.noises = mae, iter(noises)

    def forward(self, imgs, mask_ratio):
        return self.mae(imgs, mask_ratio=mask_ratio, noise=next(self.noises))


def what_rank_saw(cfg, rank: int, world: int, mae) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Epoch 0's micro-batches (normalised images) and masking noise on ``rank`` of ``world``, drawn as the
    job draws them: the real loader for that rank, then one noise draw per forward, every RNG seeded from
    (seed, 0, rank, micro-batch) before it (nothing else in a step draws from torch's RNG)."""
    from mae_ray.data.loader import make_train_loader
    from mae_ray.data.transforms import build_transform
    from mae_ray.train import engine

    size = mae.patch_embed.img_size[0]
    engine.seed_everything(cfg.train.seed, 0, rank)
    loader = make_train_loader(  # the arguments of jobs/pretrain.train_loop's loader, on a CPU worker
        cfg.data.train_shards, batch_size=cfg.train.batch_size,
        transform=build_transform("pretrain", size, normalize=False, augment=cfg.train.augment),
        rank=rank, world_size=world, num_workers=cfg.data.num_workers,
        samples_per_epoch=cfg.data.samples_per_epoch, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer)
    loader.set_epoch(0)
    images = [imgs for imgs, _ in pretrain.on_device(loader, torch.device("cpu"))]
    noises = []
    for i, x in enumerate(images):  # engine.run_epoch seeds every RNG again before each micro-batch
        engine.seed_everything(cfg.train.seed, 0, rank, i)
        noises.append(mae.mask_noise(x.shape[0], cfg.model.mask_ratio, x.device))
    return images, noises


def initial_model(cfg):
    """Rank 0's initial weights (``train_loop`` seeds ``seed + rank``), which DDP gives every rank."""
    from mae_ray.model.mae import MaskedAutoencoderViT

    torch.manual_seed(cfg.train.seed)
    return MaskedAutoencoderViT(**cfg.model.kwargs())


def one_worker_with_the_whole_batch(cfg, seen: list) -> tuple[dict, float]:
    """What one process trains, from the job's initial weights, with the job's optimiser, schedule and epoch
    loop, when each update takes as one batch every micro-batch that the ranks of ``seen`` (``what_rank_saw``
    of each) took for it. Returns the final weights and the mean loss."""
    from mae_ray.train import engine, optim

    cpu, accum = torch.device("cpu"), cfg.train.accum_iter
    mae = initial_model(cfg)
    updates = len(seen[0][0]) // accum
    batches, noises = [], []
    for u in range(updates):  # update u: micro-batches u*accum .. (u+1)*accum - 1 of every rank, in one batch
        part = [(imgs[i], noise[i]) for imgs, noise in seen for i in range(u * accum, (u + 1) * accum)]
        batches.append((torch.cat([x for x, _ in part]), None))
        noises.append(torch.cat([n for _, n in part]))
    plan = engine.StepPlan(updates, 1, cfg.train.epochs, cfg.train.warmup_epochs)
    optimizer = optim.pretrain_optimizer(mae, cfg.train.lr, cfg.train.weight_decay, cpu)
    metrics = engine.train_one_epoch(ReplayedMasks(mae, noises), batches, optimizer,
                                     optim.build_scheduler(optimizer, plan, cfg.train.min_lr),
                                     engine.Precision("none", cpu), epoch=0, plan=plan,
                                     mask_ratio=cfg.model.mask_ratio, device=cpu)
    return {k: v.clone() for k, v in mae.state_dict().items()}, metrics["train_loss"]


def max_difference(a: dict, b: dict) -> float:
    """The largest difference of two MAE state dicts, leaving out the attention keys' biases: their exact
    gradient is 0 (softmax ignores a shift that every key shares), so what they get is float rounding, which
    AdamW divides by its own square root (+ eps) into steps of ~1e-5 that differ with the summation order."""
    def kept(key: str, v: torch.Tensor) -> torch.Tensor:
        if key.endswith("attn.qkv.bias"):  # [q | k | v]
            q, _, v = v.chunk(3)
            return torch.cat([q, v])
        return v

    return max((kept(k, a[k]) - kept(k, b[k])).abs().max().item() for k in a)


def test_two_workers_follow_one_worker_with_the_whole_batch(local_ray, demo_data, tmp_path):
    """The real pre-training job on 2 Ray Train workers (DDP from ``launch.prepare_model``, the real loader,
    2 micro-batches of 16 per update on each rank) ends where one process ends that takes each update's 64
    samples, with their masks, as one batch. A job without the gradient all-reduce fails here."""
    cfg = tiny_config(demo_data, tmp_path, *SYNC_STEPS)
    job = load_state(pretrain.run(cfg)["checkpoint"])

    seen = [what_rank_saw(cfg, rank, 2, initial_model(cfg)) for rank in (0, 1)]
    whole, loss = one_worker_with_the_whole_batch(cfg, seen)
    # the same samples and masks: the mean loss of the job's 8 forwards is the mean over the 2 whole batches
    assert job["history"][0]["train_loss"] == pytest.approx(loss, rel=1e-6)
    # float tolerance: the same sums added in another order (measured 9.5e-7; an AdamW step is ~lr = 2e-3)
    assert max_difference(whole, job["model"]) < 5e-6
    # the control: rank 0's samples alone (a rank without the all-reduce) land far from the whole batch
    alone, _ = one_worker_with_the_whole_batch(cfg, seen[:1])
    assert max_difference(whole, alone) > 1e-3
