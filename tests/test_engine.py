"""The pre-training math without Ray: lr rule and schedule, weight-decay groups, accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from mae_ray.model.mae import build_model
from mae_ray.train import engine, optim

MICRO = "mae_vit_micro_patch4"


def test_no_decay_on_biases_and_norms():
    model = build_model(MICRO)
    opt = optim.pretrain_optimizer(model, 1e-3, 0.05, torch.device("cpu"))
    decay = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        assert (id(p) in decay) == (p.ndim > 1), name
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)
    assert not any(p is model.pos_embed for g in opt.param_groups for p in g["params"])  # fixed table


def test_schedule_warmup_then_cosine():
    plan = engine.StepPlan(batches_per_epoch=10, accum_iter=2, epochs=10, warmup_epochs=2)
    assert (plan.updates_per_epoch, plan.total_updates, plan.warmup_updates) == (5, 50, 10)
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = optim.build_scheduler(opt, plan, min_lr=0.01)
    lrs = []
    for t in range(plan.total_updates):
        sched.step_update(t)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5)  # linear warmup from 0
    assert lrs[10] == pytest.approx(1.0)  # peak where warmup ends
    t = 30
    expected = 0.01 + (1 - 0.01) * 0.5 * (1 + math.cos(math.pi * (t - 10) / 40))
    assert lrs[t] == pytest.approx(expected)
    assert lrs[-1] < 0.02 and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


class _FixedNoise(torch.nn.Module):
    """MAE whose mask depends on the sample (its index in pixel [0, 0, 0]), not on the RNG."""

    def __init__(self, model, bank):
        super().__init__()
        self.model, self.bank = model, bank

    def forward(self, imgs, mask_ratio):
        return self.model(imgs, mask_ratio, noise=self.bank[imgs[:, 0, 0, 0].long()])


def _one_update(batches, accum):
    torch.manual_seed(0)
    model = build_model(MICRO)
    bank = torch.rand(8, model.patch_embed.num_patches, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    plan = engine.StepPlan(batches_per_epoch=len(batches), accum_iter=accum, epochs=1, warmup_epochs=0)
    sched = optim.build_scheduler(opt, plan, min_lr=0.0)
    engine.train_one_epoch(_FixedNoise(model, bank), [(b, None) for b in batches], opt, sched,
                           engine.Precision("none", torch.device("cpu")), epoch=0, plan=plan,
                           mask_ratio=0.75, device=torch.device("cpu"))
    return model.state_dict()


def test_accumulating_two_batches_of_b_equals_one_batch_of_2b():
    imgs = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    imgs[:, 0, 0, 0] = torch.arange(8).float()
    one = _one_update([imgs], accum=1)
    two = _one_update([imgs[:4], imgs[4:]], accum=2)
    torch.manual_seed(0)
    start = build_model(MICRO).state_dict()
    assert not torch.allclose(one["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # it stepped
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6, rtol=1e-5), key


def test_a_trailing_partial_cycle_steps_on_the_mean_of_its_own_samples():
    """3 micro-batches at accumulation 2: the second update holds one micro-batch and steps on its gradient
    alone, at full weight (not half, not dropped), as if the epoch were two batches [b0 b1] and [b2]."""
    imgs = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    imgs[:, 0, 0, 0] = torch.arange(6).float()
    plan = engine.StepPlan(batches_per_epoch=3, accum_iter=2, epochs=1, warmup_epochs=0)
    assert plan.updates_per_epoch == 2 and [plan.micro_batches_of_update(i) for i in range(3)] == [2, 2, 1]
    partial = _one_update([imgs[:2], imgs[2:4], imgs[4:]], accum=2)
    whole = _one_update([imgs[:4], imgs[4:]], accum=1)
    first_only = _one_update([imgs[:4]], accum=1)
    key = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(partial[key], first_only[key])  # the trailing update stepped
    for k in whole:
        assert torch.allclose(partial[k], whole[k], atol=1e-6, rtol=1e-5), k


def test_an_epoch_shorter_than_one_update_is_refused():
    with pytest.raises(ValueError, match="shorter than one update"):
        engine.StepPlan(batches_per_epoch=3, accum_iter=4, epochs=1, warmup_epochs=0)


def test_non_finite_loss_names_the_step():
    class Exploding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, imgs, mask_ratio):
            return self.w * float("nan"), None, None

    model = Exploding()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    plan = engine.StepPlan(batches_per_epoch=3, accum_iter=1, epochs=2, warmup_epochs=0)
    with pytest.raises(engine.NonFiniteLossError, match=r"non-finite loss \(nan\) at epoch 1, batch 0, update 3"):
        engine.train_one_epoch(model, [(torch.zeros(1), None)] * 3, opt, optim.build_scheduler(opt, plan, 0.0),
                               engine.Precision("none", torch.device("cpu")), epoch=1, plan=plan,
                               mask_ratio=0.75, device=torch.device("cpu"))


def draws():
    import random

    import numpy as np

    return torch.rand(3), random.random(), np.random.rand()


def test_every_rng_is_a_function_of_seed_epoch_and_rank():
    engine.seed_everything(0, 3, 1)
    a = draws()
    draws()  # whatever ran before an epoch does not change what the epoch draws
    engine.seed_everything(0, 3, 1)
    b = draws()
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    for other in [(1, 3, 1), (0, 4, 1), (0, 3, 0)]:  # another seed, epoch or rank draws something else
        engine.seed_everything(*other)
        c = draws()
        assert not torch.equal(a[0], c[0]) and a[1] != c[1] and a[2] != c[2], other


def test_param_fingerprint_sees_a_single_bit():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = engine.param_fingerprint(model)
    assert before.shape == (4,) and before.dtype == torch.int64
    with torch.no_grad():
        w = model[1].weight.view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(1.0))  # one ulp: the smallest change a float can make
    after = engine.param_fingerprint(model)
    assert (after != before).tolist() == [False, False, True, False]


@pytest.mark.parametrize("slow", ["loader", "step"])
def test_the_data_wait_fraction_says_which_side_is_slow(slow):
    """``data_wait_frac``: the share of the epoch spent waiting for the next batch (logged every epoch)."""
    import time

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    plan = engine.StepPlan(batches_per_epoch=6, accum_iter=1, epochs=1, warmup_epochs=0)

    def loader():
        for _ in range(6):
            time.sleep(0.05 if slow == "loader" else 0.0)
            yield torch.ones(2)

    def loss_of(batch):
        time.sleep(0.05 if slow == "step" else 0.0)
        return (p * batch).sum(), 2

    metrics = engine.run_epoch(loss_of, loader(), opt, optim.build_scheduler(opt, plan, min_lr=0.0),
                               engine.Precision("none", torch.device("cpu")), epoch=0, plan=plan)
    assert metrics["data_wait_frac"] > 0.8 if slow == "loader" else metrics["data_wait_frac"] < 0.2, metrics


# ----------------------------------------------------------------------------- elastic groups (ray.min_workers)
def _micro_batches(updates: int, per_update: int):
    """The epoch's micro-batches, update by update: (inputs [4, 6], targets [4])."""
    g = torch.Generator().manual_seed(5)
    return [[(torch.randn(4, 6, generator=g), torch.randn(4, generator=g)) for _ in range(per_update)]
            for _ in range(updates)]


class _AveragingSGD(torch.optim.SGD):
    """SGD of one simulated rank: ``step`` first averages the gradients over the ranks, as DDP's all-reduce
    does at the last micro-batch of each update (ranks are threads here; the real DDP path is the Ray tests')."""

    def __init__(self, params, barrier, grads: dict, rank: int):
        super().__init__(params, lr=0.3, momentum=0.9)
        self.barrier, self.grads, self.rank = barrier, grads, rank

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        self.grads[self.rank] = [p.grad.clone() for p in params]
        self.barrier.wait()
        mean = [torch.stack(gs).mean(0) for gs in zip(*(self.grads[r] for r in sorted(self.grads)), strict=True)]
        self.barrier.wait()
        for p, g in zip(params, mean, strict=True):
            p.grad.copy_(g)
        return super().step(closure)


def _train_group(live: int, plan_args: dict) -> dict:
    """A group of ``live`` ranks, each its share of every update (``StepPlan.share``); rank 0's weights."""
    import threading

    barrier, grads, out = threading.Barrier(live), {}, {}
    torch.manual_seed(0)
    init = torch.nn.Linear(6, 1).state_dict()  # drawn once: the threads share torch's generator

    def rank_main(rank: int) -> None:
        model = torch.nn.Linear(6, 1)
        model.load_state_dict(init)
        plan = engine.StepPlan(**plan_args, live=live, rank=rank)
        mine = []
        for u, update in enumerate(_micro_batches(plan.updates_per_epoch, plan.update_size(0))):
            first = sum(engine.StepPlan(**plan_args, live=live, rank=r).share(u) for r in range(rank))
            mine += update[: plan.update_size(u)][first:first + plan.share(u)]
        assert len(mine) == plan.rank_batches
        opt = _AveragingSGD(model.parameters(), barrier, grads, rank)
        engine.run_epoch(lambda b: (((model(b[0]).squeeze(1) - b[1]) ** 2).mean(), 4), mine, opt,
                         optim.build_scheduler(opt, plan, 0.0), engine.Precision("none", torch.device("cpu")),
                         epoch=0, plan=plan)
        out[rank] = {k: v.clone() for k, v in model.state_dict().items()}

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(live)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(out[r]["weight"], out[0]["weight"]) for r in out)  # replicas stayed identical
    return out[0]


def test_a_group_of_any_size_steps_on_the_same_updates():
    """The configured group is 4 ranks x 2 micro-batches per update, 5 micro-batches per rank and epoch (3
    updates, the last of 4 micro-batches). Groups of 3 (3/3/2 micro-batches an update, 2/1/1 in the last),
    2 and 1 rank end with the configured group's weights: each update steps on the mean gradient of the same
    micro-batches, with the same lr (float rounding only: the sums are taken in another order)."""
    plan_args = {"batches_per_epoch": 5, "accum_iter": 2, "epochs": 1, "warmup_epochs": 0, "workers": 4}
    plan3 = engine.StepPlan(**plan_args, live=3, rank=2)
    assert (plan3.updates_per_epoch, [plan3.share(u) for u in range(3)], plan3.loss_divisor(0)) == (3, [2, 2, 1],
                                                                                                     8 / 3)
    weights = {live: _train_group(live, plan_args) for live in (4, 3, 2, 1)}
    for live in (3, 2, 1):
        for k in weights[4]:
            assert torch.allclose(weights[live][k], weights[4][k], atol=1e-6, rtol=1e-5), (live, k)
    torch.manual_seed(0)
    assert (weights[4]["weight"] - torch.nn.Linear(6, 1).weight).abs().max() > 0.05  # it trained
