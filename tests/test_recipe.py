"""The recipe's unit is the effective batch: gradient accumulation is derived from the cluster's size, so
the same recipe trains alike on 1 worker or many (mae_ray/train/recipe.py; the paper states effective batches)."""

from __future__ import annotations

import pytest
import torch

from mae_ray.config import load_config
from mae_ray.errors import ConfigError
from mae_ray.train import classify, engine, optim, recipe

SECTION = {"pretrain": "train", "linprobe": "linprobe", "finetune": "finetune"}


@pytest.mark.parametrize("job", ["pretrain", "linprobe", "finetune"])
def test_one_worker_accumulating_4_equals_4_workers(job):
    s = SECTION[job]
    cfg = load_config(None, [f"{s}.effective_batch=256", f"{s}.batch_size=64", f"{s}.blr=0.5"])
    one, four = recipe.for_job(cfg, job, workers=1), recipe.for_job(cfg, job, workers=4)
    assert (one.accum_iter, four.accum_iter) == (4, 1)
    assert one.effective == four.effective == 256
    assert one.lr(0.5) == four.lr(0.5) == 0.5  # blr x 256 / 256, whatever the cluster
    # without effective_batch the batch (and lr) grow with the cluster: what the recipe key prevents
    plain = load_config(None, [f"{s}.batch_size=64"])
    assert recipe.for_job(plain, job, workers=4).effective == 4 * recipe.for_job(plain, job, workers=1).effective


@pytest.mark.parametrize("job", ["pretrain", "linprobe", "finetune"])
def test_an_effective_batch_the_workers_cannot_divide_is_one_line_before_anything_starts(job):
    s = SECTION[job]
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{s}.effective_batch=1000", f"{s}.batch_size=64", "ray.num_workers=2"])
    assert str(info.value) == (f"{s}.effective_batch 1000 is not a multiple of {s}.batch_size x ray.num_workers = "
                               f"64 x 2 = 128: change one of them so that it divides")


def test_accum_iter_that_contradicts_the_effective_batch_is_refused():
    with pytest.raises(ConfigError, match=r"train.accum_iter 2 contradicts train.effective_batch 4096 \(4096 per "
                                          r"step needs 1\)"):
        load_config(None, ["train.effective_batch=4096", "train.batch_size=64", "ray.num_workers=64",
                           "train.accum_iter=2"])
    cfg = load_config(None, ["train.effective_batch=4096", "train.batch_size=64", "ray.num_workers=8",
                             "train.accum_iter=8"])  # the same thing said twice is fine
    assert recipe.for_job(cfg, "pretrain").accum_iter == 8


def test_in_process_jobs_count_as_one_worker():
    cfg = load_config(None, ["finetune.effective_batch=128", "finetune.batch_size=32", "ray.num_workers=0"])
    assert recipe.for_job(cfg, "finetune").describe() == (
        "1 worker(s) x batch 32 x accumulation 4 = effective batch 128")


def test_classification_accumulation_gives_the_gradient_of_the_whole_batch():
    """Linear probe and fine-tuning step (classify.train_epoch): 2 micro-batches of 8 == 1 batch of 16."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(3, 16, 12, generator=g), torch.randint(0, 5, (3, 16), generator=g)

    def train(accum: int) -> torch.Tensor:
        torch.manual_seed(0)
        head = torch.nn.Linear(12, 5)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9)
        size = 16 // accum
        batches = [(x[s, j * size:(j + 1) * size], y[s, j * size:(j + 1) * size])
                   for s in range(3) for j in range(accum)]
        plan = engine.StepPlan(len(batches), accum, 1, 0)
        classify.train_epoch(head, batches, optimizer, optim.build_scheduler(optimizer, plan, 0.0),
                             engine.Precision("none", torch.device("cpu")), torch.nn.CrossEntropyLoss(),
                             epoch=0, plan=plan, device=torch.device("cpu"))
        return torch.cat([p.detach().flatten() for p in head.parameters()])

    whole, accumulated, per_sample = train(1), train(2), train(16)  # 16: one micro-batch a sample
    assert torch.allclose(whole, accumulated, atol=1e-6) and torch.allclose(whole, per_sample, atol=1e-6)
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in torch.nn.Linear(12, 5).parameters()])
    assert (whole - init).abs().max() > 0.05  # it trained: the tolerance above is far below the steps taken
