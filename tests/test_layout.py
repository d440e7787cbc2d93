"""The package layout stays what docs/architecture.md says: layers import only downwards, every module is
listed in its "where to change what" table."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "mae_ray"

# Lowest first: a module may import from its own layer and the layers below it, never from one above.
LAYERS = ["redaction", "errors", "shipped", "storage", "provenance", "model", "config", "tracking", "data", "train",
          "cluster", "jobs", "cli"]
# Known upward imports, each with its reason.
ALLOWED_UP = {
    ("config", "train.recipe"): "the effective-batch rule the config checks up front (torch-free)",
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
