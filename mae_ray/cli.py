"""The ``mae-ray`` command: subcommands dispatch to the jobs; shared argument and error handling."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from mae_ray.errors import UserError

# subcommand -> module with a ``main(argv) -> int``
COMMANDS = {
    "pretrain": ("mae_ray.jobs.pretrain", "MAE pre-training on Ray Train"),
    "linprobe": ("mae_ray.jobs.linprobe", "linear probe of a frozen encoder"),
    "finetune": ("mae_ray.jobs.finetune", "end-to-end fine-tuning of an encoder"),
    "evaluate": ("mae_ray.jobs.evaluate", "linear probe then fine-tune a pre-training run or checkpoint"),
    "sweep": ("mae_ray.jobs.sweep", "Ray Tune sweep: pre-train + evaluate over a search space"),
    "quickstart": ("mae_ray.jobs.quickstart", "demo data + the quickstart sweep, offline"),
}


def job_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """``--config FILE``, repeated ``--set key=value`` and ``--verbose``: what every job takes."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML run config (see experiments/configs/)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set model.mask_ratio=0.6 (repeatable)",
    )
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own logs")
    return parser


def quiet_logs(verbose: bool) -> None:
    """One line per epoch by default; third-party chatter only at WARNING unless --verbose."""
    # Our own logger gets a handler; the root logger gets none, because Ray re-emits worker output
    # through loggers that propagate to it and every line would print twice.
    ours = logging.getLogger("mae_ray")
    if not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        for name in ("ray", "ray.train", "ray.tune", "mlflow", "alembic", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.WARNING)


def guarded(fn: Callable[[], int]) -> int:
    """Run a job; a user mistake becomes one ``error:`` line on stderr and exit code 2."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: mae-ray COMMAND [options]\n\ncommands:\n" + "\n".join(lines))
        unknown = argv and argv[0] not in ("-h", "--help")
        if unknown:
            print(f"error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2 if unknown or not argv else 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
