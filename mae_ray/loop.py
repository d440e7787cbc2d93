"""The worker side of every training job's epoch loop: resume, report, checkpoint, log once.

A job builds its model and optimiser, hands the objects that carry state to ``EpochLoop``, and calls
``end_epoch`` after each epoch. ``EpochLoop`` resumes from the newest checkpoint (see
``launch.latest_checkpoint``), reports every epoch to Ray, writes a checkpoint when one is due, and
has rank 0 log the epoch to MLflow exactly once, also across restarts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mae_ray import engine, faults, launch, tracking


class EpochLoop:
    def __init__(self, job: str, loop_config: dict[str, Any], *, epochs: int, checkpoint_every: int,
                 stateful: dict[str, Any], steps_per_epoch: int = 0, extra_state: dict[str, Any] | None = None,
                 report_every_epoch: bool = True):
        """``stateful``: name -> object with ``state_dict``/``load_state_dict`` (model, optimiser, ...).

        ``report_every_epoch=False`` reports to Ray only with checkpoints: Ray Train V2 takes one report
        per health-check interval (2 s), which dominates jobs whose epochs take milliseconds (cached
        linear probes). MLflow still gets every epoch.
        """
        self.job, self.config, self.epochs = job, loop_config, epochs
        self.checkpoint_every, self.stateful = checkpoint_every, stateful
        self.extra_state = extra_state or {}
        self.steps_per_epoch = steps_per_epoch
        self.report_every_epoch = report_every_epoch
        self.rank, self.world_size = launch.world()
        state, self.resumed_from = launch.latest_checkpoint(loop_config.get("resume_from"))
        self.start_epoch, self.history = 0, []
        if state is not None:
            for name, obj in stateful.items():
                obj.load_state_dict(state[name])
            engine.set_rng_state(state["rng"])
            self.start_epoch, self.history = state["epoch"] + 1, list(state["history"])
        self.last_good = self.resumed_from
        self.logger = None
        if self.rank == 0:
            self.logger = tracking.EpochLogger(loop_config["tracking_uri"], loop_config["run_id"])
            self.logger.backfill(self.history)  # epochs a killed worker checkpointed but never logged

    @property
    def resumed(self) -> bool:
        return self.resumed_from is not None

    def describe_start(self) -> str:
        return f"resumed from {self.resumed_from} at epoch {self.start_epoch}" if self.resumed else "fresh start"

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.job}] {text}", flush=True)

    def end_epoch(self, epoch: int, metrics: dict[str, float],
                  final_files: dict[str, Callable[[str], None]] | None = None) -> None:
        """Report ``metrics`` (a barrier: every rank calls it), checkpoint when due, log on rank 0."""
        self.history.append({"epoch": epoch, **metrics})
        last = epoch == self.epochs - 1
        due = last or (epoch + 1) % self.checkpoint_every == 0  # the same on every rank
        state, files = None, {}
        if self.rank == 0 and due:
            state = {name: obj.state_dict() for name, obj in self.stateful.items()}
            state.update(self.extra_state, epoch=epoch, step=(epoch + 1) * self.steps_per_epoch,
                         rng=engine.rng_state(), history=self.history,
                         mlflow_run_id=self.config["run_id"])
            files = (final_files or {}) if last else {}
        spec, out = self.config.get("faults"), self.config["output_dir"]
        faults.maybe_fire(spec, "before_report", epoch, self.rank, out)
        if due or self.report_every_epoch:
            launch.report({"epoch": epoch, **metrics}, state, epoch, files)
        faults.maybe_fire(spec, "after_report", epoch, self.rank, out)
        if state is not None:
            self.last_good = launch.checkpoint_location(epoch)
        if self.logger is not None:
            self.logger.log_epoch(epoch, metrics)
            shown = " ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
            self.say(f"epoch {epoch + 1}/{self.epochs} {shown}")

    def finish(self) -> None:
        if self.logger is not None and not self.logger.flush():
            self.say(f"warning: {len(self.logger.pending)} metric values could not reach MLflow")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
