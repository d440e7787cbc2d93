"""Throughput of the shard loader vs torchvision ImageFolder vs the single-core ceiling.

Generates synthetic JPEGs, writes them both as an ImageFolder tree and as tar shards, then
measures images/s for the pre-training transform:

  (a) mae_ray.data.loader.make_train_loader over the shards (torchvision.io decode, tensor transforms),
  (b) torchvision ImageFolder + DataLoader, the MAE reference pipeline (PIL decode + PIL transforms),
  (c) the ceiling: one process decoding + transforming in-memory bytes in a plain loop,

all with the same batch size and number of workers; (a) and (c) once with float32 output and
once with uint8 output (``build_transform(..., normalize=False)``, normalised later on the GPU).
With ``--s3``, also (a'') the same loader (uint8) reading the shards from a local S3-compatible server
(moto's server mode, a subprocess on 127.0.0.1; needs the ``dev`` extra): what in-process S3 reading costs.
Example:

    python experiments/benchmarks/loader.py --num-images 2000 --num-workers 2 [--s3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from mae_ray.data.loader import TrainLoader, make_train_loader
from mae_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Transform, build_transform, decode_rgb

# torchvision 0.29 deprecates torchvision.io decoding in favour of torchcodec; it still works.
warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--min-size", type=int, default=160, help="smallest image side in pixels")
    parser.add_argument("--max-size", type=int, default=256, help="largest image side in pixels")
    parser.add_argument("--img-size", type=int, default=224, help="transform output size")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=250, help="images per tar shard")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument(
        "--rounds", type=int, default=3, help="the methods run interleaved this many times; best round reported"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--s3", action="store_true", help="also read the shards from a local S3 server (moto)")
    return parser.parse_args()


def synthetic_jpeg(rng: np.random.Generator, min_size: int, max_size: int) -> bytes:
    """A JPEG with smooth structure plus noise, so it compresses and decodes like a photo."""
    width, height = rng.integers(min_size, max_size + 1, size=2)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    freq = rng.uniform(0.01, 0.08, size=(3, 2))
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [np.sin(xx * fx + yy * fy + p) for (fx, fy), p in zip(freq, phase, strict=True)]
    pixels = 127.5 * (1 + np.stack(channels, axis=-1)) + rng.normal(0, 12, size=(height, width, 3))
    out = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_datasets(args: argparse.Namespace, root: Path) -> tuple[Path, Path, list[bytes]]:
    rng = np.random.default_rng(0)
    images = [synthetic_jpeg(rng, args.min_size, args.max_size) for _ in range(args.num_images)]
    labels = [i % args.num_classes for i in range(args.num_images)]
    folder, shards = root / "imagefolder", root / "shards"
    for i, (jpeg, label) in enumerate(zip(images, labels, strict=True)):
        class_dir = folder / f"class_{label:03d}"
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"img_{i:06d}.jpg").write_bytes(jpeg)
    shards.mkdir(parents=True, exist_ok=True)
    counts = {}
    for start in range(0, args.num_images, args.shard_size):
        name = f"train-{start // args.shard_size:06d}.tar"
        end = min(start + args.shard_size, args.num_images)
        write_tar(shards / name, ((f"{i:08d}", images[i], labels[i]) for i in range(start, end)))
        counts[name] = end - start
    manifest = {"total": args.num_images, "shards": counts, "num_classes": args.num_classes}
    (shards / "dataset.json").write_text(json.dumps(manifest))
    return folder, shards, images


def write_tar(path: Path, samples: Iterable[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, jpeg, label in samples:
            for ext, payload in (("jpg", jpeg), ("cls", str(label).encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def images_per_second(batches: Iterable[tuple[torch.Tensor | list[torch.Tensor], object]]) -> float:
    """Throughput of one full iteration, worker start-up included."""
    count, start = 0, time.perf_counter()
    for images, _labels in batches:
        count += len(images)
    return count / (time.perf_counter() - start)


def shard_loader(args: argparse.Namespace, shards: Path | str, transform: Transform) -> TrainLoader:
    return make_train_loader(str(shards), batch_size=args.batch_size, transform=transform, num_workers=args.num_workers)


@contextlib.contextmanager
def local_s3(shards: Path) -> Iterator[str]:
    """The shards and dataset.json in a bucket of a moto server started here (our own subprocess, stopped
    by its pid on leaving); yields their s3:// prefix. The loader reaches it through $AWS_ENDPOINT_URL."""
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=endpoint)
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.1)
        fs = pafs.S3FileSystem(endpoint_override=endpoint, allow_bucket_creation=True)
        fs.create_dir("bench")
        for path in sorted(shards.iterdir()):
            with fs.open_output_stream(f"bench/shards/{path.name}") as f:
                f.write(path.read_bytes())
        yield "s3://bench/shards/"
    finally:
        server.terminate()
        server.wait(timeout=30)


def image_folder_loader(args: argparse.Namespace, folder: Path) -> DataLoader:
    # main_pretrain.py of the MAE reference code.
    transform = T.Compose(
        [
            T.RandomResizedCrop(args.img_size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = ImageFolder(str(folder), transform=transform)
    return DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers, drop_last=True)


def ceiling_loop(images: list[bytes], transform: Transform) -> Iterator[tuple[list[torch.Tensor], None]]:
    """Decode + transform each image in this process on one thread, as a DataLoader worker has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for jpeg in images:
            yield [transform(decode_rgb(jpeg))], None
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    args = parse_args()
    transforms = {
        "float32": build_transform("pretrain", args.img_size),
        "uint8": build_transform("pretrain", args.img_size, normalize=False),
    }
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        root = args.workdir or Path(tmp)
        folder, shards, images = write_datasets(args, root)
        methods = {
            "folder": lambda: image_folder_loader(args, folder),
            **{f"loader/{n}": (lambda t=t: shard_loader(args, shards, t)) for n, t in transforms.items()},
            **{f"ceiling/{n}": (lambda t=t: ceiling_loop(images, t)) for n, t in transforms.items()},
        }
        if args.s3:
            bucket = stack.enter_context(local_s3(shards))
            methods["loader-s3/uint8"] = lambda: shard_loader(args, bucket, transforms["uint8"])
        best = dict.fromkeys(methods, 0.0)
        for _ in range(args.rounds):  # interleaved, so that load from other processes hits all alike
            for name, make in methods.items():
                best[name] = max(best[name], images_per_second(make()))
    ceiling = {name: best[f"ceiling/{name}"] for name in transforms}
    loader = {name: best[f"loader/{name}"] for name in transforms}
    folder_rate = best["folder"]
    workers = max(args.num_workers, 1)
    print(
        f"{args.num_images} JPEGs {args.min_size}-{args.max_size}px -> {args.img_size}px pretrain transform, "
        f"batch {args.batch_size}, {args.num_workers} workers, best of {args.rounds} interleaved rounds"
    )
    rows = [
        ("(a) mae_ray shard loader, float32 output", loader["float32"]),
        ("(a') mae_ray shard loader, uint8 output", loader["uint8"]),
        *([("(a'') the same, shards from the local S3 server", best["loader-s3/uint8"])] if args.s3 else []),
        ("(b) ImageFolder + DataLoader (PIL), float32", folder_rate),
        ("(c) 1-core decode+transform, float32", ceiling["float32"]),
        ("(c') 1-core decode+transform, uint8", ceiling["uint8"]),
    ]
    print(f"{'method':<46}{'images/s':>10}")
    for name, rate in rows:
        print(f"{name:<46}{rate:>10.0f}")
    print(f"(a) / (b)             = {loader['float32'] / folder_rate:.2f}  (goal >= 1.2)")
    print(f"(a) / ((c) x workers) = {loader['float32'] / (ceiling['float32'] * workers):.2f}  (goal >= 0.90)")
    print(f"(a') / ((c') x workers) = {loader['uint8'] / (ceiling['uint8'] * workers):.2f}")
    if args.s3:
        print(f"(a'') / (a')           = {best['loader-s3/uint8'] / loader['uint8']:.2f}")


if __name__ == "__main__":
    main()
