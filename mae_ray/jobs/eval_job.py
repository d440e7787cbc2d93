"""Driver of an evaluation job (linear probe or fine-tune), shared by both.

Each evaluation is its own MLflow run with its params and curves; when the encoder came from a
pre-training run of this tracking store, that run is its parent (``mlflow.parentRunId``) and also
receives the final ``<job>_top1`` / ``<job>_top5`` — so the pre-training run is the one row users
compare. A pre-training run of another store (or of none) is only named, in the ``mae_ray.encoder_*``
tags and result.json's ``encoder_run_id``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from mae_ray import tracking
from mae_ray.cluster import checkpoints
from mae_ray.cluster.worker_spec import WorkerSpec
from mae_ray.config import Config
from mae_ray.jobs import lifecycle
from mae_ray.jobs.encoders import EncoderSource, in_store, resolve_encoder

WHAT = {"linprobe": "linear probe", "finetune": "fine-tuning"}
# settings that describe only a pre-training: on an evaluation of a random-init encoder they describe nothing,
# and a sweep's table would otherwise show the base config's mask ratio on its random-init row
PRETRAINING_ONLY = ("model.mask_ratio", "model.norm_pix_loss", "model.mask_token_in_encoder", "model.mask_sampling",
                    "model.decoder_embed_dim", "model.decoder_depth", "model.decoder_num_heads", "model.target",
                    "model.pca_components", "model.pca_fit_images", "train.epochs")


def encoder_params(found: EncoderSource) -> dict[str, str]:
    """An evaluation run's params beyond its config: the encoder, and for a random-init one, its pre-training
    settings marked as not applying."""
    not_used = dict.fromkeys(PRETRAINING_ONLY, tracking.NOT_PRETRAINED) if found.state is None else {}
    return {"eval.encoder": found.label, **not_used}


def run_eval(job: str, cfg: Config, train_loop: Callable[[WorkerSpec], None], *,
             source: EncoderSource | None = None, verbose: bool = False, resume_from: str | None = None
             ) -> dict[str, Any]:
    """``resume_from``: a checkpoint of a stopped run of this job, continued in the same MLflow run."""
    name = cfg.mlflow.run_name or f"{job}-{os.path.basename(os.path.abspath(cfg.output_dir).rstrip('/'))}"

    def setup(cfg: Config, uri: str) -> lifecycle.Setup:
        classes = lifecycle.num_classes(cfg)
        # the dearest check (builds the model); the parent run only if it is in this store (encoders.in_store)
        found = in_store(source, uri) if source else resolve_encoder(cfg.eval.checkpoint, cfg, uri)
        return lifecycle.Setup(
            f"[{job}] encoder: {found.label}  outputs: {cfg.output_dir}  mlflow: {tracking.redact(uri)}",
            params=encoder_params(found), tags={**found.tags(), "mae_ray.job": job},
            parent_run_id=found.parent_run_id, evaluation=lifecycle.Evaluation(found, classes))

    def summarize(result, run_id: str, uri: str, setup: lifecycle.Setup):
        found = setup.evaluation.source
        metrics = lifecycle.numeric(result.metrics)
        final = {f"{job}_top1": metrics["val_top1"], f"{job}_top5": metrics["val_top5"]}
        logged = {run_id: final, **({found.parent_run_id: final} if found.parent_run_id else {})}
        return {**final, "encoder": found.label, "parent_run_id": found.parent_run_id,
                "encoder_run_id": found.origin_run_id, "checkpoint": checkpoints.location(result.checkpoint),
                "num_classes": setup.evaluation.num_classes, "metrics": metrics}, logged

    plan = lifecycle.JobPlan(job, WHAT[job], train_loop, name, setup, summarize, need_val=True)
    return lifecycle.run_job(cfg, plan, verbose=verbose, resume_from=resume_from)
