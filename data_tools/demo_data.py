"""An offline demo dataset: ten shape and texture classes drawn procedurally, written as shards.

    python -m data_tools.demo_data --output DIR [--num-train 5000] [--num-val 1000] [--size 32] [--seed 0]

Layout: DIR/{train,val}/<class>/*.jpg (an ImageNet-style image folder), then
DIR/shards/train/train-*.tar and DIR/shards/val/val-*.tar (each folder with its dataset.json),
written by make_shards. The class is the *structure* of the picture; colours, position, size,
rotation, stripe period and phase are random and independent of the class, so neither mean colour
nor a fixed pixel template identifies it. See docs/data_tools.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools._common import DataToolError, atomic_write_json
from data_tools.make_shards import make_shards

# The evaluation crop written to dataset.json: the whole picture (the shape may touch the border, and at
# 32 px ImageNet's 0.875 crop would cut 2 px off each side after upscaling to 36 px).
DEMO_CROP_RATIO = 1.0
# Sorted, so that the image folder's sorted-folder class order equals this list's order.
CLASSES = [
    "checkerboard",
    "circle",
    "diagonal_stripes",
    "horizontal_stripes",
    "plus",
    "ring",
    "square",
    "star",
    "triangle",
    "vertical_stripes",
]
_SUPERSAMPLE = 2  # draw at twice the size and box-filter down: anti-aliased edges
_MIN_CONTRAST = 60  # luminance difference between foreground and background, 0..255
_JPEG_QUALITY = 90
_SPLITS = {"train": 0, "val": 1}  # index into the per-image seed, so splits never share images


def _shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shapes in their own frame: (u, v) in units of the shape's radius."""
    r = np.hypot(u, v)
    if name == "circle":
        return r <= 0.9
    if name == "ring":
        return (r >= 0.55) & (r <= 0.95)
    if name == "square":
        return np.maximum(abs(u), abs(v)) <= 0.72
    if name == "plus":
        return ((abs(u) <= 0.3) & (abs(v) <= 0.95)) | ((abs(v) <= 0.3) & (abs(u) <= 0.95))
    if name == "triangle":  # equilateral, inscribed in the unit circle: three half-planes at 0.5
        normals = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.all([u * np.cos(a) + v * np.sin(a) <= 0.5 for a in normals], axis=0)
    if name == "star":  # five points
        return r <= 0.38 + 0.6 * (0.5 + 0.5 * np.cos(5 * np.arctan2(v, u))) ** 1.5
    raise ValueError(name)


def _texture_mask(name: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Full-frame periodic patterns; orientation is the class, with +-10 degrees of jitter."""
    jitter = np.deg2rad(rng.uniform(-10, 10))
    period = rng.uniform(0.25, 0.5)  # in image half-widths: 4..8 px at 32 px
    base = {"horizontal_stripes": np.pi / 2, "vertical_stripes": 0.0, "checkerboard": 0.0}.get(name)
    angle = (base if base is not None else rng.choice([np.pi / 4, -np.pi / 4])) + jitter
    t = (x * np.cos(angle) + y * np.sin(angle)) / period + rng.uniform(0, 1)
    stripes = (t % 1.0) < 0.5
    if name != "checkerboard":
        return stripes
    s = (-x * np.sin(angle) + y * np.cos(angle)) / period + rng.uniform(0, 1)
    return stripes ^ ((s % 1.0) < 0.5)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    luminance = np.array([0.299, 0.587, 0.114])
    while True:
        fg, bg = rng.uniform(0, 255, size=(2, 3))
        if abs(fg @ luminance - bg @ luminance) >= _MIN_CONTRAST:
            return fg, bg


def render(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One RGB uint8 image of class ``CLASSES[label]``."""
    name = CLASSES[label]
    n = size * _SUPERSAMPLE
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n * 2 - 1  # pixel centres in [-1, 1]
    if name.endswith("_stripes") or name == "checkerboard":
        mask = _texture_mask(name, x, y, rng)
    else:
        scale = rng.uniform(0.4, 0.75)
        cx, cy = rng.uniform(scale - 1, 1 - scale, size=2)  # keep the shape inside the frame
        theta = rng.uniform(0, 2 * np.pi)
        dx, dy = x - cx, y - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / scale
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / scale
        mask = _shape_mask(name, u, v)
    fg, bg = _colours(rng)
    image = np.where(mask[..., None], fg, bg)
    if rng.random() < 0.3:  # a small distractor blob of a third colour
        px, py = rng.uniform(-0.9, 0.9, size=2)
        image[np.hypot(x - px, y - py) <= rng.uniform(0.06, 0.12)] = rng.uniform(0, 255, size=3)
    small = Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
    noisy = np.asarray(small, dtype=np.float32) + rng.normal(0, 6, size=(size, size, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_images(folder: Path, split: str, count: int, size: int, seed: int) -> None:
    """``count`` JPEGs under folder/<class>/, classes balanced (image i has class i % 10)."""
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = i % len(CLASSES)
        rng = np.random.default_rng([seed, _SPLITS[split], i])  # per image: independent of count
        buffer = io.BytesIO()
        Image.fromarray(render(label, size, rng)).save(buffer, "JPEG", quality=_JPEG_QUALITY)
        (folder / CLASSES[label] / f"{split}_{i:06d}.jpg").write_bytes(buffer.getvalue())


def build_demo_dataset(
    output_dir: str | os.PathLike,
    num_train: int = 5000,
    num_val: int = 1000,
    size: int = 32,
    seed: int = 0,
    maxcount: int = 1000,
    workers: int = 1,
) -> dict:
    """Generate (or reuse, when already complete with the same parameters) the demo dataset.

    Returns {"root", "train", "val" (brace patterns of the shards), "train_dir", "val_dir",
    "train_dataset_json", "val_dataset_json", "num_train", "num_val", "num_classes", "classes",
    "image_size"}.
    """
    if not 16 <= size <= 256:
        raise DataToolError("--size must be between 16 and 256")
    if num_train < 1 or num_val < 1 or maxcount < 1:
        raise DataToolError("--num-train, --num-val and --maxcount must be positive")
    root = Path(output_dir)
    marker = root / "demo.json"
    params = {"num_train": num_train, "num_val": num_val, "size": size, "seed": seed, "maxcount": maxcount,
              "crop_ratio": DEMO_CROP_RATIO}
    state = json.loads(marker.read_text()) if marker.is_file() else None
    if state == {"params": params, "complete": True}:
        return _describe(root, size)
    if state is None and root.exists() and any(root.iterdir()):
        raise DataToolError(f"{root} is not empty and holds no demo dataset; choose another --output")
    for stale in ("train", "val", "shards"):  # ours (the marker says so): regenerate from scratch
        shutil.rmtree(root / stale, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"params": params, "complete": False})
    for split, count in (("train", num_train), ("val", num_val)):
        write_images(root / split, split, count, size, seed)
        make_shards(
            root / split,
            root / "shards" / split,
            prefix=split,
            maxcount=maxcount,
            seed=seed,
            workers=workers,
            progress=False,
            crop_ratio=DEMO_CROP_RATIO,
        )
    atomic_write_json(marker, {"params": params, "complete": True})
    return _describe(root, size)


def _describe(root: Path, size: int) -> dict:
    info: dict = {"root": str(root), "num_classes": len(CLASSES), "classes": list(CLASSES), "image_size": size}
    for split in ("train", "val"):
        shard_dir = root / "shards" / split
        manifest = json.loads((shard_dir / "dataset.json").read_text())
        info[split] = str(shard_dir / manifest["pattern"])
        info[f"{split}_dir"] = str(shard_dir)
        info[f"{split}_dataset_json"] = str(shard_dir / "dataset.json")
        info[f"num_{split}"] = manifest["total"]
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_tools.demo_data", description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder for the images and shards")
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-val", type=int, default=1000)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=1, help="processes writing shards")
    args = parser.parse_args(argv)
    try:
        info = build_demo_dataset(
            args.output, args.num_train, args.num_val, args.size, args.seed, args.maxcount, args.workers
        )
    except DataToolError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"demo dataset: {info['num_classes']} classes, {info['image_size']} px")
    print(f"  train  {info['num_train']:6d} samples  {info['train']}")
    print(f"  val    {info['num_val']:6d} samples  {info['val']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
