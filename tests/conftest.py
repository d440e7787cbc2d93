"""Shared fixtures: the demo dataset (built once per session) and a private local Ray per module."""

from __future__ import annotations

import os

import pytest

# Heads started by tests stop in seconds instead of draining for 30 s.
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """A small demo dataset (10 classes, 32 px) as real JPEG tar shards: dict of paths."""
    from data_tools.demo_data import build_demo_dataset

    root = tmp_path_factory.mktemp("demo")
    return build_demo_dataset(root, num_train=1200, num_val=300, size=32, seed=0, maxcount=250)


@pytest.fixture(scope="module")
def local_ray():
    """One private Ray instance per test module (never a ``ray.init()`` that could join a stale head)."""
    import ray

    from mae_ray.launch import init_ray

    assert init_ray(num_cpus=2), "Ray was already running in this process"
    yield ray
    ray.shutdown()
