"""Driver of an evaluation job (linear probe or fine-tune), shared by both.

Each evaluation is its own MLflow run with its params and curves; when the encoder came from a
pre-training run of this tracking store, that run is its parent (``mlflow.parentRunId``) and also
receives the final ``<job>_top1`` / ``<job>_top5`` — so the pre-training run is the one row users
compare. A pre-training run of another store (or of none) is only named, in the ``mae_ray.encoder_*``
tags and result.json's ``encoder_run_id``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from mae_ray import tracking
from mae_ray.cluster import checkpoints
from mae_ray.config import Config
from mae_ray.jobs import driver
from mae_ray.jobs.encoders import EncoderSource, in_store, resolve_encoder

WHAT = {"linprobe": "linear probe", "finetune": "fine-tuning"}


def run_eval(job: str, cfg: Config, train_loop: Callable[[dict], None], *, source: EncoderSource | None = None,
             verbose: bool = False, resume_from: str | None = None) -> dict[str, Any]:
    """``resume_from``: a checkpoint of a stopped run of this job, continued in the same MLflow run."""
    # Every check before anything is written or Ray starts: a refused job leaves no trace.
    run_id = checkpoints.load_state(resume_from).get("mlflow_run_id") if resume_from else None  # bad path: fails now
    uri = driver.prepare(cfg, need_val=True, write=False)
    classes = driver.num_classes(cfg)
    name = cfg.mlflow.run_name or f"{job}-{os.path.basename(cfg.output_dir.rstrip('/'))}"
    if not resume_from:
        driver.refuse_existing(cfg, name)
    # the dearest check (builds the model); the parent run only if it is in this store (encoders.in_store)
    source = in_store(source, uri) if source else resolve_encoder(cfg.eval.checkpoint, cfg, uri)
    print(f"[{job}] encoder: {source.label}  outputs: {cfg.output_dir}  mlflow: {tracking.redact(uri)}", flush=True)
    with driver.ray_session(cfg, verbose):
        import ray

        driver.write_config(cfg)  # once the cluster is known to fit the request

        params = tracking.params_from_config(cfg.flatten())
        params["eval.encoder"] = source.label
        tags = {**tracking.run_tags(), **source.tags(), "mae_ray.job": job}
        if run_id is None:
            run_id = tracking.start_run(uri, cfg.mlflow.experiment, name, params, tags,
                                        parent_run_id=source.parent_run_id)
        start = time.time()
        result = driver.fit(train_loop, cfg, name=name, uri=uri, run_id=run_id, verbose=verbose, what=WHAT[job],
                          encoder=ray.put(source.state), model_kwargs=source.model_kwargs, num_classes=classes,
                          resume_from=resume_from)
    metrics = driver.numeric(result.metrics)
    final = {f"{job}_top1": metrics["val_top1"], f"{job}_top5": metrics["val_top5"]}
    tracking.log_values(uri, run_id, final)
    if source.parent_run_id:
        tracking.log_values(uri, source.parent_run_id, final)
    tracking.end_run(uri, run_id, "FINISHED")
    summary = {**final, "encoder": source.label, "mlflow_run_id": run_id, "parent_run_id": source.parent_run_id,
               "encoder_run_id": source.origin_run_id,
               "checkpoint": result.checkpoint.path, "num_classes": classes, "metrics": metrics,
               "wall_time_s": round(time.time() - start, 1)}
    driver.write_result(cfg.output_dir, summary)
    return summary
