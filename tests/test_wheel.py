"""mae-ray as a user gets it from `pip install .`: a wheel, installed with no checkout on the path, finds its
shipped configs and sweep files by name from any folder, and trains from one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv holding only the wheel; the dependencies come from this venv's site-packages as a plain path
    (its .pth files, the editable install's finder among them, are not run: the checkout stays off sys.path)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # what the build reads, and nothing a build left in the checkout (its egg-info)
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "mae_ray", "data_tools"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).exists():
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp / "dist"), str(source)], check=True, cwd=tmp)
    [wheel] = (tmp / "dist").glob("mae_ray-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True)
    return venv


def run(venv: Path, cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_wheel_imports_from_itself_and_ships_every_config_and_sweep(installed, tmp_path):
    out = run(installed, tmp_path, "python", "-c", "import json, os, sys, mae_ray, data_tools;"
              "from mae_ray import shipped; print(json.dumps([mae_ray.__file__, data_tools.__file__,"
              " [os.path.abspath(p) for p in sys.path],"
              " shipped.names('configs'), shipped.names('sweeps')]))")
    package, tools, path, configs, sweeps = json.loads(out.stdout)
    assert package.startswith(str(installed)) and tools.startswith(str(installed))
    assert str(ROOT) not in path, "the checkout is on the path"
    shipped_here = ROOT / "mae_ray" / "shipped"
    assert configs == sorted(p.stem for p in (shipped_here / "configs").glob("*.yaml"))
    assert sweeps == sorted(p.stem for p in (shipped_here / "sweeps").glob("*.yaml"))
    for args in (["mae-ray", "quickstart", "--help"], ["python", "-m", "data_tools.make_shards", "--help"]):
        assert "usage:" in run(installed, tmp_path, *args).stdout


def test_a_shipped_sweep_and_its_base_load_by_name_from_any_folder(installed, tmp_path):
    out = run(installed, tmp_path, "python", "-c", "from mae_ray.jobs.sweep_config import load_sweep;"
              "sweep, base = load_sweep('quickstart', []); print(sweep.name, base.model.name)")
    assert out.stdout.split() == ["quickstart", "mae_vit_tiny_patch4"]
    missing = run(installed, tmp_path, "mae-ray", "sweep", "--config", "no_such_sweep", check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(
        "error: sweep file not found: no_such_sweep (no such file, and no shipped sweep file of that name: ")


def test_a_tiny_pretraining_from_a_shipped_config_by_name(installed, tmp_path, demo_data):
    run(installed, tmp_path, "mae-ray", "pretrain", "--config", "demo_cpu",
        "--set", "model.name=mae_vit_micro_patch4", "--set", f"data.train_shards={demo_data['train']}",
        "--set", f"data.val_shards={demo_data['val']}", "--set", "data.samples_per_epoch=64",
        "--set", "data.num_workers=0", "--set", "train.batch_size=32", "--set", "train.effective_batch=32",
        "--set", "train.epochs=1", "--set", "train.warmup_epochs=0", "--set", "train.visualize_every=0",
        "--set", "ray.num_workers=0", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
        "--set", "output_dir=run")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert Path(result["encoder"]).is_file() and result["metrics"]["epoch"] == 0, result
    assert not (tmp_path / "demo_cpu").exists() and not (tmp_path / "demo_cpu.yaml").exists()
