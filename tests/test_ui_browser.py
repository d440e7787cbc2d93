"""What a person sees in the MLflow UI, read from the page a headless Chromium draws (issue 30 item 3): the two
links a sweep prints open its trials with what they vary and both accuracies as columns, best probe first, the
random-init reference as one row; and the chart of both accuracies against the varied setting.

The runs are made as a sweep makes them (``lifecycle.open_run`` under a parent, the report's metrics, the chart
as the parent's artifact) and the links come from ``sweep_report.ui_paths``, so no Ray run is needed: what is
tested is that MLflow's UI, served by a real ``mlflow server``, shows what those links say. The REST-level
checks of a real sweep's runs are in tests/test_sweep.py. Needs a headless Chromium (Debian:
``apt-get install chromium-headless-shell``); skipped without one. ``experiments/mlflow_screenshots.sh`` takes
the README's pictures the same way.
"""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import pytest
from _helpers import MlflowServer
from mlflow import MlflowClient

from mae_ray.jobs import lifecycle, sweep_report

CHROME = shutil.which("chromium-headless-shell") or shutil.which("chromium")
pytestmark = pytest.mark.skipif(not CHROME, reason="no headless Chromium: apt-get install chromium-headless-shell")

TRIALS = {0.6: (61.1, 37.5), 0.75: (57.2, 39.4), 0.9: (54.6, 35.2)}  # mask ratio: linear probe, fine-tuning
BASELINE = (53.4, 39.5)


def page_text(url: str, budget_ms: int = 60000) -> str:
    """The page's DOM after its scripts ran (Chromium's virtual time lets the React app fetch and draw)."""
    out = subprocess.run([CHROME, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=2400,1500",
                          f"--virtual-time-budget={budget_ms}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=240)
    return out.stdout


def visible(dom: str) -> str:
    """The DOM's text, tags and scripts removed: what the page shows in words."""
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", dom, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))


@pytest.fixture(scope="module")
def sweep_ui(tmp_path_factory):
    """A served store holding a sweep's runs as mae-ray makes them, and the sweep's two links."""
    server = MlflowServer(tmp_path_factory.mktemp("ui"))
    uri = server.start()
    try:
        client = MlflowClient(uri)
        parent = lifecycle.open_run(uri, "ui", "sweep-demo", {"sweep.name": "demo"}, {"mae_ray.job": "sweep"})
        exp = client.get_run(parent).info.experiment_id
        ids = {}
        for ratio, (probe, tune) in TRIALS.items():
            ids[ratio] = lifecycle.open_run(uri, "ui", f"mask_ratio={ratio}", {"model.mask_ratio": str(ratio)},
                                            {"sweep.trial_id": f"t{ratio}"}, parent_run_id=parent)
            for key, value in (("linprobe_top1", probe), ("finetune_top1", tune), ("total_cpu_hours", 0.05)):
                client.log_metric(ids[ratio], key, value)
        base = lifecycle.open_run(uri, "ui", "random-init", {"model.mask_ratio": "n/a: random init"},
                                  {"sweep.random_init": parent}, parent_run_id=parent)
        for key, value in (("linprobe_top1", BASELINE[0]), ("finetune_top1", BASELINE[1])):
            client.log_metric(base, key, value)
        chart = tmp_path_factory.mktemp("chart") / "accuracy_vs_model_mask_ratio.png"
        chart.write_bytes(_png())
        client.log_artifact(parent, str(chart), "report")
        paths = sweep_report.ui_paths(uri, exp, parent, "sweep-demo", ["model.mask_ratio"], list(ids.values()),
                                      spent=("total_cpu_hours",), chart=chart.name)
        yield uri, paths, ids
    finally:
        server.stop()


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (40, 90, 160)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_runs_link_shows_each_trial_with_what_it_varies_and_both_accuracies(sweep_ui):
    uri, paths, ids = sweep_ui
    text = visible(page_text(f"{uri}/{paths['runs_path']}"))
    for column in ("model.mask_ratio", "linprobe_top1", "finetune_top1", "total_cpu_hours"):
        assert column in text, f"column {column} not shown: {text[:3000]}"
    # the rows, best linear probe first, then their cells in the grid's order (fine-tuning, probe, CPU-core-hours,
    # mask ratio): each trial one row with both accuracies, the random-init reference one row with both too
    names = [text.index(name) for name in ("mask_ratio=0.6", "mask_ratio=0.75", "mask_ratio=0.9", "random-init")]
    assert names == sorted(names), "best linear probe first, random init (the lowest probe) last"
    cells = " ".join([*(f"{tune} {probe} 0.05 {ratio}" for ratio, (probe, tune) in TRIALS.items()),
                      f"{BASELINE[1]} {BASELINE[0]} - n/a: random init"])
    assert cells in text, text[:3000]
    assert "4 matching runs" in text  # the trials and the reference: the parent run is not a row among them

def test_the_chart_link_opens_the_plot_of_accuracy_against_the_varied_setting(sweep_ui):
    uri, paths, _ = sweep_ui
    dom = page_text(f"{uri}/{paths['compare_path']}")
    # the sweep's chart, fetched and drawn (the artifact view loads it into a blob: URL), not a compare view
    assert re.search(r'<img alt="report/accuracy_vs_model_mask_ratio\.png" src="blob:', dom), visible(dom)[:3000]
