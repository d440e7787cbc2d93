"""One sweep trial, the Tune function every trial runs (:func:`trial`): pre-train (rank-0 reports forwarded to
Tune), evaluate, report. A trial restarted after its driver was killed reuses what it had finished
(:func:`done`), in its folder or in the sweep's shared storage, so nothing runs twice and no MLflow run is
duplicated (:func:`_trial_run` finds its run again by the ``sweep.trial_id`` tag).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from mlflow import MlflowClient
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from mae_ray import provenance, redaction, tracking
from mae_ray.config import Config
from mae_ray.jobs import evaluate, lifecycle, pretrain
from mae_ray.jobs.encoders import EncoderSource, resolve_encoder
from mae_ray.jobs.eval_job import encoder_params
from mae_ray.jobs.evaluate import SPENT
from mae_ray.jobs.files import read_json, write_json
from mae_ray.jobs.sweep_config import EVAL_JOBS, SweepConfig, trial_config, trial_jobs, trial_label

NOTE = "mlflow.note.content"  # the run's description in the MLflow UI


# --------------------------------------------------------------------------- one trial
def trial(params: dict[str, Any], *, base: Config, sweep_dir: str, uri: str, parent_run_id: str,
          sweep: dict[str, Any], hidden: dict[str, dict[str, Any]] | None = None) -> None:
    """Tune function: pre-train (reports forwarded to Tune), evaluate, report the final metrics.

    ``params`` are the values Tune shows (credentials redacted, see :func:`hide_secrets`); ``hidden``
    maps them back to the real ones, which reach this function through the object store only.
    """
    redaction.install()  # a trial actor's console, like a Ray Train worker's
    trial_id = tune.get_context().get_trial_id()
    os.environ[provenance.COMMAND_ENV] = sweep.get("command", "")  # the sweep's, on whichever node this runs
    real = {k: (hidden or {}).get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in params.items()}
    cfg = trial_config(real, base, sweep["cases"])
    cfg.output_dir = os.path.join(sweep_dir, "trials", trial_id)
    cfg.mlflow.tracking_uri, cfg.mlflow.run_name = uri, trial_id
    shared = sweep.get("shared")  # the sweep's folder in storage_path: where any node finds this trial again
    if shared and not cfg.ray.storage_path:
        cfg.ray.storage_path = f"{shared}/checkpoints"
    record = f"{shared}/trials/{trial_id}" if shared else None
    label = trial_label(params)  # the MLflow name: what this trial varies (its folders keep the trial id)
    run_id = _trial_run(uri, cfg, parent_run_id, trial_id, params, label, sweep)
    final: dict[str, Any] = {"mlflow_run_id": run_id}
    pretrained: dict[str, Any] = {}  # the pre-training's final metrics
    with lifecycle.Ending(uri, run_id):  # FINISHED once evaluated; an error in any of its jobs: FAILED
        if sweep["pretrain"]:
            # A trial restarted after its driver was killed picks up what it had finished: nothing runs twice.
            summary = done(cfg.output_dir, record)
            if summary is None:  # the pre-training runs in the trial's run, and leaves ending it to this block
                summary = pretrain.run(cfg, run_id=run_id, continue_existing=True, callbacks=[TuneReportCallback()])
                keep(record, summary)
            pretrained = summary["metrics"]
            final.update(train_loss=pretrained.get("train_loss"), knn_top1=pretrained.get("knn_top1"))
            checkpoint = summary["checkpoint"]
        else:
            checkpoint = cfg.eval.checkpoint
        jobs, scores = trial_jobs(sweep, params), {}
        if jobs:
            scores = _trial_evaluations(cfg, checkpoint, jobs, run_id, uri, label, trial_id, sweep, record)
            final.update({k: v for k, v in scores.items() if k.startswith(EVAL_JOBS) and not k.endswith("_run_id")})
        spent = totals(cfg, pretrained, scores)
        tracking.log_values(uri, run_id, spent)  # beside its accuracies: what the trial cost, all its jobs together
        final.update(spent)
        tracking.EpochLogger(uri, run_id).set_tags({"sweep.status": "finished"})
    # the scheduler's time (``epochs_done``, as in every epoch's report): a finished trial has run all its epochs
    final["epochs_done"] = cfg.train.epochs if sweep["pretrain"] else 1
    tune.report({k: v for k, v in final.items() if v is not None})


def _trial_evaluations(cfg: Config, checkpoint: str, jobs: tuple[str, ...], run_id: str, uri: str, label: str,
                       trial_id: str, sweep: dict[str, Any], record: str | None) -> dict[str, Any]:
    """The trial's evaluations of ``checkpoint`` (each through ``evaluate.run``), or what a restarted trial had
    finished of them; their scores go to the trial's run."""
    eval_dir = os.path.join(cfg.output_dir, "eval")
    eval_cfg = cfg.override(f"output_dir={eval_dir}", f"eval.checkpoint={checkpoint}")
    where = record and f"{record}/eval"
    scores = done(eval_dir, where)
    if scores is not None:
        return scores
    source = resolve_encoder(checkpoint, eval_cfg, uri)
    if not sweep["pretrain"]:  # scores go to this trial's run, not to the shared encoder's run
        source.origin_run_id = source.origin_run_id or source.parent_run_id
        source.parent_run_id = run_id
    named = _Named(uri, label, trial_id, sweep["name"])
    scores = _evaluate(eval_cfg, source, jobs, sweep.get("best_of") or {}, named, where)
    if sweep.get("best_of"):  # the trial's run shows the best, after the values each length logged there
        tracking.log_values(uri, run_id, {k: v for k, v in scores.items() if k in _BEST_KEYS or "_best_" in k})
    keep(where, scores)
    return scores


RANDOM_INIT = "random-init"  # the baseline's run name, and its row in the sweep's table


def random_baseline(sweep: SweepConfig, base: Config, sweep_dir: str, shared: str | None, uri: str, parent: str,
                    verbose: bool, command: str = "") -> dict[str, Any] | None:
    """The same architecture at random initialisation, evaluated as the trials are (``evaluate.run``), as one
    run under the sweep's, like a trial's: its linear probe is the row every MAE trial must beat, its
    fine-tuning is training from scratch on the trials' budget. Both are child runs; their top-1 is logged on
    it (None when the sweep has no baseline). A --resume reuses a finished one and finds its run again."""
    jobs = tuple(j for j in EVAL_JOBS if getattr(sweep, j))
    if not (sweep.random_baseline and jobs):
        return None
    os.environ[provenance.COMMAND_ENV] = command  # the sweep's, in this Ray worker
    out = os.path.join(sweep_dir, "random_baseline")
    record = shared and f"{shared}/random_baseline"
    earlier = done(out, record)
    if earlier and earlier.get("mlflow_run_id"):
        return earlier
    cfg = base.override(f"output_dir={out}", "eval.checkpoint=random", f"mlflow.run_name={RANDOM_INIT}")
    cfg.mlflow.tracking_uri = uri
    source = EncoderSource(None, cfg.model.kwargs(), None, "random")
    run_id = _baseline_run(uri, cfg, parent, source, sweep.name)
    source.parent_run_id = run_id  # its evaluations are its children, and log their top-1 on it
    with lifecycle.Ending(uri, run_id):
        scores = evaluate.run(cfg, source=source, skip=tuple(j for j in EVAL_JOBS if j not in jobs), verbose=verbose)
        notes = {"linprobe": "Linear probe of the encoder at random initialisation: the row MAE trials must beat.",
                 "finetune": "Fine-tuning from random initialisation (training from scratch) with the trials' "
                             "budget: what MAE initialisation is compared with."}
        for job in jobs:
            tracking.EpochLogger(uri, scores[f"{job}_run_id"]).set_tags(
                {"mlflow.runName": f"{job} · {RANDOM_INIT}", NOTE: notes[job]})
        spent = totals(cfg, {}, scores)
        tracking.log_values(uri, run_id, spent)
    summary = {**scores, **spent, "mlflow_run_id": run_id}
    write_json(os.path.join(out, "result.json"), summary)
    keep(record, summary)
    return summary


def _baseline_run(uri: str, cfg: Config, parent: str, source: EncoderSource, sweep_name: str) -> str:
    """The baseline's MLflow run under the sweep's ``parent``: found again after a restart, else created. Its
    params say which pre-training settings it does not have (``eval_job.encoder_params``)."""
    found = _tagged_run(uri, cfg.mlflow.experiment, "sweep.random_init", parent)
    if found:
        return found
    tags = {**tracking.run_tags(), "mae_ray.job": "random-init", "sweep.random_init": parent,
            NOTE: f"The encoder at random initialisation, evaluated as the trials of sweep {sweep_name} are: the "
                  "reference every MAE trial is compared with. Its linear probe and fine-tuning are child runs; their "
                  "top-1 is also logged here."}
    params = {**tracking.params_from_config(cfg.flatten()), **encoder_params(source)}
    return lifecycle.open_run(uri, cfg.mlflow.experiment, RANDOM_INIT, params, tags, parent_run_id=parent)


def totals(cfg: Config, pretraining: dict[str, Any], scores: dict[str, Any]) -> dict[str, float]:
    """What a trial's jobs held together: ``total_cpu_hours`` (or ``total_gpu_hours``) and, with a price,
    ``total_cost``; from its pre-training's final metrics and its evaluations' ``<job>_cpu_hours`` / ``_cost``."""
    key = cfg.spend()[0]
    parts = [pretraining, *({k: scores.get(f"{job}_{k}") for k in SPENT} for job in EVAL_JOBS)]
    out = {}
    for name in (key, "cost"):
        values = [p.get(name) for p in parts if isinstance(p.get(name), (int, float))]
        if values:
            out[f"total_{name}"] = float(sum(values))
    return out


_BEST_KEYS = {f"{job}_{what}" for job in EVAL_JOBS for what in ("top1", "top5")}


def _evaluate(cfg: Config, source, jobs: tuple[str, ...], best_of: dict[str, list], named: _Named,
              record: str | None) -> dict[str, Any]:
    """A trial's evaluations (``jobs``, each through ``evaluate.run``); the one job ``best_of`` names runs once
    per value of its key, in folders and MLflow runs of their own, and the best value's scores are the trial's
    (``<job>_top1``), with each value's top-1 beside them (``finetune_top1_epochs_50``, ...) and which won
    (``finetune_best_epochs``). A restarted trial reuses the values it had finished."""
    (key, values), = best_of.items() if best_of else ((None, ()),)
    varied = key.split(".")[0] if key else None
    once = tuple(j for j in jobs if j != varied)
    scores: dict[str, Any] = {}
    if once:
        scores = evaluate.run(cfg, source=source, skip=tuple(j for j in EVAL_JOBS if j not in once))
        named(scores, "")
    if varied not in jobs:
        return scores
    short, tried = key.rsplit(".", 1)[-1], []
    for value in values:
        folder = os.path.join(cfg.output_dir, f"{varied}_{short}_{value}")
        own = [f"output_dir={folder}", f"{key}={json.dumps(value)}"]
        if cfg.mlflow.run_name:  # a checkpoint folder of its own under a shared ray.storage_path
            own.append(f"mlflow.run_name={cfg.mlflow.run_name}-{short}{value}")
        where = record and f"{record}/{varied}_{short}_{value}"
        result = done(folder, where)
        if result is None:
            result = evaluate.run(cfg.override(*own), source=source,
                                  skip=tuple(j for j in EVAL_JOBS if j != varied))
            named(result, f", {short}={value}")
            keep(where, result)
        tried.append((value, result))
        scores[f"{varied}_top1_{short}_{value}"] = result[f"{varied}_top1"]
    value, best = max(tried, key=lambda t: t[1][f"{varied}_top1"])
    scores.update({k: v for k, v in best.items() if k.startswith(varied)})
    for k in SPENT:  # what every value's run held, not the best's alone
        held = [r[f"{varied}_{k}"] for _, r in tried if isinstance(r.get(f"{varied}_{k}"), (int, float))]
        if held:
            scores[f"{varied}_{k}"] = sum(held)
    scores[f"{varied}_best_{short}"] = value
    return scores


def done(folder: str, shared: str | None = None) -> dict[str, Any] | None:
    """The result.json of a job that already finished in ``folder`` (or whose copy is in ``shared``), if any."""
    return read_json(os.path.join(folder, "result.json")) or (shared and read_json(f"{shared}/result.json"))


def keep(shared: str | None, summary: dict[str, Any]) -> None:
    if shared:
        write_json(f"{shared}/result.json", summary)


def _trial_run(uri: str, cfg: Config, parent_run_id: str, trial_id: str, params: dict[str, Any], label: str,
               sweep: dict[str, Any]) -> str:
    """The trial's MLflow run: found again after a restore (so never duplicated), else created."""
    found = _tagged_run(uri, cfg.mlflow.experiment, "sweep.trial_id", trial_id)
    if found:
        return found
    tags = {**tracking.run_tags(), "sweep.trial_id": trial_id, "sweep.params": tracking.redact(json.dumps(params))}
    varied = tracking.redact(label)
    if sweep["pretrain"]:
        tags[NOTE] = (f"Trial {trial_id} of sweep {sweep['name']}: MAE pre-training with {varied}. Its linear "
                      "probe and fine-tuning are child runs; their top-1 is also logged here.")
    else:
        tags.update({"mae_ray.job": "evaluation-trial", "mae_ray.encoder_source": tracking.redact(cfg.eval.checkpoint),
                     NOTE: f"Trial {trial_id} of sweep {sweep['name']}: evaluation of one fixed encoder, {varied}."})
    return lifecycle.open_run(uri, cfg.mlflow.experiment, varied, tracking.params_from_config(cfg.flatten()), tags,
                              parent_run_id=parent_run_id)


def _tagged_run(uri: str, experiment: str, tag: str, value: str) -> str | None:
    """The run of ``experiment`` whose ``tag`` is ``value`` (a trial's or the baseline's, after a restart)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found = exp and client.search_runs([exp.experiment_id], filter_string=f"tags.`{tag}` = '{value}'")
    return found[0].info.run_id if found else None


@dataclass
class _Named:
    """Names a trial's evaluation runs ``linprobe · mask_ratio=0.75`` in the UI, each with a description."""

    uri: str
    label: str
    trial_id: str
    sweep_name: str

    def __call__(self, scores: dict[str, Any], suffix: str) -> None:
        what = {"linprobe": "Linear probe (frozen encoder)", "finetune": "End-to-end fine-tuning"}
        for job, text in what.items():
            run_id = scores.get(f"{job}_run_id")
            if run_id:
                label = tracking.redact(self.label + suffix)
                tracking.EpochLogger(self.uri, run_id).set_tags({
                    "mlflow.runName": f"{job} · {label}",
                    NOTE: f"{text} of trial {self.trial_id}'s encoder ({label}), sweep {self.sweep_name}."})
