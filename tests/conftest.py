"""Shared fixtures: the demo dataset (built once per session) and a private local Ray per module."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

# Heads started by tests stop in seconds instead of draining for 30 s.
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Any Ray a test's subprocess starts (a CLI job, a sweep driver) keeps its sessions and its
# ray_current_cluster file under a folder of this process, not in /tmp/ray beside a user's Ray. Set, not
# defaulted: each pytest-xdist worker inherits its controller's environment and needs a folder of its own.
_SESSION_RAY_ROOT = tempfile.mkdtemp(prefix="mae-ray-s", dir="/tmp")
os.environ["RAY_TMPDIR"] = _SESSION_RAY_ROOT
atexit.register(shutil.rmtree, _SESSION_RAY_ROOT, ignore_errors=True)  # after every module's Ray has stopped


# The slowest modules in CI, slowest first (pytest -n auto --dist loadfile --no-loadscope-reorder: a module per
# worker, handed out in collection order). Two at a time, starting the longest first lets both workers end
# together; xdist's default order (most tests first) put one-test modules of minutes last, one worker idle
# meanwhile. Measured under xdist on the 2-core CI machine (docs/performance.md); the rest keep file order.
SLOWEST_FIRST = ("test_faults", "test_multinode", "test_evaluation", "test_resume", "test_sweep", "test_storage",
                 "test_secrets", "test_job_submit", "test_sweep_smoke", "test_pretrain")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: a module's tests stay in order


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo dataset (10 classes, 32 px) as real JPEG tar shards: dict of paths."""
    from data_tools.demo_data import build_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return build_demo_dataset(root, num_train=1200, num_val=300, size=32, seed=0, maxcount=250)


@pytest.fixture(scope="module")
def local_ray():
    """One private Ray instance per test module (never a ``ray.init()`` that could join a stale head),
    in its own session folder: nothing shared with another module's Ray, or a user's, on this machine."""
    import ray

    from mae_ray.cluster.launch import init_ray

    temp_dir = ray_temp_dir()
    assert init_ray(num_cpus=2, temp_dir=temp_dir), "Ray was already running in this process"
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def ray_temp_dir() -> str:
    """A fresh, short session folder for one Ray instance (Ray's socket paths must stay under 107 bytes)."""
    return tempfile.mkdtemp(prefix="mae-ray-", dir="/tmp")
