"""Sweeps end to end: real Ray Tune + Train, real MLflow (a server over HTTP, and sqlite), real shards."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from _helpers import MlflowServer, S3Server
from mlflow import MlflowClient
from PIL import Image

from mae_ray.jobs import sweep as sweeps
from mae_ray.jobs.sweep_config import load_sweep

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Two classes any encoder separates (red vs blue images): a kNN bank of many samples scores ~100%,
    a bank of one sample scores 50%, so the ASHA test knows which trial must be stopped."""
    from data_tools.make_shards import make_shards

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("val", 32)):
        for label, colour in enumerate(([200, 30, 30], [30, 30, 200])):
            folder = root / "images" / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(n // 2):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
        make_shards(root / "images" / split, root / split, prefix=split, maxcount=40, progress=False)
    return {"train": str(root / "train"), "val": str(root / "val")}


def write_sweep(tmp_path, data, uri, search, base_keys=None, **sweep_keys):
    base = {
        "model": {"name": "mae_vit_micro_patch4"},
        "data": {"train_shards": data["train"], "val_shards": data["val"], "num_workers": 0,
                 "samples_per_epoch": 64, "shuffle_buffer": 32},
        "train": {"epochs": 3, "batch_size": 16, "lr": 1e-3, "warmup_epochs": 0, "knn_every": 1},
        "eval": {"knn_train_samples": 64, "knn_val_samples": 32, "knn_k": 5},
        "linprobe": {"epochs": 2, "batch_size": 16, "blr": 5, "warmup_epochs": 0, "cache_features": True},
        "finetune": {"epochs": 1, "batch_size": 16, "warmup_epochs": 0},
        "ray": {"num_workers": 1, "cpus_per_worker": 0.8},
        "mlflow": {"tracking_uri": uri, "experiment": "sweep-test"},
        **(base_keys or {}),
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": "base.yaml", "name": "s", "search": search, "output_dir": str(tmp_path / "sweeps"),
            "max_concurrent_trials": 1, "trial_cpus": 0.2, **sweep_keys}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)




def proc_state(pid: int) -> str | None:
    """The State letter of /proc/PID/status (Z: exited, not yet reaped), None when no such process."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("State:"):
                return line.split()[1]
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path)
    yield server.start()
    server.stop()


def test_sweep_over_mlflow_server_asha_stops_the_weak_trial(local_ray, colours, tmp_path, mlflow_server, capsys):
    # two cases (settings that go together): the kNN bank, and Table 1f's block and grid mask sampling
    # (ASHA needs the strong trial first: the weak one is stopped against it; cases run in file order, and
    # write_sweep dumps the YAML with sorted keys, so "strong" < "weak")
    cases = {"strong": {"eval.knn_train_samples": 64, "model.mask_sampling": "block", "model.mask_ratio": 0.5},
             "weak": {"eval.knn_train_samples": 1, "model.mask_sampling": "grid"}}
    path = write_sweep(tmp_path, colours, mlflow_server, {}, cases=cases,
                       paper={"strong": {"linprobe_top1": 72.3}, "weak": {"linprobe_top1": 66.0}},
                       scheduler={"type": "asha", "metric": "knn_top1", "grace_period": 1, "reduction_factor": 2})
    sweep, base = load_sweep(path, [])
    report = sweeps.run(sweep, base, path)
    # one progress line per ended trial, with its scores and the time left (trials run one at a time here)
    import re

    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[sweep] trial ")]
    first = r"\[sweep\] trial 1/2 finished \(case=strong\): linprobe_top1 [\d.]+ finetune_top1 [\d.]+ knn_top1 [\d.]+"
    assert len(lines) == 2 and re.fullmatch(first + r"; about \d+ min left", lines[0]), lines
    assert lines[1].startswith("[sweep] trial 2/2 stopped early (case=weak): knn_top1 "), lines

    by_bank = {{"strong": 64, "weak": 1}[r["case"]]: r for r in report["rows"] if r["status"] != "baseline"}
    assert by_bank[64]["paper_linprobe_top1"] == 72.3 and by_bank[1]["paper_linprobe_top1"] == 66.0
    assert by_bank[64]["status"] == "finished" and by_bank[1]["status"] == "stopped"
    assert by_bank[64]["knn_top1"] > by_bank[1]["knn_top1"]  # stopped on the online kNN, not on the loss
    client = MlflowClient(mlflow_server)
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.name"] == "s"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} >= {
        "report/sweep_results.parquet", "report/sweep_results.md"}
    finished = client.get_run(by_bank[64]["mlflow_run_id"])
    assert finished.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert {"linprobe_top1", "finetune_top1", "knn_top1", "train_loss"} <= set(finished.data.metrics)
    assert [m.step for m in client.get_metric_history(finished.info.run_id, "knn_top1")] == [0, 1, 2]
    # each trial ran its case's settings (the trial's MLflow params are what its pre-training used)
    assert {k: finished.data.params[k] for k in ("eval.knn_train_samples", "model.mask_sampling",
                                                 "model.mask_ratio")} == {"eval.knn_train_samples": "64",
                                                                          "model.mask_sampling": "block",
                                                                          "model.mask_ratio": "0.5"}
    stopped = client.get_run(by_bank[1]["mlflow_run_id"])
    assert stopped.data.params["model.mask_sampling"] == "grid" and stopped.data.params["model.mask_ratio"] == "0.75"
    assert stopped.info.status == "KILLED" and stopped.data.tags["sweep.status"] == "stopped"
    ran = len(client.get_metric_history(stopped.info.run_id, "train_loss"))
    assert ran < 3  # it did not run to the end
    # the report says which trial stopped, after how many epochs, and the pre-training that saved
    pruned = report["early_stops"]
    assert pruned["stopped"] == {by_bank[1]["trial"]: ran} and pruned["saved_epochs"] == 3 - ran
    # what each trial cost (its jobs' CPU-core-hours together), and the hours the stop saved at the stopped
    # trial's own cost per epoch
    trial_run = client.get_run(by_bank[64]["mlflow_run_id"])
    its_jobs = [trial_run, *client.search_runs([trial_run.info.experiment_id],
                                               f"tags.mlflow.parentRunId = '{trial_run.info.run_id}'")]
    assert len(its_jobs) == 3  # pre-training (the trial's own run), linear probe, fine-tuning
    assert by_bank[64]["total_cpu_hours"] == pytest.approx(sum(r.data.metrics["cpu_hours"] for r in its_jobs))
    assert by_bank[64]["linprobe_top1_per_cpu_hour"] == pytest.approx(
        by_bank[64]["linprobe_top1"] / by_bank[64]["total_cpu_hours"])
    stopped_held = by_bank[1]["total_cpu_hours"]
    assert pruned["saved_hours"] == pytest.approx(stopped_held / ran * (3 - ran)) and pruned["saved_hours"] > 0
    assert parent.data.metrics["hours_saved"] == pytest.approx(pruned["saved_hours"])
    assert parent.data.metrics["early_stopped_trials"] == 1
    assert parent.data.metrics["epochs_saved_fraction"] == pytest.approx((3 - ran) / 6)
    assert f"{by_bank[1]['trial']} after {ran}/3" in open(report["markdown"]).read()

    # What the MLflow UI lists, read through the REST API it calls: runs named by what they vary, parent and
    # children, a description on each, the varied params and the two accuracies on the trial rows.
    import requests

    runs = requests.post(f"{mlflow_server}/api/2.0/mlflow/runs/search", timeout=30,
                         json={"experiment_ids": [report["experiment_id"]], "max_results": 100}).json()["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    tags = {name: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for name, r in by_name.items()}
    assert set(by_name) == {"sweep-s", "case=strong", "case=weak", "linprobe · case=strong",
                            "finetune · case=strong", "random-init", "linprobe · random-init",
                            "finetune · random-init"}, sorted(by_name)
    ids = {name: r["info"]["run_id"] for name, r in by_name.items()}
    assert tags["case=strong"]["mlflow.parentRunId"] == tags["random-init"]["mlflow.parentRunId"] == ids["sweep-s"]
    assert tags["linprobe · case=strong"]["mlflow.parentRunId"] == ids["case=strong"]
    # the random-init reference is one row as a trial is: its probe and fine-tuning are its children
    assert tags["linprobe · random-init"]["mlflow.parentRunId"] == ids["random-init"]
    assert tags["finetune · random-init"]["mlflow.parentRunId"] == ids["random-init"]
    assert by_name["random-init"]["info"]["status"] == "FINISHED"
    assert {"linprobe_top1", "finetune_top1"} <= {m["key"] for m in by_name["random-init"]["data"]["metrics"]}
    assert all(tags[name].get("mlflow.note.content") for name in by_name), {n: t.get("mlflow.note.content")
                                                                             for n, t in tags.items()}
    strong = by_name["case=strong"]["data"]
    assert {"linprobe_top1", "finetune_top1"} <= {m["key"] for m in strong["metrics"]}
    assert {"model.mask_sampling", "model.mask_ratio", "eval.knn_train_samples"} <= {p["key"] for p in strong["params"]}
    listed = requests.get(f"{mlflow_server}/api/2.0/mlflow/artifacts/list", timeout=30,
                          params={"run_id": ids["sweep-s"], "path": "report"}).json()["files"]
    assert "report/sweep_results.json" in {f["path"] for f in listed}  # the table view
    assert report["compare_path"].startswith("#/compare-runs?runs=") and ids["case=strong"] in report["compare_path"]
    assert ids["case=weak"] in report["compare_path"] and ids["random-init"] not in report["compare_path"]
    assert "workflowType=machine_learning" in report["runs_path"]  # MLflow 3 opens in its GenAI view otherwise
    # the runs link opens a view saved on the experiment (as the UI's "Share" does): the sweep's children, best
    # probe first, the varied keys and both accuracies as columns, each one a param or metric the trials carry
    key = re.search(r"viewStateShareKey=([\w-]+)", report["runs_path"]).group(1)
    experiment = requests.get(f"{mlflow_server}/api/2.0/mlflow/experiments/get", timeout=30,
                              params={"experiment_id": report["experiment_id"]}).json()["experiment"]
    view = json.loads({t["key"]: t["value"] for t in experiment["tags"]}[f"mlflow.sharedViewState.{key}"])
    assert view["name"] == "sweep-s" and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{ids['sweep-s']}'"
    assert state["orderByKey"] == "metrics.`linprobe_top1`" and state["orderByAsc"] is False
    columns = ["params.`eval.knn_train_samples`", "params.`model.mask_ratio`", "params.`model.mask_sampling`",
               "metrics.`linprobe_top1`", "metrics.`finetune_top1`", "metrics.`total_cpu_hours`"]
    assert state["selectedColumns"] == columns
    carried = {f"params.`{p['key']}`" for p in strong["params"]} | {f"metrics.`{m['key']}`" for m in strong["metrics"]}
    assert set(columns) <= carried
    baseline_params = {p["key"]: p["value"] for p in by_name["random-init"]["data"]["params"]}
    assert baseline_params["model.mask_ratio"] == "n/a: random init"  # its row shows no mask ratio it never had


def test_killed_driver_resumes_from_the_bucket_alone_without_rerunning_or_duplicating(colours, tmp_path):
    """A sweep with ``storage_path: s3://...`` is killed after its first trial; its local folder is deleted;
    ``--resume`` finishes it from what is in the bucket (Tune's state, sweep.json, the trials' checkpoints
    and results), with no trial run twice and no MLflow run duplicated. The trials run their jobs in their own
    process (``ray.num_workers=0``, the quickstart's way; the ASHA test above runs them on Ray Train)."""
    import pyarrow.fs as pafs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with S3Server() as s3:
        shared = f"{s3.bucket}/sweeps/s"
        path = write_sweep(tmp_path, colours, uri, {"model.mask_ratio": {"grid": [0.5, 0.75]}},
                           # each trial's jobs in its own process: checkpoints go to the bucket all the same
                           base_keys={"storage": {"endpoint_url": s3.endpoint},
                                      "ray": {"num_workers": 0, "cpus_per_worker": 1}},
                           storage_path=f"s3://{s3.bucket}/sweeps",
                           scheduler={"type": "none"}, random_baseline=False, finetune=False,  # CI minutes
                           paper={0.5: {"linprobe_top1": 70.5, "finetune_top1": 84.0}, 0.75: {"linprobe_top1": 73.5}})
        cmd = [sys.executable, "-m", "mae_ray", "sweep", "--config", path]
        driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        sweep_dir = tmp_path / "sweeps" / "s"

        def in_bucket(suffix):
            infos = s3.fs.get_file_info(pafs.FileSelector(shared, recursive=True, allow_not_found=True))
            return {i.path[len(shared) + 1:]: i.mtime for i in infos if i.path.endswith(suffix)}

        deadline = time.time() + 400
        while time.time() < deadline and not in_bucket("/eval/result.json"):
            assert driver.poll() is None, "the sweep ended before it could be killed"
            time.sleep(1)
        first = in_bucket("/eval/result.json")
        assert len(first) == 1, "no trial finished in time"
        os.kill(driver.pid, signal.SIGKILL)  # the driver only: its Ray processes are left behind
        driver.wait()
        saved = json.loads((sweep_dir / "ray_processes.json").read_text())
        left = saved["pids"]
        # Really running, not merely dead and unreaped: gcs_server, raylet & co die with the driver (Ray's
        # kernel fate sharing) and are zombies until PID 1 reaps them; the raylet's agents run on.
        states = {p: proc_state(p) for p in left}
        assert any(s not in (None, "Z") for s in states.values()), states
        # The sweep's local folder goes; only the record of this machine's Ray processes is put back (it is
        # about processes on this node, which a lost node would have lost with it).
        shutil.rmtree(sweep_dir)
        sweep_dir.mkdir(parents=True)
        (sweep_dir / "ray_processes.json").write_text(json.dumps(saved))

        try:
            resumed = subprocess.run([*cmd, "--resume", "--verbose"], capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired as e:  # what it was doing when it stopped moving
            out = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (e.output, e.stderr))
            pytest.fail(f"--resume still running after 600 s; its output ends:\n{out[-6000:]}")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        # Ray Train's preemption watcher's error-level line at each job start (not a failure) stays out
        assert "PreemptionWatcher" not in resumed.stdout + resumed.stderr
        assert {k: v for k, v in in_bucket("/eval/result.json").items() if k in first} == first  # not re-run
        # both trials' checkpoints are in the bucket (3 epochs each), none on local disk
        assert sorted(k.split("/")[1] for k in in_bucket("/state.pt")
                      if k.endswith("epoch_000002/state.pt") and "-" not in k.split("/")[1]) == \
            sorted(k.split("/")[1] for k in in_bucket("/eval/result.json"))
        assert not [p for p in sweep_dir.rglob("state.pt")]
    # every process the killed driver left is gone from the process table (stopped and reaped), not a
    # zombie; a pid in use again belongs to a process started later
    for pid in left:
        state = proc_state(pid)
        assert state is None or (state != "Z" and psutil.Process(pid).create_time() != saved["started"][str(pid)]), (
            pid, state, resumed.stdout[-2000:])

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sweep-test")
    trial_runs = [r for r in client.search_runs([exp.experiment_id]) if "sweep.trial_id" in r.data.tags]
    ids = [r.data.tags["sweep.trial_id"] for r in trial_runs]
    assert len(ids) == 2 and len(set(ids)) == 2  # one MLflow run per trial, none duplicated
    for run in trial_runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == [0, 1, 2] and "linprobe_top1" in run.data.metrics
        probes = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        assert [p.info.run_name for p in probes] == [f"linprobe · {run.info.run_name}"]  # run once
    sweeps_runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("mae_ray.job") == "sweep"]
    assert len(sweeps_runs) == 1

    table = pq.read_table(sweep_dir / "sweep_results.parquet").to_pylist()
    assert sorted(r["model.mask_ratio"] for r in table) == [0.5, 0.75]
    assert all(r["status"] == "finished" and 0 <= r["linprobe_top1"] <= 100 for r in table)
    markdown = (sweep_dir / "sweep_results.md").read_text()
    assert f"{table[0]['linprobe_top1']:.2f}" in markdown
    # the plot is drawn from the table's rows: the points the PNG carries are the table's, x sorted
    with Image.open(sweep_dir / "accuracy_vs_model_mask_ratio.png") as png:
        series = json.loads(png.text["mae_ray.series"])
    for metric in ("linprobe_top1",):
        by_ratio = sorted((r["model.mask_ratio"], r[metric]) for r in table)
        assert series[metric.replace("_top1", " top-1")] == [[x for x, _ in by_ratio], [y for _, y in by_ratio]]
    # the paper's numbers beside the measured ones: in the table, the markdown and the plot
    assert sorted((r["model.mask_ratio"], r["paper_linprobe_top1"], r["paper_finetune_top1"]) for r in table) == [
        (0.5, 70.5, 84.0), (0.75, 73.5, None)]
    assert "paper_linprobe_top1" in markdown and "| 70.50 |" in markdown
    assert series["paper linprobe top-1"] == [[0.5, 0.75], [70.5, 73.5]]
    assert series["paper finetune top-1"] == [[0.5], [84.0]]


def test_plot_lines_are_the_tables_rows_averaged_per_axis_value():
    """What the accuracy plot draws, read back from its lines: per accuracy, x = the axis values of the
    finished trials (sorted), y = the mean accuracy of the trials at that x; the baseline a flat line."""
    from mae_ray.jobs import sweep_report

    rows = [  # unsorted, two trials at 0.75, one stopped and one errored trial (not drawn), a baseline
        {"trial": "c", "status": "finished", "model.mask_ratio": 0.9, "linprobe_top1": 30.0, "knn_top1": 20.0},
        {"trial": "a", "status": "finished", "model.mask_ratio": 0.75, "linprobe_top1": 50.0, "knn_top1": 25.0},
        {"trial": "b", "status": "finished", "model.mask_ratio": 0.5, "linprobe_top1": 40.0},
        {"trial": "d", "status": "finished", "model.mask_ratio": 0.75, "linprobe_top1": 60.0, "knn_top1": 35.0},
        {"trial": "e", "status": "stopped", "model.mask_ratio": 0.25, "linprobe_top1": 99.0, "knn_top1": 99.0},
        {"trial": "f", "status": "error", "model.mask_ratio": 0.6, "linprobe_top1": 99.0},
        {"trial": "random-init", "status": "baseline", "linprobe_top1": 12.5},
    ]
    fig = sweep_report.axis_figure(rows, "model.mask_ratio")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"linprobe top-1", "knn top-1", "random-init linear probe"}  # no fine-tune: none has it
    assert list(lines["linprobe top-1"].get_xdata()) == [0.5, 0.75, 0.9]
    assert list(lines["linprobe top-1"].get_ydata()) == [40.0, 55.0, 30.0]
    assert list(lines["knn top-1"].get_xdata()) == [0.75, 0.9]  # only the trials that have it
    assert list(lines["knn top-1"].get_ydata()) == [30.0, 20.0]
    assert list(lines["random-init linear probe"].get_ydata()) == [12.5, 12.5]
    assert fig.axes[0].get_xlabel() == "model.mask_ratio"
    assert sweep_report.axis_figure(rows[1:2] + rows[4:], "model.mask_ratio") is None  # one finished value


def test_ui_lines_open_a_local_store_and_never_print_a_servers_credentials():
    from mae_ray.jobs import sweep_report

    report = {"runs_path": "#/experiments/1/runs?viewStateShareKey=k", "compare_path": "#/compare-runs?runs=x"}
    local = sweep_report.ui_lines("sqlite:////data/mlflow.db", report)
    assert local[0] == ("open the UI with: mlflow ui --backend-store-uri sqlite:////data/mlflow.db --host 127.0.0.1 "
                        "--port 5000")
    assert local[1].endswith(": http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=k")
    assert local[2] == "its trials side by side: http://127.0.0.1:5000/#/compare-runs?runs=x"
    served = sweep_report.ui_lines("https://alice:s3cret@mlflow.example:5000/", report)
    assert len(served) == 2 and "s3cret" not in "".join(served) and "alice" not in "".join(served)
    assert served[1] == "its trials side by side: https://***@mlflow.example:5000/#/compare-runs?runs=x"


def test_a_view_that_cannot_be_saved_leaves_a_plain_runs_link_and_one_warning(tmp_path, capsys):
    # the sweep's work is done when its links are made: a store that refuses the experiment tag costs the
    # columns, not the report
    from mae_ray.jobs import sweep_report

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # the store exists; experiment 999 does not
    paths = sweep_report.ui_paths(uri, "999", "p" * 32, "sweep-s", ["model.mask_ratio"], ["r1"])
    assert paths["runs_path"].startswith("#/experiments/999/runs?searchFilter=tags.mlflow.parentRunId")
    assert "viewStateShareKey" not in paths["runs_path"] and paths["compare_path"].startswith("#/compare-runs?")
    warning = capsys.readouterr().out.strip()
    assert warning.startswith("[sweep] warning: the runs view was not saved on the experiment (")
    assert "\n" not in warning  # one line
    # with a chart of accuracy against the axis (a numeric one): the link opens it in the parent run's artifacts
    charted = sweep_report.ui_paths(uri, "999", "p" * 32, "sweep-s", ["model.mask_ratio"], ["r1"],
                                    chart="accuracy_vs_model_mask_ratio.png")
    assert charted["compare_path"] == ("#/experiments/999/runs/" + "p" * 32 + "/artifactPath/report/"
                                       "accuracy_vs_model_mask_ratio.png?workflowType=machine_learning")
    assert charted["trials_path"].startswith("#/compare-runs?runs=")
    line = sweep_report.ui_lines(uri, charted)[-1]
    assert line.startswith("accuracy against what it varies: http://127.0.0.1:5000/#/experiments/999/runs/")


def test_stale_ray_processes_are_stopped_and_reaped_not_left_as_zombies(tmp_path):
    """ray_processes.stop_stale on a record of a killed driver: a process that obeys SIGTERM, one that ignores it
    (SIGKILLed after the grace period), one orphaned like the dead driver's (reaped by PID 1); a pid
    now used by another process is left alone. Afterwards each stopped pid is out of the process table:
    /proc/PID/status gone, not State Z."""
    from mae_ray.cluster import ray_processes

    ready = "import signal, sys, time; {}; print('ready', flush=True); time.sleep(600)"
    obeys = subprocess.Popen([sys.executable, "-c", ready.format("pass")], stdout=subprocess.PIPE, text=True)
    ignores = subprocess.Popen([sys.executable, "-c", ready.format("signal.signal(signal.SIGTERM, signal.SIG_IGN)")],
                               stdout=subprocess.PIPE, text=True)
    other = subprocess.Popen([sys.executable, "-c", ready.format("pass")], stdout=subprocess.PIPE, text=True)
    orphan_parent = subprocess.run(["bash", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True,
                                   text=True, check=True)  # its parent has exited: PID 1's child now
    orphan = int(orphan_parent.stdout)
    try:
        for proc in (obeys, ignores, other):
            assert proc.stdout.readline().strip() == "ready"  # the SIGTERM handler is in place
        mine = [obeys.pid, ignores.pid, orphan]
        started = {str(p): psutil.Process(p).create_time() for p in mine}
        started[str(other.pid)] = psutil.Process(other.pid).create_time() - 100  # the pid was someone else's
        (tmp_path / ray_processes.RAY_PIDS).write_text(json.dumps(
            {"session_dir": "/tmp/ray/session_x", "pids": [*mine, other.pid], "started": started}))

        stopped = ray_processes.stop_stale(str(tmp_path), grace_s=2)

        assert sorted(stopped) == sorted(mine)
        assert {p: proc_state(p) for p in mine} == {p: None for p in mine}  # reaped, not zombies
        assert proc_state(other.pid) in ("S", "R")  # not ours: untouched
        assert not (tmp_path / ray_processes.RAY_PIDS).exists()
    finally:
        for pid in (obeys.pid, ignores.pid, other.pid, orphan):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in (obeys, ignores, other):
            proc.wait(timeout=30)


def test_bad_sweep_configs_are_refused_before_ray(tmp_path, colours):
    from mae_ray.errors import ConfigError

    path = write_sweep(tmp_path, colours, "sqlite:///x.db", {"model.mask_ratoi": {"grid": [0.5]}})
    with pytest.raises(ConfigError, match="unknown key 'model.mask_ratoi'"):
        load_sweep(path, [])
    path = write_sweep(tmp_path, colours, "sqlite:///x.db", {"model.mask_ratio": {"between": [0, 1]}})
    with pytest.raises(ConfigError, match=r"search.model.mask_ratio: expected one of \{grid, choice"):
        load_sweep(path, [])
