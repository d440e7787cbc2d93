"""Shard-writing throughput of data_tools.make_shards on generated JPEGs (no re-encoding).

    python experiments/benchmarks/write_shards.py [--num 4000] [--size 256] [--workers 1]

Writes ``--num`` JPEGs of ``--size`` px (smooth colour fields plus noise: roughly ImageNet-sized
files at 256-500 px) into a temporary image folder, then times make_shards on it. The source files
were just written, so they come from the page cache: this measures the tool's CPU cost (read,
header check, tar, sha256, fsync), not the disk. Prints images/s in total and per worker.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from data_tools.make_shards import make_shards


def write_jpegs(root: Path, num: int, size: int, classes: int = 10) -> int:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    total = 0
    for i in range(num):
        a, b, c = rng.uniform(0, 6, size=3)
        field = np.stack([np.sin(a * x + b * y), np.cos(b * x - c * y), np.sin(c * (x + y))], -1) * 80 + 128
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
        folder = root / f"class{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:06d}.jpg").write_bytes(buffer.getvalue())
        total += len(buffer.getvalue())
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=4000, help="images to generate and write")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--maxcount", type=int, default=1000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp, "images"), Path(tmp, "shards")
        total = write_jpegs(source, args.num, args.size)
        start = time.perf_counter()
        result = make_shards(source, output, maxcount=args.maxcount, workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
    print(f"command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"{result['total']} JPEGs ({total / args.num / 1024:.0f} KiB mean, {args.size} px), {args.workers} worker(s)")
    for label, elapsed in (("writing shards", result["seconds"]), ("whole run (scan, plan, metadata)", seconds)):
        rate = result["total"] / elapsed
        print(
            f"  {label}: {elapsed:.2f} s, {rate:.0f} images/s, {rate / args.workers:.0f} images/s per worker, "
            f"{total / elapsed / 2**20:.0f} MiB/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
