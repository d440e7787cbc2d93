"""Ray Tune sweeps over any config key: ``python -m mae_ray.sweep --config SWEEP.yaml [--resume] [--set ...]``.

Each trial is a Tune function with a small CPU share that runs pre-training as its own TorchTrainer
(named after the trial), forwarding rank-0 reports to Tune with ``TuneReportCallback``, then the
evaluation (linear probe, fine-tune) and a final report. ASHA stops weak trials early on the online
``knn_top1`` (not on the reconstruction loss, which the paper shows does not rank representations).
MLflow: one parent run per sweep, one child run per trial (its pre-training run). ``--resume``
restores the Tune experiment: finished trials are not re-run, no MLflow run is duplicated.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from mae_ray.cli import guarded, job_parser, quiet_logs
from mae_ray.config import Config, from_dict, load_config
from mae_ray.errors import ConfigError

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass
class SchedulerConfig:
    type: str = "asha"  # asha | none
    metric: str = "knn_top1"
    mode: str = "max"
    grace_period: int = 2
    reduction_factor: float = 2.0


@dataclass
class SweepConfig:
    base: str = ""  # run config the trials start from (relative to the sweep file)
    name: str = "sweep"
    overrides: dict = field(default_factory=dict)  # dotted keys applied to the base for every trial
    search: dict = field(default_factory=dict)  # dotted key -> {grid|choice|uniform|loguniform|randint: ...}
    num_samples: int = 1
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.2  # the trial function itself; its Train workers ask for ray.* resources
    metric: str = "linprobe_top1"
    mode: str = "max"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    linprobe: bool = True
    finetune: bool = True
    random_baseline: bool = True  # linear-probe a random-init encoder once, as the table's reference row
    output_dir: str = "outputs/sweeps"  # local: report, plots, trial outputs, resume state
    storage_path: str | None = None  # Tune's experiment state: None = under output_dir; s3://... on clusters
    # Settings that only make sense together (Table 1f: block 50 %, grid 75 %): label -> {dotted key: value},
    # searched as one grid axis named "case".
    cases: dict = field(default_factory=dict)
    # The paper's numbers on this sweep's one axis: value -> {linprobe_top1: .., finetune_top1: ..};
    # the report prints them beside the measured ones.
    paper: dict = field(default_factory=dict)


def load_sweep(path: str, overrides: list[str]) -> tuple[SweepConfig, dict[str, Any]]:
    """The sweep config and the trials' base run config (as a dict), both validated before Ray starts."""
    from mae_ray.config import _flatten, _parse_override, _read_yaml, _set_dotted

    data = _read_yaml(path)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(data, key, value)
    sweep = from_dict(SweepConfig, data)
    if sweep.cases:
        if CASE in sweep.search:
            raise ConfigError(f"{path}: '{CASE}' is the axis 'cases' makes: do not also list it under search")
        sweep.search = {CASE: {"grid": [str(label) for label in sweep.cases]}, **sweep.search}
    if not sweep.base:
        raise ConfigError(f"{path}: 'base' must name the run config the trials start from")
    base_path = sweep.base if os.path.isabs(sweep.base) else os.path.join(os.path.dirname(path), sweep.base)
    flat_overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in _flatten(sweep.overrides)]
    base = load_config(base_path, flat_overrides)
    for key, spec in sweep.search.items():
        kind, values = _space_entry(key, spec)
        if key == CASE:  # every case is a valid config
            for label in values:
                load_config(None, case_overrides(sweep.cases, label), base=base.to_dict())
            continue
        sample = values[0] if isinstance(values, list) else values
        load_config(None, [f"{key}={json.dumps(sample)}"], base=base.to_dict())  # the key and its type exist
    _check_paper(sweep, path)
    if sweep.scheduler.type not in ("asha", "none"):
        raise ConfigError(f"scheduler.type must be asha or none, got {sweep.scheduler.type!r}")
    if sweep.scheduler.type == "asha" and sweep.scheduler.metric == "knn_top1" and base.train.knn_every != 1:
        raise ConfigError("ASHA on knn_top1 needs the kNN monitor every epoch: set train.knn_every=1 in overrides")
    return sweep, base.to_dict()


CASE = "case"
PAPER_METRICS = ("linprobe_top1", "finetune_top1")


def case_overrides(cases: dict[str, Any], label: str) -> list[str]:
    """``--set`` items of one case (a mapping of dotted keys to values)."""
    from mae_ray.config import _flatten

    spec = {str(k): v for k, v in cases.items()}.get(label)
    if not isinstance(spec, dict) or not spec:
        raise ConfigError(f"cases.{label}: expected a mapping of dotted config keys to values, got {spec!r}")
    return [f"{k}={json.dumps(v)}" for k, v in _flatten(spec)]


def axis_label(value: Any) -> str:
    """How an axis value is written in a sweep file's ``paper:`` keys (YAML's true/false for booleans)."""
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _check_paper(sweep: SweepConfig, path: str) -> None:
    """``paper:`` needs one axis, and each of its keys must be a value of that axis (a typo fails here)."""
    if not sweep.paper:
        return
    if len(sweep.search) != 1:
        raise ConfigError(f"{path}: 'paper' needs exactly one search axis, got {', '.join(sweep.search) or 'none'}")
    (key, spec), = sweep.search.items()
    kind, values = _space_entry(key, spec)
    known = {axis_label(v) for v in values}
    for value, numbers in sweep.paper.items():
        if axis_label(value) not in known:
            raise ConfigError(f"{path}: paper.{value} is not a value of {key} ({', '.join(sorted(known))})")
        if not isinstance(numbers, dict) or not set(numbers) <= set(PAPER_METRICS):
            raise ConfigError(f"{path}: paper.{value}: expected {{{': .., '.join(PAPER_METRICS)}: ..}}, "
                              f"got {numbers!r}")


def _space_entry(key: str, spec: Any) -> tuple[str, Any]:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
        raise ConfigError(f"search.{key}: expected one of {{{', '.join(SPACE_KINDS)}: ...}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"search.{key}.{kind}: expected a non-empty list, got {values!r}")
    if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
        raise ConfigError(f"search.{key}.{kind}: expected [low, high], got {values!r}")
    return kind, values


def hide_secrets(search: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The search space with every value that holds credentials (``user:pass@`` in a URL, a signed
    URL's token) replaced by its redacted form, and ``{key: {shown: real}}`` to map them back.

    Tune writes the values it searches everywhere: trial folder names, ``params.json``, each
    ``result.json``, its experiment state, the results table. Two values that redact alike are told
    apart by a ``#n`` suffix.
    """
    from mae_ray import tracking

    shown_space, hidden = {}, {}
    for key, spec in search.items():
        kind, values = _space_entry(key, spec)
        if kind not in ("grid", "choice"):
            shown_space[key] = spec
            continue
        shown, taken = [], set()
        for value in values:
            if isinstance(value, str) and tracking.redact(value) != value:
                label, n = tracking.redact(value), 1
                while label in taken or label in values:
                    n += 1
                    label = f"{tracking.redact(value)}#{n}"
                hidden.setdefault(key, {})[label] = value
                value = label
            taken.add(value if isinstance(value, str) else json.dumps(value))
            shown.append(value)
        shown_space[key] = {kind: shown}
    return shown_space, hidden


def param_space(search: dict[str, Any]) -> dict[str, Any]:
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice, "uniform": lambda v: tune.uniform(*v),
            "loguniform": lambda v: tune.loguniform(*v), "randint": lambda v: tune.randint(*v)}
    return {key: make[kind](values) for key, (kind, values) in ((k, _space_entry(k, s)) for k, s in search.items())}


# --------------------------------------------------------------------------- one trial
def trial(params: dict[str, Any], *, base: dict[str, Any], sweep_dir: str, uri: str, parent_run_id: str,
          sweep: dict[str, Any], hidden: dict[str, dict[str, Any]] | None = None) -> None:
    """Tune function: pre-train (reports forwarded to Tune), evaluate, report the final metrics.

    ``params`` are the values Tune shows (credentials redacted, see :func:`hide_secrets`); ``hidden``
    maps them back to the real ones, which reach this function through the object store only.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mae_ray import evaluate, pretrain, tracking
    from mae_ray.encoders import resolve_encoder

    trial_id = tune.get_context().get_trial_id()
    real = {k: (hidden or {}).get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in params.items()}
    cfg = trial_config(real, base, sweep["cases"])
    cfg.output_dir = os.path.join(sweep_dir, "trials", trial_id)
    cfg.mlflow.tracking_uri, cfg.mlflow.run_name = uri, trial_id
    run_id = _trial_run(uri, cfg, parent_run_id, trial_id, params)
    # A trial restarted after its driver was killed picks up what it had finished: nothing runs twice.
    summary = _done(cfg.output_dir) or pretrain.run(cfg, run_id=run_id, continue_existing=True,
                                                    callbacks=[TuneReportCallback()])
    final = {"train_loss": summary["metrics"].get("train_loss"), "knn_top1": summary["metrics"].get("knn_top1"),
             "mlflow_run_id": run_id}
    skip = tuple(j for j in ("linprobe", "finetune") if not sweep[j])
    if len(skip) < 2:
        eval_dir = os.path.join(cfg.output_dir, "eval")
        eval_cfg = load_config(None, [f"output_dir={eval_dir}", f"eval.checkpoint={summary['checkpoint']}"],
                               base=cfg.to_dict())
        scores = _done(eval_dir)
        if scores is None:
            source = resolve_encoder(summary["checkpoint"], eval_cfg, uri)
            scores = evaluate.run(eval_cfg, source=source, skip=skip)
        final.update({k: v for k, v in scores.items() if k.endswith(("_top1", "_top5"))})
    tracking.EpochLogger(uri, run_id).set_tags({"sweep.status": "finished"})
    tune.report({k: v for k, v in final.items() if v is not None})


def trial_config(params: dict[str, Any], base: dict[str, Any], cases: dict[str, Any]) -> Config:
    """The run config of one trial: the base with the trial's values (a ``case`` expanded to its keys)."""
    items = [f"{k}={json.dumps(v)}" for k, v in params.items() if k != CASE]
    if CASE in params:
        items = case_overrides(cases, params[CASE]) + items
    return load_config(None, items, base=base)


def _done(folder: str) -> dict[str, Any] | None:
    """The result.json of a job that already finished in ``folder``, if any."""
    path = os.path.join(folder, "result.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _trial_run(uri: str, cfg: Config, parent_run_id: str, trial_id: str, params: dict[str, Any]) -> str:
    """The trial's MLflow run: found again after a restore (so never duplicated), else created."""
    from mlflow import MlflowClient

    from mae_ray import tracking

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    if exp is not None:
        found = client.search_runs([exp.experiment_id], filter_string=f"tags.`sweep.trial_id` = '{trial_id}'")
        if found:
            return found[0].info.run_id
    tags = {**tracking.run_tags(), "sweep.trial_id": trial_id, "sweep.params": tracking.redact(json.dumps(params))}
    return tracking.start_run(uri, cfg.mlflow.experiment, trial_id, tracking.params_from_config(cfg.flatten()),
                              tags, parent_run_id=parent_run_id)


# --------------------------------------------------------------------------- the sweep
def run(sweep: SweepConfig, base: dict[str, Any], sweep_file: str, *, resume: bool = False,
        verbose: bool = False) -> dict[str, Any]:
    from ray import tune

    from mae_ray import jobs, launch, sweep_report, tracking

    cfg = from_dict(Config, base)
    uri = jobs.prepare(cfg, write=False)  # absolute shard paths and tracking URI, for every trial
    base = cfg.to_dict()
    sweep_dir = os.path.join(os.path.abspath(sweep.output_dir), sweep.name)
    if sweep.storage_path:  # Tune's state where every node sees it
        tune_root, tune_name = launch.storage_uri(sweep.storage_path).rstrip("/"), sweep.name
    else:
        tune_root, tune_name = sweep_dir, "tune"
    tune_path = f"{tune_root}/{tune_name}"
    state_file = os.path.join(sweep_dir, "sweep.json")
    if resume and not os.path.isfile(state_file):
        raise ConfigError(f"--resume: no sweep to resume at {sweep_dir}")
    if not resume and os.path.exists(state_file):
        raise ConfigError(f"{sweep_dir} already holds a sweep: pass --resume to continue it, or another name")
    os.makedirs(sweep_dir, exist_ok=True)
    started = launch.init_ray(cfg.ray.address, verbose=verbose)
    try:
        launch.check_resources(cfg.ray.num_workers, cfg.ray.cpus_per_worker, cfg.ray.use_gpu)
        sweep_report.forget_stale_ray(sweep_dir)
        if started:
            sweep_report.remember_ray(sweep_dir)
        concurrent = _concurrency(sweep, cfg)
        if resume:
            with open(state_file) as f:
                parent = json.load(f)["parent_run_id"]
        else:
            parent = tracking.start_run(uri, cfg.mlflow.experiment, f"sweep-{sweep.name}",
                                        _sweep_params(sweep), {**tracking.run_tags(), "mae_ray.job": "sweep"})
            with open(state_file + ".tmp", "w") as f:  # what --resume needs to find this sweep again
                json.dump({"parent_run_id": parent, "uri": tracking.redact(uri)}, f)
            os.replace(state_file + ".tmp", state_file)
            _log_sweep_files(uri, parent, sweep_file, base, sweep_dir)
        print(f"[sweep] {sweep.name}: up to {concurrent} trial(s) at a time; folder {sweep_dir}; "
              f"mlflow parent run {parent}", flush=True)
        shown_space, hidden = hide_secrets(sweep.search)
        fn = tune.with_resources(
            tune.with_parameters(trial, base=base, sweep_dir=sweep_dir, uri=uri, parent_run_id=parent,
                                 sweep={"linprobe": sweep.linprobe, "finetune": sweep.finetune,
                                        "cases": sweep.cases}, hidden=hidden),
            {"cpu": sweep.trial_cpus})
        if resume and tune.Tuner.can_restore(tune_path):
            # a trial the dead driver left running shows as errored: restart it (trials are idempotent)
            tuner = tune.Tuner.restore(tune_path, trainable=fn, resume_unfinished=True, restart_errored=True)
        else:
            tuner = tune.Tuner(
                fn, param_space=param_space(shown_space),
                tune_config=tune.TuneConfig(num_samples=sweep.num_samples, max_concurrent_trials=concurrent,
                                            scheduler=_scheduler(sweep)),
                run_config=tune.RunConfig(name=tune_name, storage_path=tune_root, verbose=1 if verbose else 0),
            )
        with _credentials_not_copied_by_tune():
            grid = tuner.fit()
        baseline = _random_baseline(sweep, base, sweep_dir, uri, parent, verbose)
        return sweep_report.finish(grid, sweep, sweep_dir, uri, parent, baseline)
    finally:
        if started:
            import ray

            ray.shutdown()
            sweep_report.forget_ray(sweep_dir)


def _log_sweep_files(uri: str, parent: str, sweep_file: str, base: dict[str, Any], sweep_dir: str) -> None:
    """The sweep file and the trials' base config, credentials redacted, as artifacts ``sweep/`` of the
    parent run; the base config also in the sweep folder (a record: ``--resume`` reads the sweep file)."""
    import tempfile

    from mae_ray import tracking

    logger = tracking.EpochLogger(uri, parent)
    with open(sweep_file) as f:
        sweep_text = tracking.redact(f.read())
    with tempfile.TemporaryDirectory() as tmp:  # the artifact keeps the file's name
        copy = os.path.join(tmp, os.path.basename(sweep_file))
        with open(copy, "w") as f:
            f.write(sweep_text)
        logger.log_artifact(copy, "sweep")
    path = os.path.join(sweep_dir, "base_config.yaml")
    with open(path, "w") as f:
        f.write(tracking.redact(yaml.safe_dump(base, sort_keys=False)))
    logger.log_artifact(path, "sweep")


@contextlib.contextmanager
def _credentials_not_copied_by_tune():
    """Ray Tune copies the driver's ``AWS_*`` credentials into every trial actor's runtime environment,
    which Ray logs in full on the trial's node (``runtime_env_agent.log``) and keeps in its actor
    table (the dashboard's view). Not here: the trials, like every Ray Train worker, take credentials
    from their node's environment (``ray start``'s, or the instance role; docs/operations.md).
    """
    try:
        from ray.tune.execution import class_cache

        copied = class_cache.ENV_VARS_TO_PROPAGATE
    except (ImportError, AttributeError):  # a Ray that no longer does this
        yield
        return
    class_cache.ENV_VARS_TO_PROPAGATE = {name for name in copied if not name.startswith("AWS_")}
    try:
        yield
    finally:
        class_cache.ENV_VARS_TO_PROPAGATE = copied


def _concurrency(sweep: SweepConfig, cfg: Config) -> int:
    """Trials at a time such that every trial's Train workers can be placed (they are not Tune's resources)."""
    import ray

    per_trial = sweep.trial_cpus + cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fits = int(ray.cluster_resources().get("CPU", 0) // per_trial)
    if fits < 1:
        raise ConfigError(f"one trial needs {per_trial:g} CPU (trial_cpus + ray.num_workers x ray.cpus_per_worker)"
                          f" but the cluster has {ray.cluster_resources().get('CPU', 0):g}")
    return max(1, min(sweep.max_concurrent_trials, fits))


def _scheduler(sweep: SweepConfig):
    if sweep.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    s = sweep.scheduler
    return ASHAScheduler(metric=s.metric, mode=s.mode, grace_period=s.grace_period,
                         reduction_factor=s.reduction_factor, max_t=10_000)


def _sweep_params(sweep: SweepConfig) -> dict[str, str]:
    from mae_ray.tracking import redact

    return {"sweep.name": sweep.name, "sweep.base": redact(sweep.base),
            "sweep.search": redact(json.dumps(sweep.search))[:6000],
            "sweep.metric": sweep.metric, "sweep.scheduler": sweep.scheduler.type,
            "sweep.num_samples": str(sweep.num_samples)}


def _random_baseline(sweep: SweepConfig, base: dict[str, Any], sweep_dir: str, uri: str, parent: str,
                     verbose: bool) -> dict[str, Any] | None:
    """Linear probe of the same architecture at initialisation: the row MAE trials must beat."""
    if not (sweep.random_baseline and sweep.linprobe):
        return None
    from mae_ray import linprobe

    out = os.path.join(sweep_dir, "random_baseline")
    if os.path.isfile(os.path.join(out, "result.json")):  # done before a --resume
        with open(os.path.join(out, "result.json")) as f:
            return json.load(f)
    cfg = load_config(None, [f"output_dir={out}", "eval.checkpoint=random", "mlflow.run_name=random-init"],
                      base=base)
    cfg.mlflow.tracking_uri = uri
    result = linprobe.run(cfg, verbose=verbose)
    from mlflow import MlflowClient

    MlflowClient(uri).set_tag(result["mlflow_run_id"], "mlflow.parentRunId", parent)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("mae-ray sweep", "Ray Tune sweep of MAE pre-training + evaluation")
    parser.add_argument("--resume", action="store_true", help="continue a killed or stopped sweep")
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)

    def job() -> int:
        if not args.config:
            raise ConfigError("--config SWEEP.yaml is required (see experiments/sweeps/)")
        sweep, base = load_sweep(args.config, args.overrides)
        run(sweep, base, os.path.abspath(args.config), resume=args.resume, verbose=args.verbose)
        return 0

    return guarded(job)


if __name__ == "__main__":
    sys.exit(main())
