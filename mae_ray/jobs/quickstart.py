"""``mae-ray quickstart``: the offline demo, end to end, on whatever machine this is.

Builds the demo shards if absent (no download), runs the quickstart sweep (mask ratios; every trial
pre-trained, linear-probed and fine-tuned, plus a random-init reference row) on local Ray with
MLflow's sqlite default, and prints the table, the plots and how to open the MLflow UI.
"""

from __future__ import annotations

import os
import time

from mae_ray.errors import UserError

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "experiments")
DEFAULT_SWEEP = os.path.join(EXPERIMENTS, "sweeps", "quickstart.yaml")


def run(config: str | None, data_dir: str, overrides: list[str], verbose: bool = False) -> dict:
    """Build the demo data if absent, run the quickstart sweep, print where everything is; returns the report."""
    from data_tools.demo_data import build_demo_dataset
    from mae_ray import tracking
    from mae_ray.jobs import sweep as sweeps
    from mae_ray.jobs.sweep_config import load_sweep

    config = os.path.abspath(config or DEFAULT_SWEEP)
    if not os.path.isfile(config):  # installed without the repository's experiments/ folder
        raise UserError(f"sweep config not found at {config}; pass --config")
    print(f"[quickstart] demo dataset in {os.path.abspath(data_dir)} (built if absent)", flush=True)
    demo = build_demo_dataset(data_dir)
    name = f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep, base = load_sweep(config, [f"name={name}", *overrides])
    base["data"].update(train_shards=demo["train"], val_shards=demo["val"])
    start = time.time()
    report = sweeps.run(sweep, base, config, verbose=verbose)
    uri = tracking.resolve_tracking_uri(base["mlflow"]["tracking_uri"])
    print(f"\n[quickstart] done in {(time.time() - start) / 60:.1f} min")
    print(f"  table   {report['markdown']}")
    print(f"  plots   {', '.join(report['plots']) or 'none'}")
    print(f"  mlflow  sweep run {report['parent_run_id']} (one child run per trial)")
    if uri.startswith(("http://", "https://")):
        print(f"  open the UI at {uri}")
    else:
        print(f"  open the UI with: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return report
