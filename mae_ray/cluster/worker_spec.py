"""What a job's driver hands each of its Ray Train workers: one frozen, typed spec.

It travels through the object store (``launch.run_trainer``), not in Ray Train's ``train_loop_config``:
Ray keeps that verbatim in its run records, and the config holds URLs that may carry credentials.
The config inside is the driver's, parsed and validated once; workers never rebuild it from a dict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray

from mae_ray.config import Config


@dataclass(frozen=True)
class WorkerSpec:
    config: Config
    tracking_uri: str  # the MLflow store rank 0 logs each epoch to
    run_id: str  # the MLflow run the driver created (or a sweep trial, or --resume-from, named)
    output_dir: str  # absolute; pictures and fault-injection markers go here
    faults: str | None = None  # MAE_RAY_FAULTS of the driver, tests only (cluster/faults.py)
    verbose: bool = False
    resume_from: str | None = None  # a checkpoint to start from when the run has none of its own
    # evaluation jobs: the encoder's weights (an ObjectRef of its state dict; None: random init), its
    # architecture, the number of classes
    encoder: Any = None
    model_kwargs: dict[str, Any] | None = None
    num_classes: int | None = None

    def encoder_state(self) -> dict[str, Any] | None:
        """The encoder's state dict from the object store; None for a random-init evaluation."""
        return None if self.encoder is None else ray.get(self.encoder)
