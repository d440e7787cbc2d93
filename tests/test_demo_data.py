"""The offline demo dataset: layout, determinism, idempotence, and that its task is a real one."""

from __future__ import annotations

import io
import json
from pathlib import Path

import braceexpand
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools import demo_data, verify_shards
from data_tools._common import DataToolError


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict:
    return demo_data.build_demo_dataset(tmp_path_factory.mktemp("demo"), num_train=1000, num_val=300, maxcount=300)


def load(pattern: str) -> tuple[np.ndarray, np.ndarray]:
    samples = wds.WebDataset(list(braceexpand.braceexpand(pattern)), shardshuffle=False)
    pairs = [(np.asarray(Image.open(io.BytesIO(s["jpg"]))), int(s["cls"])) for s in samples]
    return np.stack([p[0] for p in pairs]).astype(np.float32) / 255, np.array([p[1] for p in pairs])


def test_layout_counts_and_sizes(demo):
    assert demo["num_classes"] == 10 and demo["classes"] == sorted(demo["classes"]) == demo_data.CLASSES
    assert (demo["num_train"], demo["num_val"]) == (1000, 300)
    assert demo["train"].endswith("train/train-{000000..000003}.tar") and demo["val"].endswith("val/val-000000.tar")
    for split, count in (("train", 1000), ("val", 300)):
        manifest = json.loads(Path(demo[f"{split}_dataset_json"]).read_text())
        assert manifest["total"] == count and manifest["num_classes"] == 10 and manifest["num_skipped"] == 0
        assert manifest["classes"] == demo_data.CLASSES
        assert verify_shards.main([demo[f"{split}_dir"], "--no-progress"]) == 0
    images, labels = load(demo["val"])
    assert images.shape == (300, 32, 32, 3)
    assert np.bincount(labels).tolist() == [30] * 10


def test_idempotent(demo):
    shard = Path(demo["val"])
    stamp = shard.stat().st_mtime_ns
    assert demo_data.build_demo_dataset(demo["root"], num_train=1000, num_val=300, maxcount=300) == demo
    assert shard.stat().st_mtime_ns == stamp


def test_deterministic_per_seed_and_other_sizes(tmp_path):
    a = demo_data.build_demo_dataset(tmp_path / "a", num_train=40, num_val=20, size=48, seed=3)
    b = demo_data.build_demo_dataset(tmp_path / "b", num_train=40, num_val=20, size=48, seed=3)
    c = demo_data.build_demo_dataset(tmp_path / "c", num_train=40, num_val=20, size=48, seed=4)
    assert Path(a["train"]).read_bytes() == Path(b["train"]).read_bytes()
    assert Path(a["train"]).read_bytes() != Path(c["train"]).read_bytes()
    assert load(a["train"])[0].shape == (40, 48, 48, 3)
    # Other parameters in the same folder: regenerated, not mixed with the old images.
    d = demo_data.build_demo_dataset(tmp_path / "a", num_train=20, num_val=10, size=64, seed=3)
    assert d["num_train"] == 20 and load(d["val"])[0].shape == (10, 64, 64, 3)


def test_refuses_a_foreign_folder(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(DataToolError, match="not empty"):
        demo_data.build_demo_dataset(tmp_path, num_train=10, num_val=10)
    assert demo_data.main(["--output", str(tmp_path), "--size", "8"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def nearest_class_mean(train: tuple, val: tuple) -> float:
    (x, y), (xv, yv) = train, val
    means = np.stack([x[y == k].mean(0) for k in range(10)])
    distances = ((xv[:, None, :] - means[None]) ** 2).sum(-1)
    return float((distances.argmin(1) == yv).mean())


def orientation_features(images: np.ndarray) -> np.ndarray:
    """Gradient-orientation histograms (whole image and 4x4 cells): colour-free structure."""
    gray = images.mean(-1)
    gy, gx = np.gradient(gray, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    bins = (np.mod(np.arctan2(gy, gx), np.pi) / np.pi * 8).astype(int) % 8
    n, side = len(images), images.shape[1] // 4
    cells = np.concatenate(
        [(magnitude * (bins == k)).reshape(n, 4, side, 4, side).sum((2, 4)).reshape(n, -1) for k in range(8)], 1
    )
    whole = np.stack([(magnitude * (bins == k)).sum((1, 2)) for k in range(8)], 1)
    return np.concatenate([f / (f.sum(1, keepdims=True) + 1e-6) for f in (whole, cells)], 1)


def test_task_is_not_readable_from_raw_pixels_but_from_structure(demo):
    (x, y), (xv, yv) = load(demo["train"]), load(demo["val"])
    raw = nearest_class_mean((x.reshape(len(x), -1), y), (xv.reshape(len(xv), -1), yv))
    structure = nearest_class_mean((orientation_features(x), y), (orientation_features(xv), yv))
    assert raw < 0.3  # chance is 0.1: colour and position carry no class information
    assert structure > 0.4 and structure > raw + 0.2
