"""What produced a run: package versions, hardware, the command line and the code's state.

Every MLflow run mae-ray creates carries these as ``mae_ray.env.*`` tags (``tracking.run_tags``), plus
MLflow's own ``mlflow.source.git.commit``; when the checkout has uncommitted changes the diff goes to
the run as the artifact ``provenance/git_diff.patch``. Knows nothing of Ray Train or MLflow (Ray is asked,
if it is running, only how many nodes it has).
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
import sys

TESTED_RAY = ">=2.60,<2.61"  # pyproject.toml's range (a test keeps them equal): Ray internals move between minors
PACKAGES = ("torch", "torchvision", "timm", "ray", "mlflow", "webdataset", "pyarrow", "numpy")
COMMAND_ENV = "MAE_RAY_COMMAND"  # the command a driver was started with, for the processes it starts
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout mae_ray was imported from


def ray_outside_tested_range() -> str | None:
    """One warning line when the installed Ray is not one the code was tested with (a cluster image's Ray,
    an install that ignored pyproject.toml), else None."""
    from packaging.specifiers import SpecifierSet

    installed = version("ray")
    if installed == "not installed" or installed in SpecifierSet(TESTED_RAY):
        return None
    return (f"warning: Ray {installed} is outside the range mae-ray is tested with ({TESTED_RAY}); "
            "it leans on Ray internals that can change between releases")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.lru_cache(maxsize=1)
def _static() -> dict[str, str]:
    """What does not change while a process runs: versions, OS, hardware, the code's commit and state."""
    env = {"python": platform.python_version(), "os": platform.platform(), "cpu_count": str(os.cpu_count())}
    env.update({p: version(p) for p in PACKAGES})
    try:
        import torch

        env["cuda"] = torch.version.cuda or "none"
        env["cudnn"] = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "none"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        env["gpu_count"] = str(count)
        env["gpu"] = torch.cuda.get_device_name(0) if count else "none"
    except Exception:  # a broken CUDA install must not stop a run from starting
        env.setdefault("cuda", "unknown")
    commit, dirty = git_state()
    if commit:
        env.update(git_commit=commit, git_dirty=str(dirty).lower())
    return env


def environment() -> dict[str, str]:
    """``{name: value}`` of this process's environment, the command line and the Ray cluster's node count."""
    env = dict(_static())
    env["command"] = command()
    try:
        import ray

        if ray.is_initialized():
            env["ray_nodes"] = str(sum(1 for n in ray.nodes() if n.get("Alive")))
    except Exception:
        pass
    return env


def command() -> str:
    """The command line of the driver (``mae-ray ...``), else of this process."""
    return os.environ.get(COMMAND_ENV) or " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])


def git_state() -> tuple[str | None, bool]:
    """(commit, has uncommitted changes to tracked files) of the checkout mae_ray runs from; (None, False)
    when it is not one (an installed package)."""
    if not os.path.exists(os.path.join(_ROOT, ".git")):  # not a checkout (or a venv inside another one)
        return None, False
    try:
        commit = _git("rev-parse", "HEAD").strip()
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, dirty


def git_diff() -> str:
    """The uncommitted changes to tracked files, as ``git diff HEAD`` prints them ('' when clean or not a checkout)."""
    if not os.path.exists(os.path.join(_ROOT, ".git")):
        return ""
    try:
        return _git("diff", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return ""


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", _ROOT, *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout
