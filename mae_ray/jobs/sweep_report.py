"""The end of a sweep: the results table (parquet, markdown, terminal), plots in the paper's style,
stopped trials recorded as stopped; and the bookkeeping of the Ray processes a sweep driver started.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import quote, urlencode

import matplotlib
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from ray import tune

from mae_ray import tracking
from mae_ray.jobs import files, lifecycle
from mae_ray.jobs.evaluate import SPENT
from mae_ray.jobs.sweep_config import axis_label, trial_label, varied_keys
from mae_ray.tracking import redact

matplotlib.use("Agg")  # before pyplot: the report is drawn without a display

import matplotlib.pyplot as plt  # noqa: E402

ACCURACIES = ("linprobe_top1", "finetune_top1", "knn_top1")
SPENT_TOTALS = ("total_gpu_hours", "total_cpu_hours", "total_cost")  # what a trial's jobs held (sweep_trial.totals)
PER_UNIT = {"total_cost": "cost", "total_gpu_hours": "gpu_hour", "total_cpu_hours": "cpu_hour"}
HOURS = {"total_gpu_hours": "GPU-hours", "total_cpu_hours": "CPU-core-hours"}


def per_unit(rows: list[dict[str, Any]]) -> None:
    """Each row's accuracy per unit of what it cost: per unit of money where a price was set (``cost.*``), else
    per GPU-hour or CPU-core-hour (``linprobe_top1_per_cost``, ``finetune_top1_per_cpu_hour``, ...)."""
    unit = next((u for u in PER_UNIT if any(isinstance(r.get(u), (int, float)) for r in rows)), None)
    for row in rows if unit else ():
        for metric in ACCURACIES[:2]:
            if isinstance(row.get(metric), (int, float)) and (row.get(unit) or 0) > 0:
                row[f"{metric}_per_{PER_UNIT[unit]}"] = row[metric] / row[unit]


def finish(grid, sweep, sweep_dir: str, uri: str, parent: str, baseline: dict | None,
           epochs: int | None = None) -> dict[str, Any]:
    """``epochs``: the base config's pre-training length (a trial's own ``train.epochs`` axis value wins)."""

    rows = add_paper(trial_rows(grid, list(sweep.search)), sweep)  # per_unit(rows) once the baseline's row is in
    client = MlflowClient(uri)
    for row in rows:
        if row["status"] != "stopped":
            continue
        found = client.search_runs([client.get_run(parent).info.experiment_id],
                                   filter_string=f"tags.`sweep.trial_id` = '{row['trial']}'")
        for run in found:  # stopped by the scheduler: recorded as stopped, not lost
            lifecycle.stopped(uri, run.info.run_id)
            row["mlflow_run_id"] = run.info.run_id
            # epochs it really ran: Tune's last result can lag an epoch the trial finished while being stopped
            row["epochs_run"] = len(client.get_metric_history(run.info.run_id, "train_loss"))
            held = run.data.metrics  # what its pre-training held until it was stopped
            row.update({f"total_{k}": held[k] for k in ("cpu_hours", "gpu_hours", "cost") if k in held})
    if baseline is not None:
        rows.append({"trial": "random-init", "status": "baseline", "mlflow_run_id": baseline["mlflow_run_id"],
                     **{k: v for k, v in baseline.items() if k.endswith(("_top1", "_top5")) or k.startswith("total_")}})
    per_unit(rows)
    columns = _columns(rows, list(sweep.search))
    table = pa.table({c: [r.get(c) for r in rows] for c in columns})
    parquet = os.path.join(sweep_dir, "sweep_results.parquet")
    pq.write_table(table, parquet + ".tmp")
    os.replace(parquet + ".tmp", parquet)
    markdown = to_markdown(rows, columns)
    pruned = early_stops(rows, epochs) if sweep.pretrain and sweep.scheduler.type != "none" else None
    if pruned is not None:  # what the scheduler stopped, and the pre-training it saved
        markdown += "\n" + pruned["summary"].removeprefix("[sweep] ").capitalize() + "\n"
    md_path = files.write_text(os.path.join(sweep_dir, "sweep_results.md"), markdown)
    plots = plot_axes(rows, list(sweep.search), sweep_dir, paper=bool(sweep.paper))
    logger = tracking.EpochLogger(uri, parent)
    for path in (parquet, md_path, *plots):
        logger.log_artifact(path, "report")
    try:  # the UI's table view (Artifacts -> report/sweep_results.json -> a sortable table)
        client.log_table(parent, {c: [r.get(c) for r in rows] for c in columns}, "report/sweep_results.json")
    except Exception as e:  # the files above are the record; a table view is a convenience
        print(f"[sweep] warning: the results table was not logged as an MLflow table ({e})", flush=True)
    best = _best(rows, sweep.metric, sweep.mode)
    if best is not None:
        tracking.log_values(uri, parent, {f"best_{sweep.metric}": best[sweep.metric]})
    if pruned is not None:
        tracking.log_values(uri, parent, {"early_stopped_trials": len(pruned["stopped"]),
                                          "epochs_saved_fraction": pruned["saved_fraction"],
                                          **({"hours_saved": pruned["saved_hours"]} if pruned["saved_hours"] else {})})
    spent = {k: sum(r[k] for r in rows if isinstance(r.get(k), (int, float))) for k in SPENT_TOTALS}
    tracking.log_values(uri, parent, {k: v for k, v in spent.items() if any(k in r for r in rows)})
    print("\n" + markdown)
    print(f"[sweep] results: {parquet}\n[sweep] plots: {', '.join(plots) or 'none (no numeric axis)'}")
    experiment_id = client.get_run(parent).info.experiment_id
    trials = [r["mlflow_run_id"] for r in rows if r.get("mlflow_run_id") and r["status"] != "baseline"]
    return {"rows": rows, "parquet": parquet, "markdown": md_path, "plots": plots, "parent_run_id": parent,
            "early_stops": pruned, "experiment_id": experiment_id,
            **ui_paths(uri, experiment_id, parent, f"sweep-{sweep.name}", varied_keys(sweep), trials,
                       spent=tuple(k for k in SPENT_TOTALS if any(k in r for r in rows)),
                       chart=os.path.basename(plots[0]) if plots else None)}


def ui_paths(uri: str, experiment_id: str, parent: str, name: str, axes: list[str],
             trial_run_ids: list[str], spent: tuple[str, ...] = (), chart: str | None = None) -> dict[str, str]:
    """Where the MLflow UI (append to its address) shows this sweep: ``runs_path``, its runs flat (not one
    collapsed parent row), best linear probe first, with the varied keys, both accuracies and what each trial
    cost (``spent``: ``total_cpu_hours``, ``total_cost``, ...) as columns (a view
    saved on the experiment, as the UI's Share button does); ``compare_path``, what the sweep varied against
    ``linprobe_top1`` and ``finetune_top1``: the parent run's ``chart`` (``report/accuracy_vs_<axis>.png``) opened
    in its artifact view, since MLflow's compare view takes its plot's axes from clicks, not from its URL; the
    compare view itself (``trials_path``) where there is no chart (no numeric axis).
    MLflow 3's UI opens in its GenAI view unless told ``workflowType=machine_learning``."""
    ml = urlencode({"workflowType": "machine_learning"})
    children = f"tags.mlflow.parentRunId = '{parent}'"
    try:
        runs = tracking.share_runs_view(uri, experiment_id, f"sweep-{parent}", name, children, axes,
                                        ("linprobe_top1", "finetune_top1", *spent), order_by="linprobe_top1")
    except Exception as e:  # e.g. no permission to tag the experiment: the same rows, columns left to pick
        print(f"[sweep] warning: the runs view was not saved on the experiment ({str(e).splitlines()[0]})",
              flush=True)
        runs = f"#/experiments/{experiment_id}/runs?" + urlencode(
            {"searchFilter": children, "orderByKey": "metrics.`linprobe_top1`", "orderByAsc": "false"})
    compare = (f"runs={quote(json.dumps(trial_run_ids, separators=(',', ':')))}"
               f"&experiments={quote(json.dumps([experiment_id]))}&{ml}")
    trials = f"#/compare-runs?{compare}"
    shown = f"#/experiments/{experiment_id}/runs/{parent}/artifactPath/report/{quote(chart)}?{ml}" if chart else trials
    return {"runs_path": f"{runs}&{ml}", "compare_path": shown, "trials_path": trials}


def ui_lines(uri: str, report: dict[str, Any]) -> list[str]:
    """How to see the sweep in the MLflow UI: the command that opens a local store, then the two links."""
    served = uri.startswith(("http://", "https://"))  # a tracking server is its own UI
    ui = redact(uri.rstrip("/")) if served else "http://127.0.0.1:5000"
    opener = [] if served else [f"open the UI with: mlflow ui --backend-store-uri {redact(uri)} --host 127.0.0.1 "
                                "--port 5000"]
    return opener + [f"the sweep's runs, what each varies and both accuracies as columns: {ui}/{report['runs_path']}",
                     f"accuracy against what it varies: {ui}/{report['compare_path']}"
                     if "/artifactPath/" in report["compare_path"] else
                     f"its trials side by side: {ui}/{report['compare_path']}"]


def early_stops(rows: list[dict[str, Any]], epochs: int | None) -> dict[str, Any] | None:
    """Which trials the scheduler stopped, after how many of their pre-training epochs (``epochs_run``, from
    MLflow, else Tune's ``training_iteration``), and the share of
    all trials' planned pre-training epochs that were therefore not run (the compute ASHA saved).
    None when the sweep has no trial rows or no known length."""
    trials = [r for r in rows if r["status"] in ("finished", "stopped")]
    planned = {r["trial"]: r.get("train.epochs") or epochs for r in trials}
    if not trials or not all(planned.values()):
        return None
    stopped = {r["trial"]: int(r.get("epochs_run", r.get("training_iteration")) or 0)
               for r in trials if r["status"] == "stopped"}
    saved = sum(planned[t] - ran for t, ran in stopped.items())
    total = sum(planned.values())
    # the hours not spent: each stopped trial's epochs not run, at what its epochs run had cost per epoch
    unit = next((k for k in ("total_gpu_hours", "total_cpu_hours") if any(k in r for r in trials)), None)
    held = {r["trial"]: r.get(unit) for r in trials if r["status"] == "stopped"} if unit else {}
    hours = sum(held[t] / ran * (planned[t] - ran) for t, ran in stopped.items() if ran and held.get(t))
    who = ", ".join(f"{t} after {ran}/{planned[t]}" for t, ran in stopped.items()) or "none"
    what = f"; about {hours:.3g} {HOURS[unit]} not spent" if hours else ""
    summary = (f"[sweep] stopped early: {len(stopped)} of {len(trials)} trials ({who}); "
               f"{saved} of {total} planned pre-training epochs not run ({100 * saved / total:.0f} % saved{what})")
    return {"stopped": stopped, "saved_epochs": saved, "planned_epochs": total, "saved_fraction": saved / total,
            "saved_hours": hours, "summary": summary}


def trial_rows(grid, axes: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        config = result.config or {}
        if result.error is not None:
            status = "error"
        elif "linprobe_top1" in metrics or "finetune_top1" in metrics or "mlflow_run_id" in metrics:
            status = "finished"
        else:
            status = "stopped"
        row = {"trial": metrics.get("trial_id", os.path.basename(result.path or "")), "status": status}
        row.update({a: config.get(a) for a in axes})
        for key in ("linprobe_top1", "linprobe_top5", "finetune_top1", "finetune_top5", "knn_top1", "train_loss",
                    "mlflow_run_id", "training_iteration", *SPENT_TOTALS):
            if key in metrics:
                row[key] = metrics[key]
        own = ("_run_id", *SPENT)  # its jobs' runs and hours: in mlflow_run_id and the totals instead
        row.update({k: v for k, v in metrics.items()  # a best_of sweep's scores per value and its best value
                    if k.startswith(("linprobe_", "finetune_")) and k not in row and not k.endswith(own)})
        rows.append(row)
    return sorted(rows, key=lambda r: tuple(str(r.get(a)) for a in axes))


def add_paper(rows: list[dict[str, Any]], sweep) -> list[dict[str, Any]]:
    """Each trial row gets the paper's numbers at its axis value (``paper_linprobe_top1``, ...), if the
    sweep file gives them: measured and published side by side."""
    if not sweep.paper:
        return rows
    axis = next(iter(sweep.search))
    paper = {axis_label(k): v for k, v in sweep.paper.items()}
    for row in rows:
        if row["status"] == "baseline":
            continue
        for metric, value in paper.get(axis_label(row.get(axis)), {}).items():
            row[f"paper_{metric}"] = float(value)
    return rows


def _columns(rows: list[dict], axes: list[str]) -> list[str]:
    order = ["trial", "status", *axes, "linprobe_top1", "paper_linprobe_top1", "linprobe_top5", "finetune_top1",
             "paper_finetune_top1", "finetune_top5", *SPENT_TOTALS, *(f"{m}_per_{u}" for m in ACCURACIES[:2]
                                                                      for u in PER_UNIT.values()),
             "knn_top1", "train_loss", "training_iteration", "epochs_run", "mlflow_run_id"]
    present = {k for r in rows for k in r}
    known = [c for c in order if c in present]
    extra = [k for r in rows for k in r if k.startswith(("linprobe_", "finetune_")) and k not in order]
    at = next((i for i, c in enumerate(known) if c in ("knn_top1", "train_loss", "training_iteration", "epochs_run",
                                                       "mlflow_run_id")), len(known))  # beside the accuracies
    return known[:at] + list(dict.fromkeys(extra)) + known[at:]


def to_markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v, column):
        if isinstance(v, float):  # hours and prices: three significant digits (a small run's are 0.001 h)
            return f"{v:.3g}" if column in SPENT_TOTALS else f"{v:.2f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c), c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_axes(rows: list[dict], axes: list[str], sweep_dir: str, paper: bool = False) -> list[str]:
    """Accuracy vs each numeric axis (mask ratio, decoder width, epochs, ...), as in the paper's figures.

    Each PNG carries the points it draws (text chunk ``mae_ray.series``: label -> [xs, ys]), so the
    picture can be checked against the results table it was drawn from.
    """
    paths = []
    for axis in axes:
        fig = axis_figure(rows, axis, paper=paper)
        if fig is None:
            continue
        series = {line.get_label(): [[float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]]
                  for a in fig.axes for line in a.get_lines()}
        path = os.path.join(sweep_dir, f"accuracy_vs_{axis.replace('.', '_')}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight", metadata={"mae_ray.series": json.dumps(series)})
        plt.close(fig)
        paths.append(path)
    return paths


def axis_figure(rows: list[dict], axis: str, paper: bool = False):
    """The figure of accuracy vs ``axis``: per accuracy, the mean over the finished trials at each value
    of the axis (sorted); the random-init linear probe as a horizontal line; with ``paper``, the paper's
    numbers in the rows as hollow markers on a second y axis (ImageNet's scale is not the demo's).
    None if < 2 values."""
    done = [r for r in rows if r["status"] == "finished"]
    points = [r for r in done if isinstance(r.get(axis), (int, float)) and not isinstance(r.get(axis), bool)]
    if len({r[axis] for r in points}) < 2:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    for metric, style in zip(ACCURACIES, ("o-", "s--", "^:"), strict=True):
        xs = sorted({r[axis] for r in points if metric in r})
        if not xs:
            continue
        ys = [_mean([r[metric] for r in points if r[axis] == x and metric in r]) for x in xs]
        ax.plot(xs, ys, style, label=metric.replace("_top1", " top-1"))
    for row in (r for r in rows if r["status"] == "baseline"):
        for metric, style, what in (("linprobe_top1", "--", "linear probe"), ("finetune_top1", ":", "fine-tune")):
            if metric in row:
                ax.axhline(row[metric], color="grey", lw=1, ls=style, label=f"random-init {what}")
    ax.set_xlabel(axis)
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    # below the plot, where it hides no point (inside, it covered the best trial's)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    if paper:
        _paper_series(ax, points, axis)
    fig.tight_layout()
    return fig


def _paper_series(ax, points: list[dict], axis: str) -> None:
    twin = None
    for metric, marker in (("paper_linprobe_top1", "o"), ("paper_finetune_top1", "s")):
        xy = sorted({(r[axis], r[metric]) for r in points if metric in r})
        if not xy:
            continue
        twin = twin or ax.twinx()
        twin.plot([x for x, _ in xy], [y for _, y in xy], marker, mfc="none", color="black", ls=":",
                  label=metric.replace("paper_", "paper ").replace("_top1", " top-1"))
    if twin is not None:
        twin.set_ylabel("paper, ImageNet (%)")
        twin.legend(fontsize=8, loc="lower right")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _best(rows: list[dict], metric: str, mode: str) -> dict | None:
    scored = [r for r in rows if r["status"] == "finished" and isinstance(r.get(metric), (int, float))]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r[metric])


# --------------------------------------------------------------------------- progress
def progress_callback(evaluates: bool, concurrent: int = 1):
    """A Tune callback (on the driver) that prints one line per ended trial: its scores and the sweep's ETA.
    ``evaluates``: whether a trial that ran to its end reports linprobe/finetune scores (else it was stopped);
    ``concurrent``: trials at a time."""
    class Progress(tune.Callback):
        def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
            self.total, self.started, self.durations = total_num_samples, {}, []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.started[trial.trial_id] = time.time()

        def _line(self, trials, trial, how: str) -> None:
            now = time.time()
            self.durations.append(now - self.started.pop(trial.trial_id, now))
            done = sum(t.status in ("TERMINATED", "ERROR") or t is trial for t in trials)  # a resume's too
            total = max(self.total or 0, len(trials), done)
            result = trial.last_result or {}
            scores = " ".join(f"{k} {result[k]:.1f}" for k in ACCURACIES if isinstance(result.get(k), (int, float)))
            print(f"[sweep] trial {done}/{total} {how} ({trial_label(trial.config)}): {scores or 'no scores'}"
                  f"{self._eta(now, total - done)}", flush=True)

        def _eta(self, now: float, left: int) -> str:
            """What the running trials still need (at the ended trials' mean length) and the queued ones, spread
            over the trials that run at a time."""
            if left <= 0 or not self.durations:
                return ""
            mean = sum(self.durations) / len(self.durations)
            running = [max(0.0, mean - (now - t)) for t in self.started.values()]
            work = sum(running) + max(0, left - len(running)) * mean
            return f"; about {max(1, round(work / max(1, concurrent) / 60))} min left"

        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            ran_out = not evaluates or any(k in result for k in ("linprobe_top1", "finetune_top1"))
            self._line(trials, trial, "finished" if ran_out else "stopped early")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, "failed")

    return Progress()
