"""The ``mae-ray`` command (also ``python -m mae_ray``): every subcommand's arguments, one line per user mistake.

The only module that parses arguments or prints a job's closing line. Each subcommand loads its config
and calls its job's ``run()`` (``mae_ray.jobs.*``); the job modules import nothing from here. A
``UserError`` anywhere in a job becomes one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable

from mae_ray import redaction
from mae_ray.errors import ConfigError, UserError


# --------------------------------------------------------------------------- the subcommands
def _pretrain(args: argparse.Namespace) -> int:
    from mae_ray.config import load_config
    from mae_ray.jobs import pretrain

    cfg = load_config(args.config, args.overrides)
    summary = pretrain.run(cfg, resume_from=args.resume_from, verbose=args.verbose)
    m = summary["metrics"]
    print(f"[pretrain] done: {m.get('epoch', -1) + 1} epochs, final loss {m.get('train_loss', float('nan')):.4f}, "
          f"{summary['wall_time_s']}s; result: {os.path.join(os.path.abspath(cfg.output_dir), 'result.json')}; "
          f"mlflow run {summary['mlflow_run_id']}", flush=True)
    return 0


def _evaluation(job: str) -> Callable[[argparse.Namespace], int]:
    def go(args: argparse.Namespace) -> int:
        import importlib

        from mae_ray.config import load_config

        cfg = load_config(args.config, args.overrides)
        s = importlib.import_module(f"mae_ray.jobs.{job}").run(cfg, verbose=args.verbose, resume_from=args.resume_from)
        print(f"[{job}] top-1 {s[f'{job}_top1']:.2f}  top-5 {s[f'{job}_top5']:.2f}  (encoder {s['encoder']}); "
              f"result: {os.path.join(cfg.output_dir, 'result.json')}", flush=True)
        return 0

    return go


def _evaluate(args: argparse.Namespace) -> int:
    from mae_ray.jobs import evaluate

    cfg, s = evaluate.run_spec(evaluate.as_spec(args.run), args.config, args.overrides, skip=tuple(args.skip),
                               verbose=args.verbose, trust_recorded=args.trust_recorded)
    shown = "  ".join(f"{k} {v:.2f}" for k, v in s.items() if k.endswith(("_top1", "_top5")))
    print(f"[evaluate] {shown}  (encoder {s['encoder']}); result: {os.path.join(cfg.output_dir, 'result.json')}",
          flush=True)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from mae_ray import shipped, tracking
    from mae_ray.jobs import sweep, sweep_report
    from mae_ray.jobs.sweep_config import load_sweep

    if not args.config:
        raise ConfigError("--config is required: a sweep file, or a shipped sweep's name (e.g. --config quickstart)")
    path = os.path.abspath(shipped.resolve(args.config, "sweeps"))
    sweep_cfg, base = load_sweep(path, args.overrides)
    report = sweep.run(sweep_cfg, base, path, resume=args.resume, verbose=args.verbose)
    for line in sweep_report.ui_lines(tracking.resolve_tracking_uri(base.mlflow.tracking_uri), report):
        print(f"[sweep] {line}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from mae_ray.jobs import quickstart

    quickstart.run(args.config, args.data_dir, args.overrides, verbose=args.verbose, storage_uri=args.storage,
                   endpoint_url=args.endpoint_url)
    return 0


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default="data/demo", help="where the demo dataset is (or is built)")
    p.add_argument("--storage", help="s3://bucket/prefix: demo shards, sweep state and checkpoints there "
                                     "(what a multi-node cluster needs)")
    p.add_argument("--endpoint-url", help="the S3-compatible server of --storage (MinIO, R2, ...); default "
                                          "$AWS_ENDPOINT_URL, else AWS")


def _reproduce(args: argparse.Namespace) -> int:
    from mae_ray.config import load_config
    from mae_ray.jobs import reproduce

    store = load_config(args.config, args.overrides).mlflow.tracking_uri  # which store holds the run
    reproduce.run(args.run, store, args.out, start=args.start, trust_recorded=args.trust_recorded)
    return 0


def _reproduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="the run's MLflow id (or runs:/ID); its store: --set mlflow.tracking_uri=... or "
                               "$MLFLOW_TRACKING_URI")
    p.add_argument("--out", help="where to write its config (default reproduce-<id>.yaml)")
    p.add_argument("--start", action="store_true", help="run it again now")
    _trust_recorded(p)


def _resume_from(job: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("--resume-from", help=f"checkpoint directory (or state.pt) of a stopped {job} run to continue")

    return add


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="MLflow run id, runs:/ID, a checkpoint directory, an official .pth, "
                                                "or random")
    p.add_argument("--skip", choices=["linprobe", "finetune"], action="append", default=[],
                   help="leave out one of the two evaluations")
    _trust_recorded(p)


def _export(args: argparse.Namespace) -> int:
    from mae_ray.jobs import evaluate, export

    done = export.run(evaluate.as_spec(args.source), args.format, args.out, config=args.config,
                      overrides=args.overrides)
    print(f"[export] {done['format']}: {', '.join(done['files'])} in {done['out']} (encoder {done['encoder']})",
          flush=True)
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="MLflow run id, runs:/ID, a checkpoint directory or an official .pth")
    p.add_argument("--format", required=True, choices=["timm", "hf", "release"],
                   help="timm (timm.create_model('local-dir:OUT')), hf (transformers' ViTMAEModel / ViTModel; the "
                        "[hf] extra) or release (the MAE release's checkpoint.pth)")
    p.add_argument("--out", required=True, help="a new (or empty) folder: the weights, their config, README.md")


def _trust_recorded(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-recorded", action="store_true",
                   help="take the record's addresses (tracking URI, S3 endpoint, Ray address), folders and shard "
                        "specs that run programs (pipe:, gs://, http) too; by default they are yours to set")


# name -> (help, extra arguments, handler)
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "pretrain": ("MAE pre-training on Ray Train", _resume_from("pre-training"), _pretrain),
    "linprobe": ("linear probe of a frozen encoder", _resume_from("linprobe"), _evaluation("linprobe")),
    "finetune": ("end-to-end fine-tuning of an encoder", _resume_from("finetune"), _evaluation("finetune")),
    "evaluate": ("linear probe then fine-tune a pre-training run or checkpoint", _evaluate_args, _evaluate),
    "sweep": ("Ray Tune sweep: pre-train + evaluate over a search space",
              lambda p: p.add_argument("--resume", action="store_true", help="continue a killed or stopped sweep"),
              _sweep),
    "quickstart": ("demo data + the quickstart sweep, offline", _quickstart_args, _quickstart),
    "reproduce": ("the config, command and environment differences of a recorded run", _reproduce_args,
                  _reproduce),
    "export": ("an encoder for timm, Hugging Face or the MAE release, with a model card", _export_args, _export),
}


# --------------------------------------------------------------------------- shared plumbing
class _Parser(argparse.ArgumentParser):
    """A usage mistake is one ``error:`` line and exit 2, like every other user mistake (argparse alone adds
    the whole usage text); its subcommand parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="mae-ray", description="MAE pre-training, evaluation and sweeps on Ray")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (help_, extra, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", help="YAML run config, or a shipped one's name (e.g. mae_vit_base_800ep); "
                                        "for sweep, a sweep file or a shipped sweep's name (e.g. quickstart)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one config key, e.g. --set model.mask_ratio=0.6 (repeatable)")
        p.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own logs")
        extra(p)
        p.set_defaults(handler=handler)
    return top


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
        print(f"error: {redaction.redact(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    redaction.install()  # first: every line this process prints, its tracebacks and log lines included
    top = parser()
    args = top.parse_args(sys.argv[1:] if argv is None else argv)  # a usage mistake: argparse's line, exit 2
    if args.command is None:
        top.print_help()
        return 2
    quiet_logs(args.verbose)
    # what every MLflow run of this command records as its command line (processes it starts inherit it)
    from mae_ray.provenance import COMMAND_ENV, ray_outside_tested_range

    os.environ[COMMAND_ENV] = shlex.join(["mae-ray", *(sys.argv[1:] if argv is None else argv)])
    untested = ray_outside_tested_range()
    if untested:
        print(untested, file=sys.stderr)
    try:
        return guarded(lambda: args.handler(args))
    finally:
        for stream in (sys.stdout, sys.stderr):  # a last line without its newline, redacted
            stream.flush()


if __name__ == "__main__":
    sys.exit(main())
