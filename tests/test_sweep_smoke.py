"""The shipped paper sweep files run end to end (four in CI, all nine with MAE_RAY_SLOW=1): Ray Tune, a trial per
point pre-trained, linear-probed and fine-tuned, the report with the paper's numbers beside the measured ones
(issue 14's smoke run).

What changes from the file is only its scale: the micro ViT on the demo data, one epoch of each job, every
trial's jobs in the trial's own process (``ray.num_workers=0``: no Ray Train start-up per job), a local
sqlite store; the axis, its paper numbers, the cases and the rest of the recipe stay as shipped. Two points of
each axis (its first and its last) run here; tests/test_sweep_files.py trains one step at every point of every
file. Figure 7's pre-training lengths (100-1600 epochs) run as 1-16 epochs.
"""

from __future__ import annotations

import os

import pytest
import yaml
from mlflow import MlflowClient
from test_sweep_files import PAPER, SWEEPS

from mae_ray.jobs import sweep as sweeps
from mae_ray.jobs.sweep_config import CASE, axis_label, load_sweep, trial_jobs

pytestmark = pytest.mark.ray


def smoke_overrides(demo: dict, uri: str) -> dict:
    one = {"epochs": 1, "batch_size": 32, "effective_batch": None, "warmup_epochs": 0}
    return {
        "model.name": "mae_vit_micro_patch4", "model.img_size": 32,
        "data.train_shards": demo["train"], "data.val_shards": demo["val"], "data.num_workers": 0,
        "data.samples_per_epoch": 64, "data.shuffle_buffer": 64,
        **{f"train.{k}": v for k, v in one.items()}, "train.accum_iter": 1, "train.amp": "none",
        "train.checkpoint_every": 1, "train.visualize_every": 0, "train.knn_every": 1,
        "eval.knn_train_samples": 64, "eval.knn_val_samples": 32,
        **{f"linprobe.{k}": v for k, v in one.items()}, **{f"finetune.{k}": v for k, v in one.items()},
        "ray.num_workers": 0, "ray.cpus_per_worker": 1, "ray.use_gpu": False, "ray.storage_path": None,
        "mlflow.tracking_uri": uri, "mlflow.experiment": "smoke",
    }


def smoke_file(name: str, tmp_path, demo: dict, encoder: str) -> tuple[str, str, dict]:
    """The shipped file at smoke scale, written beside the test; returns (path, axis, {axis label: value})."""
    with open(os.path.join(SWEEPS, name)) as f:
        spec = yaml.safe_load(f)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec["base"] = os.path.join(SWEEPS, spec["base"])
    spec["overrides"] = {**spec.get("overrides", {}), **smoke_overrides(demo, uri)}
    if not spec.get("pretrain", True):
        spec["overrides"]["eval.checkpoint"] = encoder
    spec.update(output_dir=str(tmp_path / "sweeps"), storage_path=None, max_concurrent_trials=2,
                random_baseline=False)
    if spec.get("cases"):
        first, *_, last = spec["cases"]
        spec["cases"] = {k: spec["cases"][k] for k in (first, last)}
        axis, values = CASE, [first, last]
    else:
        (axis, entry), = spec["search"].items()
        values = [entry["grid"][0], entry["grid"][-1]]
        scale = (lambda v: v // 100) if axis == "train.epochs" else (lambda v: v)
        paper = {axis_label(k): v for k, v in spec.get("paper", {}).items()}
        spec["paper"] = {scale(v): paper[axis_label(v)] for v in values if axis_label(v) in paper}
        values = [scale(v) for v in values]
        spec["search"] = {axis: {"grid": values}}
    if axis == CASE:
        spec["paper"] = {k: v for k, v in spec["paper"].items() if k in values}
    for key, lengths in spec.get("best_of", {}).items():  # Figure 9's 50-200 fine-tuning epochs run as 1 and 4
        spec["best_of"][key] = [lengths[0] // 50, lengths[-1] // 50]
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path), axis, {axis_label(v): v for v in values}


@pytest.fixture(scope="module")
def encoder(local_ray, demo_data, tmp_path_factory):
    """A micro pre-training checkpoint: the fixed encoder of the evaluation-only sweep (Figure 9)."""
    from _helpers import tiny_config

    from mae_ray.jobs import pretrain

    tmp = tmp_path_factory.mktemp("encoder")
    return pretrain.run(tiny_config(demo_data, tmp, "train.epochs=1", "ray.num_workers=0"))["checkpoint"]


# One file per path through the sweep machinery runs in CI: a grid over a model key (mask ratio), ``cases`` with
# the PCA target, jobs per axis value over the pre-training length (schedule), an evaluation-only sweep with
# best_of (partial fine-tuning). The other five repeat one of those paths with other keys; every point of
# every file still trains a step in tests/test_sweep_files.py. MAE_RAY_SLOW=1 runs all nine (~2 min more).
IN_CI = {"paper_mask_ratio.yaml", "paper_target.yaml", "paper_schedule.yaml", "paper_partial_finetune.yaml"}


@pytest.mark.parametrize("name", [n if n in IN_CI else pytest.param(n, marks=pytest.mark.skipif(
    os.environ.get("MAE_RAY_SLOW") != "1", reason="the same sweep path as another file: set MAE_RAY_SLOW=1"))
    for n in sorted(PAPER)])
def test_each_paper_sweep_file_runs_through_tune_with_the_papers_numbers_beside(local_ray, demo_data, encoder,
                                                                               tmp_path, name):
    path, axis, values = smoke_file(name, tmp_path, demo_data, encoder)
    sweep, base = load_sweep(path, [])
    report = sweeps.run(sweep, base, path)

    rows = {axis_label(r[axis]): r for r in report["rows"]}
    assert set(rows) == set(values) and all(r["status"] == "finished" for r in rows.values()), report["rows"]
    paper = {axis_label(k): v for k, v in sweep.paper.items()}
    client = MlflowClient(base.mlflow.tracking_uri)
    for label, row in rows.items():
        jobs = trial_jobs(vars(sweep), {axis: values[label]})
        assert all(isinstance(row.get(f"{job}_top1"), float) for job in jobs), row
        assert not any(f"{job}_top1" in row for job in ("linprobe", "finetune") if job not in jobs), row
        if sweep.best_of and "finetune" in jobs:
            best_of_lengths(client, row, sweep.best_of["finetune.epochs"])
        # the paper's numbers beside the measured ones, for the points the paper gives
        assert {k: row[k] for k in row if k.startswith("paper_")} == {
            f"paper_{k}": float(v) for k, v in paper.get(label, {}).items()}
        # the trial ran its point: its MLflow params are what its jobs used
        params = client.get_run(row["mlflow_run_id"]).data.params
        settings = sweep.cases[label] if axis == CASE else {axis: values[label]}
        assert {k: params[k] for k in settings} == {k: str(v) for k, v in settings.items()}
    assert any(paper.get(label) for label in rows)  # every file names the paper's numbers of at least one end
    table = [ln for ln in open(report["markdown"]).read().splitlines() if ln.startswith("| ")]
    assert "paper_" in table[0] and len(table) == 1 + len(rows)  # the header and a row per trial


def best_of_lengths(client, row: dict, lengths: list[int]) -> None:
    """Figure 9's point: a fine-tuning run per length, the best one's top-1 is the trial's (in its row and as
    the latest value on its MLflow run), each length's beside it."""
    each = {n: row[f"finetune_top1_epochs_{n}"] for n in lengths}
    assert row["finetune_top1"] == max(each.values()) and each[row["finetune_best_epochs"]] == row["finetune_top1"]
    trial = client.get_run(row["mlflow_run_id"])
    assert trial.data.metrics["finetune_top1"] == row["finetune_top1"]
    children = client.search_runs([trial.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{row['mlflow_run_id']}'")
    ran = {int(r.data.params["finetune.epochs"]): r.data.metrics["finetune_top1"] for r in children}
    assert ran == each, (ran, each)  # one run per length, each with the epochs it was given


@pytest.mark.parametrize("stop, status", [(KeyboardInterrupt, "KILLED"), (OSError, "FAILED")], ids=["ctrl-c", "error"])
def test_a_sweep_stopped_after_its_parent_run_exists_ends_that_run(local_ray, demo_data, tmp_path, monkeypatch,
                                                                   stop, status):
    """The parent run has a FAILED path (KILLED on Ctrl-C), not only the report's FINISHED: Tune's fit stops
    with an error here, after the parent run was opened, before any trial."""
    from ray import tune

    path, _, _ = smoke_file("paper_mask_ratio.yaml", tmp_path, demo_data, encoder="")
    sweep, base = load_sweep(path, [])

    def stopped(self):
        raise stop("stopped mid-sweep")

    monkeypatch.setattr(tune.Tuner, "fit", stopped)
    with pytest.raises(stop):
        sweeps.run(sweep, base, path)
    client = MlflowClient(base.mlflow.tracking_uri)
    [parent] = client.search_runs([client.get_experiment_by_name("smoke").experiment_id],
                                  filter_string="tags.`mae_ray.job` = 'sweep'")
    assert parent.info.status == status


def test_a_trial_whose_evaluation_fails_ends_its_run_failed_not_finished(local_ray, demo_data, tmp_path, monkeypatch):
    """A trial's run is one lifecycle over all its jobs: its pre-training finishing does not end it; the linear
    probe failing after it does, FAILED (the probe's own run too), and the sweep's table says the trial erred."""
    path, _, _ = smoke_file("paper_mask_ratio.yaml", tmp_path, demo_data, encoder="")
    spec = yaml.safe_load(open(path))
    spec["search"] = {"model.mask_ratio": {"grid": [0.75]}}
    spec["overrides"]["linprobe.epochs"] = 2  # pre-training has one epoch (0): the fault hits the probe's second
    spec.update(finetune=False, paper={})
    open(path, "w").write(yaml.safe_dump(spec, sort_keys=False))
    monkeypatch.setenv("MAE_RAY_FAULTS", "fail:rank=0:end_epoch=1")
    from ray.tune.execution import class_cache  # Tune copies only the variables it lists into a trial's actor

    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", {*class_cache.ENV_VARS_TO_PROPAGATE, "MAE_RAY_FAULTS"})
    sweep, base = load_sweep(path, [])
    report = sweeps.run(sweep, base, path)

    [row] = report["rows"]
    assert row["status"] == "error", row
    client = MlflowClient(base.mlflow.tracking_uri)
    exp = client.get_experiment_by_name("smoke").experiment_id
    [trial] = client.search_runs([exp], filter_string="tags.`sweep.trial_id` != ''")
    assert trial.info.status == "FAILED" and "train_loss" in trial.data.metrics  # pre-trained, then failed
    [probe] = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{trial.info.run_id}'")
    assert probe.info.status == "FAILED" and probe.data.tags["mae_ray.job"] == "linprobe"
