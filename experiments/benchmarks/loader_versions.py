"""The shard loader of two checkouts on the same shards: a before/after comparison of a loader change.

    git worktree add /tmp/before <commit>          # the loader before the change
    python experiments/benchmarks/loader_versions.py /tmp/before . --num-images 2000 --rounds 5

Writes synthetic JPEG shards once (``loader.py``'s generator), then runs the training loader of each
checkout in its own fresh process (``PYTHONPATH`` = that checkout), interleaved round by round so that load
from other processes hits both alike: one full epoch per run, worker start-up included, pre-training's
transform with uint8 output (what pre-training uses) and float32 output. Prints images/s per round and
the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ONE_EPOCH = """
import sys, time, warnings
warnings.filterwarnings("ignore")
from mae_ray.data.loader import make_train_loader
from mae_ray.data.transforms import build_transform
shards, size, batch, workers, normalize = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
loader = make_train_loader(shards, batch_size=batch, num_workers=workers,
                           transform=build_transform("pretrain", size, normalize=normalize == "float32"))
count, start = 0, time.perf_counter()
for images, _ in loader:
    count += len(images)
print(count / (time.perf_counter() - start))
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkouts", nargs=2, type=Path, help="two repository roots: before, after")
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--min-size", type=int, default=160)
    p.add_argument("--max-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    for root in args.checkouts:
        if not (root / "mae_ray" / "data" / "loader.py").is_file():
            p.error(f"{root} is not a mae-ray checkout (no mae_ray/data/loader.py)")
    return args


def one_epoch(root: Path, shards: Path, args: argparse.Namespace, output: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(root.resolve())}
    cmd = [sys.executable, "-c", ONE_EPOCH, str(shards), str(args.img_size), str(args.batch_size),
           str(args.num_workers), output]
    return float(subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout.split()[-1])


def main() -> None:
    args = parse_args()
    from loader import write_datasets  # the synthetic JPEG generator of loader.py

    with tempfile.TemporaryDirectory() as tmp:
        _, shards, _ = write_datasets(args, Path(tmp))
        names = [f"{label} ({root})" for label, root in zip(("before", "after"), args.checkouts, strict=True)]
        rates: dict[tuple[str, str], list[float]] = {}
        for r in range(args.rounds):
            for output in ("uint8", "float32"):
                for name, root in zip(names, args.checkouts, strict=True):
                    rate = one_epoch(root, shards, args, output)
                    rates.setdefault((name, output), []).append(rate)
                    print(f"round {r + 1} {output:<7} {name}: {rate:.0f} images/s", flush=True)
    print(f"\n{args.num_images} JPEGs {args.min_size}-{args.max_size}px -> {args.img_size}px, batch {args.batch_size}, "
          f"{args.num_workers} workers, {args.rounds} interleaved rounds; images/s, median (min-max)")
    for output in ("uint8", "float32"):
        medians = []
        for name in names:
            values = rates[(name, output)]
            medians.append(statistics.median(values))
            print(f"  {output:<7} {name}: {medians[-1]:.0f} ({min(values):.0f}-{max(values):.0f})")
        print(f"  {output:<7} after / before = {medians[1] / medians[0]:.3f}")


if __name__ == "__main__":
    main()
