"""The recipe's batch arithmetic, one rule for every job: effective batch, gradient accumulation, lr.

The paper gives every batch size as the *effective* batch (pre-training 4096, fine-tuning 1024, linear
probe 16384) and scales the learning rate with it: lr = blr * effective / 256. A job names that batch
(``train.effective_batch``, ``finetune.effective_batch``, ``linprobe.effective_batch``); each worker steps
on ``batch_size`` samples, so gradients are accumulated over effective / (batch_size x workers)
micro-batches. The same recipe then trains the same way on 1 worker or 64: only the accumulation changes.
Without ``effective_batch``, the effective batch is batch_size x accum_iter x workers (``train.accum_iter``;
the evaluation jobs accumulate nothing).

Torch-free: the config checks it before anything starts, and the workers use it for the lr.
"""

from __future__ import annotations

from dataclasses import dataclass

from mae_ray.errors import ConfigError


@dataclass(frozen=True)
class Batching:
    batch_size: int  # per worker, per micro-batch
    workers: int
    accum_iter: int

    @property
    def effective(self) -> int:
        return self.batch_size * self.accum_iter * self.workers

    def lr(self, blr: float) -> float:
        """The paper's linear scaling rule."""
        return blr * self.effective / 256

    def describe(self) -> str:
        return (f"{self.workers} worker(s) x batch {self.batch_size} x accumulation {self.accum_iter} = "
                f"effective batch {self.effective}")


def batching(section: str, batch_size: int, workers: int, effective_batch: int | None,
             accum_iter: int = 1) -> Batching:
    """The batching of ``section`` (``train``, ``finetune``, ``linprobe``) on ``workers`` Ray workers.

    ``workers`` 0 (in-process) counts as 1. A ConfigError when ``effective_batch`` is not a whole number
    of micro-batches, or contradicts an ``accum_iter`` also given.
    """
    workers = max(1, workers)
    if effective_batch is None:
        return Batching(batch_size, workers, accum_iter)
    per_step = batch_size * workers
    if effective_batch < 1 or effective_batch % per_step:
        raise ConfigError(
            f"{section}.effective_batch {effective_batch} is not a multiple of {section}.batch_size x "
            f"ray.num_workers = {batch_size} x {workers} = {per_step}: change one of them so that it divides")
    accum = effective_batch // per_step
    if accum_iter not in (1, accum):
        raise ConfigError(f"{section}.accum_iter {accum_iter} contradicts {section}.effective_batch {effective_batch} "
                          f"({per_step} per step needs {accum}): set only effective_batch")
    return Batching(batch_size, workers, accum)


def check_epoch(section: str, samples: int, batching: Batching, max_batches: int | None = None,
                samples_key: str | None = "data.samples_per_epoch") -> int:
    """The micro-batches each worker takes per epoch; a ConfigError when they do not make one update.

    An epoch of ``samples`` is ``samples // (workers x batch_size)`` micro-batches per worker (at most
    ``max_batches``). Fewer than ``accum_iter`` of them would never step the optimiser: the run would end
    with its weights at their initialisation and still record an accuracy. A trailing partial cycle
    (micro-batches beyond the last whole update) is stepped as a smaller update (``engine.run_epoch``).
    """
    per_step = batching.batch_size * batching.workers
    batches = samples // per_step
    if max_batches is not None:
        batches = min(batches, max_batches)
    if batches >= batching.accum_iter:
        return batches
    if samples < per_step:  # not even one micro-batch per worker
        raise ConfigError(f"{section}: an epoch of {samples} samples is less than one micro-batch per worker "
                          f"({batching.describe()}): use {section}.batch_size <= {max(1, samples // batching.workers)}"
                          f"{f' or {samples_key} >= {per_step}' if samples_key else ''}")
    fits = max(per_step, (samples // per_step) * per_step)
    ways = [f"{section}.effective_batch <= {fits} (a multiple of {batching.batch_size} x {batching.workers})"]
    if max_batches is not None and max_batches < batching.accum_iter:
        ways.append(f"train.max_steps_per_epoch >= {batching.accum_iter} (it is {max_batches})")
    if samples_key:
        ways.append(f"{samples_key} >= {batching.effective} (more data per epoch)")
    raise ConfigError(
        f"{section}: an epoch of {samples} samples is {batches} micro-batch(es) per worker ({batching.describe()}), "
        f"fewer than the {batching.accum_iter} of one update: the optimiser would never step. "
        f"Use {' or '.join(ways)}")


def for_job(cfg, job: str, workers: int | None = None) -> Batching:
    """The batching of ``job`` (pretrain | linprobe | finetune) under ``cfg``; ``workers`` defaults to the
    configured ``ray.num_workers``."""
    workers = cfg.ray.num_workers if workers is None else workers
    if job == "pretrain":
        t = cfg.train
        return batching("train", t.batch_size, workers, t.effective_batch, t.accum_iter)
    section = {"linprobe": cfg.linprobe, "finetune": cfg.finetune}[job]
    return batching(job, section.batch_size, workers, section.effective_batch)
