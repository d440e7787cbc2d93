"""What a sweep file says, checked before Ray starts: the base config, the search space, ``cases`` (settings
that go together, one axis), the paper's numbers per axis value, evaluation-only sweeps; and what one
trial's config is. Torch-free and Ray-free (Tune's search objects are made only in :func:`param_space`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from mae_ray import shipped
from mae_ray.config import Config, from_dict, load_config
from mae_ray.errors import ConfigError
from mae_ray.typed_yaml import flatten, parse_override, read_yaml, set_dotted

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
    # false: an evaluation-only sweep of one fixed encoder (the base's eval.checkpoint: runs:/ID, a checkpoint
    # folder or bucket URI, an official .pth); trials vary only evaluation settings (Fig. 9's partial fine-tuning)
    pretrain: bool = True
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
    # Which evaluations a value of the one axis runs, where it is not what linprobe/finetune above say:
    # value -> [linprobe and/or finetune] (Fig. 9: tuning 0 blocks is the linear probe, not the head alone
    # trained with the fine-tuning recipe).
    jobs: dict = field(default_factory=dict)
    # One evaluation setting each trial runs at every value, keeping the best: {dotted key: [values]} (Fig. 9:
    # fewer tuned blocks need a longer schedule, so each point is the best of several fine-tuning lengths).
    best_of: dict = field(default_factory=dict)


def load_sweep(path: str, overrides: list[str]) -> tuple[SweepConfig, dict[str, Any]]:
    """The sweep config and the trials' base run config, both validated before Ray starts."""
    path = shipped.resolve(path, "sweeps")
    data = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    sweep = from_dict(SweepConfig, data)
    if sweep.cases:
        if CASE in sweep.search:
            raise ConfigError(f"{path}: '{CASE}' is the axis 'cases' makes: do not also list it under search")
        sweep.search = {CASE: {"grid": [str(label) for label in sweep.cases]}, **sweep.search}
    if not sweep.base:
        raise ConfigError(f"{path}: 'base' must name the run config the trials start from")
    base_path = sweep.base if os.path.isabs(sweep.base) else os.path.join(os.path.dirname(path), sweep.base)
    if not os.path.isfile(base_path) and os.sep not in sweep.base:
        base_path = sweep.base  # the name of a shipped run config
    flat_overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in flatten(sweep.overrides)]
    base = load_config(base_path, flat_overrides)
    for key, entry in sweep.search.items():
        kind, values = _space_entry(key, entry)
        if key == CASE:  # every case is a valid config
            for label in values:
                base.override(*case_overrides(sweep.cases, label))
            continue
        sample = values[0] if isinstance(values, list) else values
        base.override(f"{key}={json.dumps(sample)}")  # the key and its type exist
    _check_paper(sweep, path)
    _check_jobs(sweep, path)
    _check_best_of(sweep, base, path)
    if not sweep.pretrain:
        _check_evaluation_only(sweep, base, path)
    if sweep.scheduler.type not in ("asha", "none"):
        raise ConfigError(f"scheduler.type must be asha or none, got {sweep.scheduler.type!r}")
    if sweep.scheduler.type == "asha" and sweep.scheduler.metric == "knn_top1" and base.train.knn_every != 1:
        raise ConfigError("ASHA on knn_top1 needs the kNN monitor every epoch: set train.knn_every=1 in overrides")
    return sweep, base


CASE = "case"
PAPER_METRICS = ("linprobe_top1", "finetune_top1")


def case_overrides(cases: dict[str, Any], label: str) -> list[str]:
    """``--set`` items of one case (a mapping of dotted keys to values)."""
    case = {str(k): v for k, v in cases.items()}.get(label)
    if not isinstance(case, dict) or not case:
        raise ConfigError(f"cases.{label}: expected a mapping of dotted config keys to values, got {case!r}")
    return [f"{k}={json.dumps(v)}" for k, v in flatten(case)]


def axis_label(value: Any) -> str:
    """How an axis value is written in a sweep file's ``paper:`` keys (YAML's true/false for booleans)."""
    return json.dumps(value) if isinstance(value, bool) or value is None else str(value)


def _check_paper(sweep: SweepConfig, path: str) -> None:
    """``paper:`` needs one axis, and each of its keys must be a value of that axis (a typo fails here)."""
    _check_by_axis_value(sweep.paper, sweep, path, "paper",
                         lambda v: isinstance(v, dict) and set(v) <= set(PAPER_METRICS),
                         f"{{{': .., '.join(PAPER_METRICS)}: ..}}")


def _check_jobs(sweep: SweepConfig, path: str) -> None:
    _check_by_axis_value(sweep.jobs, sweep, path, "jobs",
                         lambda v: isinstance(v, list) and v and set(v) <= set(EVAL_JOBS),
                         f"a list of {' and/or '.join(EVAL_JOBS)}")


def _check_by_axis_value(entries: dict, sweep: SweepConfig, path: str, what: str, valid, expected: str) -> None:
    """``entries`` (``paper:`` or ``jobs:``) are keyed by values of the one search axis, each entry ``valid``."""
    if not entries:
        return
    if len(sweep.search) != 1:
        raise ConfigError(f"{path}: '{what}' needs exactly one search axis, got {', '.join(sweep.search) or 'none'}")
    (key, entry), = sweep.search.items()
    known = {axis_label(v) for v in _space_entry(key, entry)[1]}
    for value, entry in entries.items():
        if axis_label(value) not in known:
            raise ConfigError(f"{path}: {what}.{value} is not a value of {key} ({', '.join(sorted(known))})")
        if not valid(entry):
            raise ConfigError(f"{path}: {what}.{value}: expected {expected}, got {entry!r}")


def _check_best_of(sweep: SweepConfig, base: Config, path: str) -> None:
    if not sweep.best_of:
        return
    if len(sweep.best_of) != 1:
        raise ConfigError(f"{path}: best_of takes one key, got {', '.join(sweep.best_of)}")
    (key, values), = sweep.best_of.items()
    if key.split(".")[0] not in EVAL_JOBS or key in sweep.search:
        raise ConfigError(f"{path}: best_of.{key}: expected a linprobe.* or finetune.* key that is not searched")
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: best_of.{key}: expected a non-empty list of values, got {values!r}")
    for value in values:
        base.override(f"{key}={json.dumps(value)}")


EVAL_JOBS = ("linprobe", "finetune")


def trial_jobs(sweep: dict[str, Any], params: dict[str, Any]) -> tuple[str, ...]:
    """The evaluations one trial runs: its axis value's ``jobs`` entry, else the sweep's linprobe/finetune."""
    listed = {axis_label(k): v for k, v in (sweep.get("jobs") or {}).items()}
    for value in params.values():
        if axis_label(value) in listed:
            return tuple(j for j in EVAL_JOBS if j in listed[axis_label(value)])
    return tuple(j for j in EVAL_JOBS if sweep[j])


def _check_evaluation_only(sweep: SweepConfig, base: Config, path: str) -> None:
    if not base.eval.checkpoint:
        raise ConfigError(f"{path}: pretrain: false evaluates one fixed encoder: set overrides.eval.checkpoint "
                          "(runs:/RUN_ID, a checkpoint folder, an official .pth)")
    if not (sweep.linprobe or sweep.finetune or sweep.jobs):
        raise ConfigError(f"{path}: pretrain, linprobe and finetune are all false: nothing to run")
    for key in varied_keys(sweep):
        if key.startswith("model.") or (key.startswith("train.") and key != "train.seed"):
            raise ConfigError(f"{path}: {key} is a pre-training setting, but pretrain: false; an evaluation-only "
                              "sweep varies linprobe.*, finetune.*, eval.*, data.* or train.seed")


def varied_keys(sweep: SweepConfig) -> list[str]:
    """The config keys the trials differ in: the searched ones, with ``case`` expanded to its cases' keys."""
    keys = [k for k in sweep.search if k != CASE] + [i.split("=", 1)[0] for label in sweep.cases
                                                      for i in case_overrides(sweep.cases, label)]
    return list(dict.fromkeys(keys))


def _space_entry(key: str, entry: Any) -> tuple[str, Any]:
    if not isinstance(entry, dict) or len(entry) != 1 or next(iter(entry)) not in SPACE_KINDS:
        raise ConfigError(f"search.{key}: expected one of {{{', '.join(SPACE_KINDS)}: ...}}, got {entry!r}")
    kind, values = next(iter(entry.items()))
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
    for key, entry in search.items():
        kind, values = _space_entry(key, entry)
        if kind not in ("grid", "choice"):
            shown_space[key] = entry
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


def trial_label(params: dict[str, Any]) -> str:
    """What a trial varies, as its MLflow run name: ``mask_ratio=0.75, decoder_depth=8`` (the last part of each
    key; the whole key where two would read alike)."""
    short = [k.rsplit(".", 1)[-1] for k in params]
    names = [s if short.count(s) == 1 else k for k, s in zip(params, short, strict=True)]
    return ", ".join(f"{n}={axis_label(v) if not isinstance(v, float) else f'{v:g}'}"
                     for n, v in zip(names, params.values(), strict=True)) or "trial"


def trial_config(params: dict[str, Any], base: Config, cases: dict[str, Any]) -> Config:
    """The run config of one trial: the base with the trial's values (a ``case`` expanded to its keys)."""
    items = [f"{k}={json.dumps(v)}" for k, v in params.items() if k != CASE]
    if CASE in params:
        items = case_overrides(cases, params[CASE]) + items
    return base.override(*items)
