"""``mae-ray quickstart``: the offline demo, end to end, on whatever machine this is.

Builds the demo shards if absent (no download), pre-trains a tiny MAE on local Ray with MLflow's
sqlite default, and prints where everything is and how to open the MLflow UI.
"""

from __future__ import annotations

import os
import sys

from mae_ray.cli import guarded, job_parser, quiet_logs
from mae_ray.config import load_config

DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs", "demo_cpu.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("mae-ray quickstart", "demo data + MAE pre-training on local Ray, offline")
    parser.add_argument("--data-dir", default="data/demo", help="where the demo dataset is (or is built)")
    args = parser.parse_args(argv)
    quiet_logs(args.verbose)

    def job() -> int:
        from data_tools.demo_data import build_demo_dataset
        from mae_ray import pretrain

        cfg = load_config(args.config or _packaged_config(), args.overrides)
        print(f"[quickstart] demo dataset in {os.path.abspath(args.data_dir)} (built if absent)", flush=True)
        demo = build_demo_dataset(args.data_dir)
        cfg.data.train_shards, cfg.data.val_shards = demo["train"], demo["val"]
        summary = pretrain.run(cfg, verbose=args.verbose)
        tracking_uri = summary["mlflow_tracking_uri"]
        print("\n[quickstart] done")
        print(f"  final train loss  {summary['metrics'].get('train_loss', float('nan')):.4f}")
        print(f"  encoder           {summary['encoder']}")
        print(f"  pictures          {os.path.join(os.path.abspath(cfg.output_dir), 'reconstructions')}")
        print(f"  mlflow run        {summary['mlflow_run_id']}")
        if tracking_uri.startswith(("http://", "https://")):
            print(f"  open the UI at    {tracking_uri}")
        else:
            print(f"  open the UI with  mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1 --port 5000")
        return 0

    return guarded(job)


def _packaged_config() -> str:
    path = os.path.abspath(DEFAULT_CONFIG)
    if not os.path.isfile(path):  # installed without the repository's experiments/ folder
        from mae_ray.errors import UserError

        raise UserError(f"default config not found at {path}; pass --config")
    return path


if __name__ == "__main__":
    sys.exit(main())
