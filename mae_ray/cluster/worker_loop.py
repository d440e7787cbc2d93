"""The worker side of every training job's epoch loop: resume, report, checkpoint, log once.

A job builds its model and optimiser, hands the objects that carry state to ``EpochLoop``, runs
``for epoch in loop.remaining():`` and calls ``end_epoch`` after each epoch. ``EpochLoop`` resumes from
the newest checkpoint (see ``checkpoints.latest_checkpoint``), seeds every RNG at the start of each epoch,
checks that data-parallel ranks still hold identical parameters, reports every epoch to Ray, writes a
checkpoint when one is due, and has rank 0 log the epoch to MLflow exactly once, also across restarts.

Exact resume: a checkpoint holds model, optimiser, schedule and loss scaler; everything random a
micro-batch draws is seeded from ``(seed, epoch, rank, micro-batch)`` (``engine.seed_everything``; the
loader's data order and augmentations from each sample's place in its stream), so a run resumed after
epoch k, or after update u of an epoch, trains on bit for bit as the uninterrupted run does
(tests/test_resume.py).

Checkpoints inside an epoch (``begin`` and ``_after_update``): after any update, when
``train.checkpoint_every_minutes`` have passed since the last checkpoint on rank 0's clock, or when Ray Train
says a node of the group is being reclaimed (``launch.preemption_notice``, polled every
``PREEMPTION_POLL_S``). Rank 0 decides, one broadcast of a flag per update makes every rank agree. Such a
checkpoint also holds where the epoch stands on each rank (its loss sums, its loader's place in the data).
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from mae_ray import tracking
from mae_ray.cluster import checkpoints, faults, launch, system_metrics
from mae_ray.cluster.worker_spec import WorkerSpec
from mae_ray.errors import CheckpointError
from mae_ray.train import engine

# how often rank 0 asks Ray Train for a reclaim notice: as often as Ray Train's watcher asks Ray (5 s unless
# its variable says otherwise; clouds give 30 s to 2 min of notice)
PREEMPTION_POLL_S = float(os.environ.get("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S") or 5.0)
_TIMER, _POLL = 1, 2  # rank 0's decision after an update, broadcast to every rank


class RanksDivergedError(RuntimeError):
    """Data-parallel replicas no longer hold the same parameters: gradients are not being synchronised."""


class EpochLoop:
    def __init__(self, job: str, spec: WorkerSpec, *, epochs: int, checkpoint_every: int,
                 stateful: dict[str, Any], seed: int, plan: engine.StepPlan | None = None,
                 extra_state: dict[str, Any] | None = None, report_every_epoch: bool = True):
        """``stateful``: name -> object with ``state_dict``/``load_state_dict`` (model, optimiser, ...);
        its ``torch.nn.Module`` values are compared across ranks after every epoch. ``seed``: the job's seed.

        ``plan``: the epoch's updates on this group (its size and accumulation are logged every epoch).
        ``report_every_epoch=False`` reports to Ray only with checkpoints: Ray Train V2 takes one report
        per health-check interval (2 s), which dominates jobs whose epochs take milliseconds (cached
        linear probes). MLflow still gets every epoch.
        """
        self.job, self.spec, self.epochs = job, spec, epochs
        self.checkpoint_every, self.stateful = checkpoint_every, stateful
        self.extra_state = extra_state or {}
        self.plan = plan
        self.steps_per_epoch = plan.updates_per_epoch if plan is not None else 0
        self.report_every_epoch = report_every_epoch
        self.seed = seed
        self.rank, self.world_size = launch.world()
        state, self.resumed_from = checkpoints.latest_checkpoint(spec.resume_from)
        self.start_epoch, self.history, attempts = 0, [], []
        self.inside: dict[str, Any] | None = None  # where a checkpoint taken inside an epoch left it
        if state is not None:
            for name, obj in stateful.items():
                obj.load_state_dict(state[name])
            self.start_epoch, self.history = state["epoch"] + 1, list(state["history"])
            attempts = list(state.get("attempts", []))
            self.inside = state.get("in_epoch")
            if self.inside is not None:
                self.start_epoch = self.inside["epoch"]
        # where each attempt of this run started, and on how many workers: the record that a resume really
        # resumed, and of every resize of an elastic group
        self.attempts = [*attempts, {"start_epoch": self.start_epoch,
                                     "start_update": self.inside["updates"] if self.inside else 0,
                                     "resumed_from": self.resumed_from or "", "workers": self.world_size}]
        minutes = spec.config.train.checkpoint_every_minutes
        self.every_s = minutes * 60 if minutes else None
        self.watch_preemption = launch.preemption_watched()
        self.last_checkpoint = self.last_poll = self.held_since = time.monotonic()
        self.noticed: tuple | None = None  # the reclaim notice a checkpoint was taken for
        self.stalled_s = 0.0  # this epoch's time in checkpoints: what training waited for them
        self.device = None
        self.epoch_loader = None
        self.last_good = self.resumed_from
        self.logger = None
        if self.rank == 0:
            self.logger = tracking.EpochLogger(spec.tracking_uri, spec.run_id)
            self.logger.backfill(self.history)  # epochs a killed worker checkpointed but never logged
            if len(self.attempts) > 1:
                self.logger.set_tags({"mae_ray.attempts": attempts_text(self.attempts, self.steps_per_epoch)})
        self.system = system_metrics.start(spec) if self.start_epoch < epochs else None  # this node's, if first

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None

    def describe_group(self, batching) -> str:
        """The recipe's batching (``recipe.Batching``) as this group runs it."""
        plan = self.plan
        if plan is None or plan.group == plan.workers:
            return batching.describe()
        return (f"{plan.group} of {plan.workers} worker(s) (elastic) x batch {batching.batch_size} x accumulation "
                f"{plan.accumulation:.3g} = effective batch {batching.effective}")

    def describe_start(self) -> str:
        if not self.resumed:
            return "fresh start"
        inside = f", after its update {self.inside['updates']}" if self.inside else ""
        return f"resumed from {self.resumed_from} at epoch {self.start_epoch}{inside}"

    def remaining(self):
        """The epochs still to run; each begins with every RNG seeded from ``(seed, epoch, rank)`` (and
        ``engine.run_epoch`` seeds them again for every micro-batch: :meth:`begin`)."""
        for epoch in range(self.start_epoch, self.epochs):
            engine.seed_everything(self.seed, epoch, self.rank)
            yield epoch

    def begin(self, epoch: int, loader) -> engine.EpochControl:
        """Set ``loader`` to ``epoch``, from where a checkpoint inside it left off, and how ``engine.run_epoch``
        runs it: from that update, every micro-batch seeded, a checkpoint after an update when one is due."""
        start, first, positions = engine.Progress(), 0, None
        at = self.inside
        if at is not None and at["epoch"] == epoch and self.plan is not None:
            rows = at["ranks"]
            if at["workers"] == self.world_size:  # the same group: each rank exactly where it was
                loss_sum, seen, *positions = rows[self.rank]
                start = engine.Progress(at["updates"], loss_sum, int(seen))
            else:  # resized: the epoch's sums so far shared out; each rank's stream from its new place
                start = engine.Progress(at["updates"], sum(r[0] for r in rows) / self.world_size,
                                        sum(r[1] for r in rows) / self.world_size)
                positions = None
            first = self.plan.batches_before(start.updates)
        loader.set_epoch(epoch, first, [int(p) for p in positions] if positions else None)
        self.epoch_loader = loader
        return engine.EpochControl(start=start, reseed=functools.partial(engine.seed_everything, self.seed, epoch,
                                                                         self.rank),
                                   after_update=functools.partial(self._after_update, epoch))

    def _after_update(self, epoch: int, progress: engine.Progress) -> None:
        if self.plan is None or progress.updates >= self.plan.updates_per_epoch:
            return  # the epoch's end comes next, with its own checkpoint when due
        why = self._checkpoint_due()
        if why:
            self._checkpoint_inside(epoch, progress, why)

    def _checkpoint_due(self) -> str:
        """Why a checkpoint is due after this update ("" when none), the same on every rank."""
        if self.every_s is None and not self.watch_preemption:
            return ""
        flags, now = 0, time.monotonic()
        if self.rank == 0:
            flags |= _TIMER if self.every_s is not None and now - self.last_checkpoint >= self.every_s else 0
            flags |= _POLL if self.watch_preemption and now - self.last_poll >= PREEMPTION_POLL_S else 0
        flags = self._from_rank0(flags)
        if flags & _POLL:
            self.last_poll = now
            notice = launch.preemption_notice()  # a barrier: every rank calls it on the same update
            if notice is not None and (tuple(notice.preempted_node_ids), notice.deadline_ms) != self.noticed:
                self.noticed = (tuple(notice.preempted_node_ids), notice.deadline_ms)
                left = f", {notice.deadline_ms / 1000 - time.time():.0f} s left" if notice.deadline_ms else ""
                return (f"preemption notice: {len(notice.preempted_node_ids)} node(s) of rank(s) "
                        f"{notice.preempted_ranks} being reclaimed{left}")
        return f"{self.every_s / 60:g} min since the last checkpoint" if flags & _TIMER else ""

    def _from_rank0(self, value: int) -> int:
        if self.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return value
        self.device = self.device or launch.device()  # where the collectives run (NCCL: the GPU)
        flag = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(flag, src=0)
        return int(flag.item())

    def _checkpoint_inside(self, epoch: int, progress: engine.Progress, why: str) -> None:
        """A checkpoint after ``progress.updates`` of epoch ``epoch``'s updates, holding every rank's place."""
        positions = list(self.epoch_loader.positions) if self.epoch_loader is not None else []
        mine = torch.tensor([progress.loss_sum, float(progress.seen), *positions], dtype=torch.float64)
        rows = [mine]
        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            self.device = self.device or launch.device()
            here = mine.to(self.device)
            rows = [torch.empty_like(here) for _ in range(self.world_size)]
            dist.all_gather(rows, here)
        state = None
        if self.rank == 0:
            state = checkpoints.TrainingState(
                **{name: obj.state_dict() for name, obj in self.stateful.items()}, **self.extra_state,
                epoch=epoch - 1, step=epoch * self.steps_per_epoch + progress.updates, history=self.history,
                attempts=self.attempts, mlflow_run_id=self.spec.run_id,
                in_epoch={"epoch": epoch, "updates": progress.updates, "workers": self.world_size,
                          "ranks": [r.cpu().tolist() for r in rows], "why": why})
        self._report({"epoch": epoch, "update": progress.updates}, state, epoch, {}, checkpoint=True,
                     background=True, updates=progress.updates)
        self.last_good = checkpoints.checkpoint_location(epoch, progress.updates)
        self.say(f"checkpoint inside epoch {epoch + 1}, after update {progress.updates}/{self.steps_per_epoch} "
                 f"({why})")

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.job}] {text}", flush=True)

    def batches(self, loader, epoch: int, count: int):
        """``loader`` itself; under a test's ``mid_epoch`` fault, its batches with the fault fired half-way."""
        injected = self.spec.faults
        if not injected or "mid_epoch" not in injected:
            return loader
        return self._faulty(loader, injected, epoch, max(1, count // 2))

    def _faulty(self, loader, injected: str, epoch: int, at: int):
        for i, batch in enumerate(loader):
            if i == at and faults.maybe_fire(injected, "mid_epoch", epoch, self.rank, self.spec.output_dir) == "nan":
                _poke_first_parameter(self.stateful, float("nan"))  # the next step's loss is NaN
            yield batch

    def end_epoch(self, epoch: int, metrics: dict[str, float],
                  final_files: dict[str, Callable[[str], None]] | None = None) -> None:
        """Report ``metrics`` (a barrier: every rank calls it), checkpoint when due, log on rank 0."""
        spec, out = self.spec.faults, self.spec.output_dir
        if faults.maybe_fire(spec, "end_epoch", epoch, self.rank, out) == "desync":  # a test's: this rank drifts
            _poke_first_parameter(self.stateful, 1e-3)
        self.check_ranks_in_sync(epoch)
        metrics = {**metrics, "rss_mb": _rss_mb()}  # per-epoch memory: a leak shows as a rising line
        if self.plan is not None:  # the group this epoch ran on (an elastic group's size may change)
            metrics.update(workers=self.world_size, accumulation=self.plan.accumulation)
        metrics.update(self._spent())
        self.history.append({"epoch": epoch, **metrics})
        last = epoch == self.epochs - 1
        due = last or (epoch + 1) % self.checkpoint_every == 0  # the same on every rank
        state, files = None, {}
        if self.rank == 0 and due:
            state = checkpoints.TrainingState(
                **{name: obj.state_dict() for name, obj in self.stateful.items()}, **self.extra_state,
                epoch=epoch, step=(epoch + 1) * self.steps_per_epoch, history=self.history, attempts=self.attempts,
                mlflow_run_id=self.spec.run_id)
            files = (final_files or {}) if last else {}
            if last and set(files) != set(checkpoints.FINAL_FILES.get(self.job, ())):  # one owner of the format
                raise CheckpointError(f"{self.job} writes {sorted(files)} into its last checkpoint, but "
                                      f"checkpoints.FINAL_FILES says {checkpoints.FINAL_FILES.get(self.job)}")
        faults.maybe_fire(spec, "before_report", epoch, self.rank, out)
        if due or self.report_every_epoch:  # the run's result names the last checkpoint: that one is uploaded now
            self._report({"epoch": epoch, "epochs_done": epoch + 1, **metrics}, state, epoch, files, checkpoint=due,
                         background=not last)
        faults.maybe_fire(spec, "after_report", epoch, self.rank, out)
        self.inside = None
        if due or self.stalled_s:  # what this epoch's checkpoints held training up for, upload included or not
            metrics["checkpoint_s"] = round(self.stalled_s, 3)
            self.stalled_s = 0.0
        if state is not None:
            self.last_good = checkpoints.checkpoint_location(epoch)
        if self.logger is not None:
            self.logger.log_epoch(epoch, metrics)
            # epochs of milliseconds (cached linear probe: report_every_epoch=False) print every tenth
            every = 1 if self.report_every_epoch else max(1, self.epochs // 10)
            if last or (epoch + 1) % every == 0:
                shown = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
                self.say(f"epoch {epoch + 1}/{self.epochs} {shown}")
        if last:
            system_metrics.stop(self.system)
        launch.forward_report()  # in-process in a sweep trial: to Tune now (with Ray Train, its callback did)

    def _spent(self) -> dict[str, float]:
        """What the run's workers have held so far, its attempts together (``cpu_hours``: CPU-core-hours, or
        ``gpu_hours``) and, with a price (``cost.*``), ``cost``: this epoch's wall time on rank 0 x the group's size
        x each worker's units, added to the last epoch's. Not counted: Ray Train's start of a group, and what an
        attempt did after its last epoch (lost with it)."""
        key, units, price = self.spec.config.spend()
        now = time.monotonic()
        before = self.history[-1].get(key, 0.0) if self.history else 0.0
        hours = before + (now - self.held_since) * self.world_size * units / 3600
        self.held_since = now
        return {key: hours, **({"cost": hours * price} if price is not None else {})}

    def _report(self, metrics: dict[str, Any], state, epoch: int, files, *, checkpoint: bool, background: bool,
                updates: int | None = None) -> None:
        """``checkpoints.report``, timed (``checkpoint_s``); an upload that fails names the last good checkpoint."""
        started = time.perf_counter()
        storage = self.spec.config.storage
        try:
            checkpoints.report(metrics, state, epoch, files, retry_s=storage.upload_retry_s, updates=updates,
                               background=background and storage.upload_in_background, last_good=self.last_good)
        except CheckpointError as e:  # storage full or read-only: say which checkpoint still holds
            if "last good checkpoint" in str(e):
                raise
            raise CheckpointError(f"{e}; last good checkpoint: {self.last_good or 'none'}") from None
        if checkpoint:  # every rank waits for it: the report is a barrier
            self.stalled_s += time.perf_counter() - started
            self.last_checkpoint = time.monotonic()

    def check_ranks_in_sync(self, epoch: int) -> None:
        """Every rank's parameters, bit for bit, equal rank 0's; else raise naming the epoch and the tensors.

        A collective: all ranks call it. Data-parallel training that lost its gradient all-reduce (no
        DDP wrapper, a ``no_sync`` left on) still lowers the loss on each rank, so only this shows it.
        """
        if self.world_size < 2 or not (dist.is_available() and dist.is_initialized()):
            return
        for name, module in self.stateful.items():
            if not isinstance(module, torch.nn.Module):
                continue
            mine = engine.param_fingerprint(module)
            every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(every, mine)
            differ = sorted({i for other in every[1:] for i in (other != every[0]).nonzero().flatten().tolist()})
            if differ:
                names = [n for i, (n, _) in enumerate(module.named_parameters()) if i in differ]
                raise RanksDivergedError(
                    f"ranks diverged after epoch {epoch}: {self.job} {name!r} differs between ranks in "
                    f"{len(differ)} tensor(s) ({', '.join(names[:3])}...): gradients are not synchronised")

    def finish(self, retries: int = 6, wait_s: float = 5.0) -> None:
        """Send metrics still pending (MLflow was unreachable); wait a little for it, then name what is lost."""
        if self.logger is None:
            return
        for _ in range(retries):
            if self.logger.flush():
                return
            time.sleep(wait_s)
        if not self.logger.flush():
            lost = sorted({m.step for m in self.logger.pending})
            self.say(f"warning: MLflow unreachable: {len(self.logger.pending)} metric values of epoch(s) {lost} "
                     f"are not in run {self.spec.run_id}; the checkpoints' history holds them")


def attempts_text(attempts: list[dict[str, Any]], updates_per_epoch: int) -> str:
    """Every (re)start of a run in one line a person reads in MLflow: where it started, on how many workers,
    and for each resize from how many to how many, and why (as far as the worker count says)."""
    parts = []
    for before, now in zip([None, *attempts], attempts, strict=False):
        inside = now.get("start_update", 0)
        where = (f"epoch {now['start_epoch']}{f' after its update {inside}' if inside else ''} "
                 f"(update {now['start_epoch'] * updates_per_epoch + inside})")
        workers = now.get("workers")
        if before is None:
            parts.append(f"started at {where} on {workers} worker(s)")
            continue
        was = before.get("workers")
        if was is None or workers is None or was == workers:
            parts.append(f"restarted at {where} on {workers} worker(s)")
        else:
            why = "grew: room for more workers" if workers > was else "shrank: a worker or its node was lost"
            parts.append(f"resized {was} -> {workers} worker(s) at {where}, {why}")
    return "; ".join(parts)


def _poke_first_parameter(stateful: dict[str, Any], delta: float) -> None:
    """Fault injection only: add ``delta`` to one value of the first module's first parameter."""
    module = next(m for m in stateful.values() if isinstance(m, torch.nn.Module))
    with torch.no_grad():
        next(module.parameters()).view(-1)[0] += delta


def _rss_mb() -> float:
    """Resident memory of this worker and its DataLoader processes, in MiB."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # a loader process that just exited
            pass
    return round(total / 2**20, 1)


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
