"""The package layout stays what docs/architecture.md says: layers import only downwards, every module is
listed in its "where to change what" table."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mae_ray"

# Lowest first: a module may import from its own layer and the layers below it, never from one above.
LAYERS = ["redaction", "errors", "shipped", "storage", "provenance", "model", "typed_yaml", "config_checks", "config",
          "tracking",
          "data", "train", "cluster", "jobs", "cli"]
# Known upward imports, each with its reason.
ALLOWED_UP = {
    ("config_checks", "train.recipe"): "the effective-batch rule the config checks up front (torch-free)",
    ("config_checks", "config"): "the config's classes, for annotations only (TYPE_CHECKING)",
}


def layer(module: str) -> str:
    """``mae_ray.jobs.sweep`` -> ``jobs``; ``mae_ray.config`` -> ``config``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "mae_ray"


def imports_of(path: Path) -> set[str]:
    """Every ``mae_ray.*`` module this file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mae_ray"):
            if node.module == "mae_ray" or node.module.count(".") == 1 and (PKG / node.module[8:]).is_dir():
                found.update(f"{node.module}.{a.name}" for a in node.names)  # from mae_ray.train import engine
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mae_ray"))
    return found


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.name != "__init__":
            out[".".join(rel.parts)] = path
    return out


def test_no_module_imports_a_layer_above_it():
    assert {layer(m) for m in modules()} - {"__main__"} <= set(LAYERS), "a new package: give it a layer"
    wrong = []
    for name, path in modules().items():
        if name == "mae_ray.__main__":
            continue
        for target in imports_of(path):
            lo, hi = layer(name), layer(target)
            if hi == "mae_ray":
                hi = target.split(".")[1]
            exempt = (lo, ".".join(target.split(".")[1:3])) in ALLOWED_UP or (lo, hi) in ALLOWED_UP
            if LAYERS.index(hi) > LAYERS.index(lo) and not exempt:
                wrong.append(f"{name} imports {target} ({lo} is below {hi})")
    assert not wrong, "\n".join(wrong)


def test_every_module_is_in_the_architecture_table():
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.split("## Where to change what", 1)[1]
    missing = [name for name, path in modules().items()
               if path.name != "__main__.py" and f"`{path.relative_to(ROOT)}`" not in table]
    assert not missing, f"not in docs/architecture.md's table: {missing}"


# Dotted names in the document that are not code: MLflow tags and the like.
NOT_CODE = {"sweep.trial_id": "the MLflow tag a trial's run carries", "mae_ray.env": "the provenance tags' prefix"}
OURS = {"mae_ray", "data_tools", "experiments", "docs", "tests", *(p.name for p in PKG.iterdir() if p.is_dir())}
FILE_SUFFIXES = {"py", "yaml", "md", "json", "pt", "pth", "safetensors", "parquet", "png", "tar", "lock", "toml",
                 "db", "txt", "whl", "html", "sh", "NNNNNN"}


def defined_names(path: Path) -> dict[str, set[str]]:
    """Top-level names of a module (key ``""``) and the attributes of each class in it (key: the class)."""
    tree = ast.parse(path.read_text())
    found: dict[str, set[str]] = {"": set()}
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found[""].add(node.name)
        if isinstance(node, ast.ClassDef):
            found[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
            found[node.name] |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)
                                 and isinstance(n.target, ast.Name)}
        elif isinstance(node, ast.Assign):
            targets = [t for target in node.targets
                       for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            found[""] |= {(a.asname or a.name).split(".")[0] for a in node.names}
        found[""] |= {t.id for t in targets if isinstance(t, ast.Name)}
    return found


def test_every_module_file_and_function_the_architecture_names_exists():
    """docs/architecture.md stays true: each file or folder it names exists, and each ``module.name`` (or
    ``Class.method``) it names is defined there."""
    from mae_ray import config

    text = (ROOT / "docs" / "architecture.md").read_text()
    files = {p.stem: p for p in [*PKG.rglob("*.py"), *(ROOT / "data_tools").glob("*.py")] if p.stem != "__init__"}
    files |= {p.name: p / "__init__.py" for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    classes = {cls: names for path in files.values() for cls, names in defined_names(path).items() if cls}
    sections = {f.name: {g.name for g in dataclasses.fields(f.type if isinstance(f.type, type) else
                                                                getattr(config, f.type))}
                for f in dataclasses.fields(config.Config) if f.name != "output_dir"}
    wrong = []
    for span in re.findall(r"`([^`\n]+)`", text) + re.findall(r"```\n(.*?)```", text, re.S):
        for path in re.findall(r"(?<![\w./])((?:[\w*{},]+/)+[\w*{},]*(?:\.\w+)?)", span):
            path = path.rstrip(",")
            if path.split("/")[0] not in OURS or "://" in span:
                continue  # a path of a run's outputs, an MLflow artifact folder, "NCCL/Gloo"
            path, _, attr = path.partition(".") if path.rsplit(".", 1)[-1] not in FILE_SUFFIXES else (path, "", "")
            where = [ROOT / path, PKG / path, ROOT / f"{path}.py", PKG / f"{path}.py"]
            found = [m for p in where for m in p.parent.glob(p.name)]
            if not found:
                wrong.append(f"no such file or folder: {path}")
            elif attr and attr not in defined_names(found[0])[""]:
                wrong.append(f"{path}.{attr}: not defined in {found[0]}")
        for file in re.findall(r"(?<![\w/.])(\w+\.py)\b", span):  # a bare file name: somewhere in the tree
            if not any(next((ROOT / top).rglob(file), None) for top in ("mae_ray", "data_tools", "experiments")):
                wrong.append(f"no such file: {file}")
        for first, attr in re.findall(r"(?<![\w./-])([A-Za-z_]\w*)\.([A-Za-z_]\w*)(?![\w/])", span):
            if attr in FILE_SUFFIXES or f"{first}.{attr}" in NOT_CODE or first not in files | classes:
                continue
            known = classes.get(first) if first in classes else defined_names(files[first])[""]
            if attr not in known and attr not in sections.get(first, ()):
                wrong.append(f"{first}.{attr}: not defined in {files.get(first, first)}")
    assert not wrong, "docs/architecture.md names what is not there:\n" + "\n".join(sorted(set(wrong)))


RUN_STATUS_CALLS = {"start_run", "end_run", "end_run_or_warn", "set_terminated", "create_run", "update_run", "_close"}


def test_only_the_lifecycle_opens_runs_and_sets_their_status():
    """Every MLflow run is opened and given its status by jobs/lifecycle.py (open_run; an Ending block, or
    stopped()); tracking.py holds the MLflow calls those make. A sweep's parent, its trials, the random-init
    baseline and stopped trials go through them too."""
    owners = {"mae_ray.jobs.lifecycle", "mae_ray.tracking"}
    wrong = []
    for name, path in modules().items():
        if name in owners:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in RUN_STATUS_CALLS:
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.func.attr}(...)")
    assert not wrong, "MLflow runs opened or ended outside jobs/lifecycle.py:\n" + "\n".join(wrong)


HELP_PROBE = """
import sys
from mae_ray import cli
for args in [["--help"]] + [[name, "--help"] for name in cli.COMMANDS]:
    try:
        cli.main(args)
    except SystemExit:
        pass
print("loaded:", *(m for m in ("torch", "ray", "mlflow", "timm", "torchvision") if m in sys.modules))
"""


def test_help_loads_neither_torch_nor_ray():
    """Why the CLI and the job modules import torch, Ray and MLflow inside functions, not at the top: ``mae-ray
    --help`` (and a config mistake, one line before any work) answers in well under a second, not after ~5 s
    of imports on a 2-core machine."""
    out = subprocess.run([sys.executable, "-c", HELP_PROBE], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "loaded:", out.stdout.strip().splitlines()[-1]


def test_the_worker_side_of_a_job_imports_nothing_of_the_driver_side():
    """A job's ``train_loop`` runs on Ray Train workers: what it builds comes from ``model/``, ``train/``, ``data/``
    and ``cluster/``, never from another job module (``jobs.encoders`` resolves an encoder once, on the driver; the
    worker gets its weights and architecture in its ``WorkerSpec``)."""
    wrong = []
    for name, path in modules().items():
        if layer(name) != "jobs":
            continue
        for fn in ast.walk(ast.parse(path.read_text())):
            if isinstance(fn, ast.FunctionDef) and fn.name == "train_loop":
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mae_ray.jobs"):
                        wrong.append(f"{name}.train_loop imports {node.module}")
    assert not wrong, "\n".join(wrong)
