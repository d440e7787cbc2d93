"""``mae-ray quickstart``: the offline demo, end to end, on whatever machine this is.

Builds the demo shards if absent (no download), runs the quickstart sweep (mask ratios; every trial
pre-trained, linear-probed and fine-tuned, plus a random-init reference row) on local Ray with
MLflow's sqlite default, and prints the table, the plots and how to open the MLflow UI.

``--storage s3://bucket/prefix`` (and, off AWS, ``--endpoint-url``): the same quickstart with nothing but
the bucket shared: the demo shards are uploaded to ``<storage>/demo-data/`` (once; reused while they
match), and the sweep's state and every trial's checkpoints go to ``<storage>/<sweep name>/``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from data_tools.bucket import upload_dataset
from data_tools.demo_data import build_demo_dataset
from mae_ray import shipped, storage, tracking
from mae_ray.data.shards import MANIFEST_NAME
from mae_ray.errors import UserError
from mae_ray.jobs import sweep as sweeps
from mae_ray.jobs import sweep_report
from mae_ray.jobs.sweep_config import load_sweep


def prepare(config: str | None, data_dir: str, overrides: list[str], storage_uri: str | None = None,
            endpoint_url: str | None = None):
    """The quickstart's sweep and base config, its demo data built (and, with ``storage_uri``, in the bucket)."""
    config = os.path.abspath(shipped.resolve(config or "quickstart", "sweeps"))
    extra = []
    if storage_uri:
        storage.use_endpoint(endpoint_url)
        if storage.is_object_uri(storage_uri):
            storage.check_writable(storage_uri)  # a missing bucket or wrong key: one line, before any work
        extra.append(f"storage_path={storage_uri}")
        if endpoint_url:
            extra.append(f"overrides.storage.endpoint_url={endpoint_url}")
    elif endpoint_url:
        raise UserError("--endpoint-url names the S3 server of --storage: pass --storage s3://bucket/prefix too")
    print(f"[quickstart] demo dataset in {os.path.abspath(data_dir)} (built if absent)", flush=True)
    demo = build_demo_dataset(data_dir)
    name = f"quickstart-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep, base = load_sweep(config, [f"name={name}", *extra, *overrides])
    shards = {split: demo[split] for split in ("train", "val")}
    if storage_uri and storage.is_object_uri(storage_uri):
        shards = {split: _in_bucket(demo, split, f"{storage_uri.rstrip('/')}/demo-data/{split}")
                  for split in ("train", "val")}
    base.data.train_shards, base.data.val_shards = shards["train"], shards["val"]
    return sweep, base, config


def _in_bucket(demo: dict, split: str, uri: str) -> str:
    """The demo split's shards under ``uri``: uploaded unless the same dataset is there already."""
    local = Path(demo[f"{split}_dir"])
    manifest = f"{uri}/{MANIFEST_NAME}"
    if not (storage.exists(manifest) and storage.read_bytes(manifest) == (local / MANIFEST_NAME).read_bytes()):
        print(f"[quickstart] uploading the demo {split} shards to {uri}", flush=True)
        upload_dataset(local, uri)
    return f"{uri}/{os.path.basename(demo[split])}"


def reading(rows: list[dict]) -> list[str]:
    """What the table says, in words: each MAE trial against the random-init encoder, for each protocol."""
    base = next((r for r in rows if r["status"] == "baseline"), None)
    trials = [r for r in rows if r["status"] == "finished"]
    said = []
    for metric, what in (("linprobe_top1", "linear probe"), ("finetune_top1", "fine-tuning")):
        mae = [r[metric] for r in trials if isinstance(r.get(metric), (int, float))]
        if not mae or base is None or not isinstance(base.get(metric), (int, float)):
            continue
        ref, low, high = base[metric], min(mae), max(mae)
        if low > ref:
            said.append(f"{what}: every MAE trial beats random init ({low:.1f}-{high:.1f} vs {ref:.1f})")
        elif high < ref:
            said.append(f"{what}: random init beats every MAE trial ({ref:.1f} vs {low:.1f}-{high:.1f}) at this "
                        "budget; docs/results.md measures where MAE starts to pay off on this data, and why")
        else:
            said.append(f"{what}: MAE trials {low:.1f}-{high:.1f}, random init {ref:.1f}")
    return said


def run(config: str | None, data_dir: str, overrides: list[str], verbose: bool = False,
        storage_uri: str | None = None, endpoint_url: str | None = None) -> dict:
    """Build the demo data if absent, run the quickstart sweep, print where everything is; returns the report."""
    sweep, base, config = prepare(config, data_dir, overrides, storage_uri, endpoint_url)
    start = time.time()
    report = sweeps.run(sweep, base, config, verbose=verbose)
    uri = tracking.resolve_tracking_uri(base.mlflow.tracking_uri)
    print(f"\n[quickstart] done in {(time.time() - start) / 60:.1f} min")
    for line in reading(report["rows"]):
        print(f"  {line}")
    print(f"  table   {report['markdown']}")
    print(f"  plots   {', '.join(report['plots']) or 'none'}")
    print(f"  mlflow  sweep run {report['parent_run_id']} (one child run per trial)")
    if sweep.storage_path:
        print(f"  state   {sweep.storage_path.rstrip('/')}/{sweep.name} (Tune, checkpoints, results)")
    for line in sweep_report.ui_lines(uri, report):
        print(f"  {line}")
    return report
