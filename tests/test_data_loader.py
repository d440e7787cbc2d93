"""Tests for the shard loaders: equal batches per rank, exact-once eval, skipping, safety."""

from __future__ import annotations

import io
import json
import pickle
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import write_shard
from PIL import Image

from mae_ray.data.loader import DataError, make_eval_loader, make_train_loader
from mae_ray.data.shards import dataset_size, expand_urls
from mae_ray.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, decode_rgb, normalize_batch

# torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

IMG = 16  # output size: keeps the transforms cheap
SIZES = (7, 3, 11, 2, 1)  # uneven shards, 24 samples


def image_bytes(label: int, mode: str = "RGB", fmt: str = "JPEG", size: tuple[int, int] = (28, 20)) -> bytes:
    rng = np.random.default_rng(label)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    if mode == "P":
        image = image.quantize(8)
    elif mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def sample(label: int, **members: bytes) -> tuple[str, dict[str, bytes]]:
    files = {"jpg": image_bytes(label), "cls": str(label).encode(), "json": json.dumps({"id": label}).encode()}
    files.update(members)
    return f"s{label:05d}", files


@pytest.fixture
def uneven(tmp_path: Path) -> Path:
    label = 0
    for index, size in enumerate(SIZES):
        write_shard(tmp_path / f"train-{index:06d}.tar", [sample(label + i) for i in range(size)])
        label += size
    return tmp_path


def labels_of(loader) -> list[int]:
    return [int(x) for _, labels in loader for x in labels]


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize(("world_size", "num_workers", "batch_size"), [(2, 2, 2), (2, 2, 4), (3, 2, 1), (2, 2, 12)])
def test_train_equal_batches_on_every_rank_and_worker(uneven, world_size, num_workers, batch_size):
    steps = sum(SIZES) // (world_size * batch_size)
    for rank in range(world_size):
        loader = make_train_loader(
            str(uneven),
            batch_size=batch_size,
            img_size=IMG,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            shuffle_buffer=4,
        )
        assert len(loader) == steps
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == steps
            assert all(x.shape == (batch_size, 3, IMG, IMG) and x.dtype == torch.float32 for x, _ in batches)
            assert all(y.dtype == torch.int64 for _, y in batches)
        # Each DataLoader worker yields its exact share (steps split as evenly as possible).
        per_worker = Counter(worker for *_, worker, _, _ in loader._loader)
        expected = {w: steps // num_workers + (w < steps % num_workers) for w in range(num_workers)}
        assert per_worker == {w: n for w, n in expected.items() if n}


def test_train_fewer_shards_than_ranks_times_workers(tmp_path):
    write_shard(tmp_path / "train-000000.tar", [sample(i) for i in range(5)])
    write_shard(tmp_path / "train-000001.tar", [sample(5)])
    counts = [
        len(list(make_train_loader(str(tmp_path), batch_size=1, img_size=IMG, rank=r, world_size=2, num_workers=2)))
        for r in range(2)
    ]
    assert counts == [3, 3]


def test_train_samples_per_epoch_and_manifest(uneven):
    manifest = {"total": 24, "num_classes": 24, "shards": {f"train-{i:06d}.tar": n for i, n in enumerate(SIZES)}}
    (uneven / "dataset.json").write_text(json.dumps(manifest))
    assert dataset_size(str(uneven)) == 24
    assert dataset_size(str(uneven / "train-00000{0..1}.tar")) == 10
    assert len(make_train_loader(str(uneven), batch_size=4, num_workers=0)) == 6
    loader = make_train_loader(str(uneven), batch_size=4, num_workers=0, img_size=IMG, samples_per_epoch=80)
    assert len(loader) == len(list(loader)) == 20  # resampling: an epoch may exceed the dataset
    with pytest.raises(DataError):
        make_train_loader(str(uneven), batch_size=64, num_workers=0)


def test_dataset_size_without_manifest_is_none(uneven):
    assert dataset_size(str(uneven)) is None


def test_train_order_changes_per_epoch_and_is_reproducible(uneven):
    def epoch_labels(epoch: int, shuffle_buffer: int) -> list[int]:
        loader = make_train_loader(
            str(uneven), batch_size=4, img_size=IMG, num_workers=0, seed=3, shuffle_buffer=shuffle_buffer
        )
        loader.set_epoch(epoch)
        return labels_of(loader)

    # shuffle_buffer=1 keeps samples in shard order, so this compares shard orders.
    assert epoch_labels(0, 1) == epoch_labels(0, 1)
    assert epoch_labels(0, 1) != epoch_labels(1, 1)
    assert epoch_labels(0, 16) == epoch_labels(0, 16)
    assert epoch_labels(0, 16) != epoch_labels(1, 16)
    assert epoch_labels(0, 16) != epoch_labels(0, 1)
    # Without set_epoch, successive iterations advance the epoch.
    loader = make_train_loader(str(uneven), batch_size=4, img_size=IMG, num_workers=0, seed=3, shuffle_buffer=16)
    assert labels_of(loader) == epoch_labels(0, 16)
    assert labels_of(loader) == epoch_labels(1, 16)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_raw_batches_carry_the_same_samples_as_decoded_ones_for_gpu_decoding(uneven, num_workers):
    """``raw=True`` (``data.decode=gpu``): the same samples in the same order, each the JPEG file's bytes
    (decodable to what the CPU path decodes), the labels a tensor; a PNG is skipped and counted, not decoded."""
    from torchvision.io import decode_jpeg

    def loader(raw: bool):
        made = make_train_loader(str(uneven), batch_size=4, img_size=IMG, num_workers=num_workers, seed=3,
                                 shuffle_buffer=16, raw=raw, transform=lambda image: image[:, :1, :1])
        made.set_epoch(1)
        return made

    raw, decoded = list(loader(True)), list(loader(False))
    assert [labels.tolist() for _, labels in raw] == [labels.tolist() for _, labels in decoded]
    for (encoded, labels), _ in zip(raw, decoded, strict=True):
        assert isinstance(encoded, list) and len(encoded) == len(labels) == 4
        for data, label in zip(encoded, labels.tolist(), strict=True):
            assert data.dtype == torch.uint8 and data.dim() == 1
            assert torch.equal(decode_jpeg(data), decode_rgb(image_bytes(label)))

    (uneven / "png").mkdir()
    png = write_shard(uneven / "png" / "train-000000.tar", [sample(0, jpg=image_bytes(0, fmt="PNG")),
                                                               *[sample(i) for i in range(1, 9)]])
    made = make_train_loader(str(png), batch_size=4, img_size=IMG, num_workers=0, raw=True, samples_per_epoch=8,
                             shuffle_buffer=1)
    seen = [int(x) for _, labels in made for x in labels]
    assert len(seen) == 8 and 0 not in seen and made.skipped >= 1  # the PNG (label 0) never in a batch


def test_train_augmentation_reproducible_in_workers(uneven):
    def images(rank: int) -> torch.Tensor:
        loader = make_train_loader(
            str(uneven), batch_size=4, img_size=IMG, num_workers=1, rank=rank, world_size=2, seed=1
        )
        loader.set_epoch(2)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(images(0), images(0))
    assert not torch.equal(images(0), images(1))


@pytest.mark.parametrize("num_workers", [0, 3])
def test_an_epoch_restarted_at_any_batch_yields_what_the_whole_epoch_did(corrupt, num_workers):
    """A checkpoint inside an epoch records where each loader worker is (``positions``); an epoch restarted there
    (``set_epoch(epoch, start, positions)``) yields the rest of the whole epoch's batches, the same images with
    the same augmentations, though unreadable samples (which ``positions`` counts) were skipped on the way and
    the DataLoader's round robin starts again at its worker 0."""
    directory, _, _ = corrupt

    def loader():
        made = make_train_loader(str(directory), batch_size=2, img_size=IMG, num_workers=num_workers,
                                 samples_per_epoch=22, shuffle_buffer=4, transform="finetune")  # RandAugment too
        made.set_epoch(3)
        return made

    whole = list(loader())
    assert len(whole) == 11
    for start in (1, 4, 5):  # each worker's first batch, after it, and after a round
        first = loader()
        batches = iter(first)
        head = [next(batches) for _ in range(start)]
        positions = first.positions
        del batches
        again = loader()
        again.set_epoch(3, start, positions)
        rest = list(again)
        assert len(head) + len(rest) == len(whole), start
        for i, ((x, y), (wx, wy)) in enumerate(zip(head + rest, whole, strict=True)):
            assert torch.equal(x, wx) and torch.equal(y, wy), f"batch {i} differs after a restart at {start}"
    assert sum(positions) > 2 * 5  # unreadable samples on the way: whole batches alone would not say where


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(("world_size", "num_workers"), [(2, 2), (2, 0), (3, 2), (1, 2)])
def test_eval_sees_every_sample_exactly_once(uneven, world_size, num_workers):
    seen: list[int] = []
    for rank in range(world_size):
        loader = make_eval_loader(
            str(uneven), batch_size=2, img_size=IMG, rank=rank, world_size=world_size, num_workers=num_workers
        )
        mine = labels_of(loader)
        assert len(mine) == loader.num_samples
        assert loader.skipped == 0
        seen += mine
    assert sorted(seen) == list(range(sum(SIZES)))


def test_eval_batches_are_float_images(uneven):
    batches = list(make_eval_loader(str(uneven), batch_size=5, img_size=IMG, num_workers=0))
    assert all(x.shape[1:] == (3, IMG, IMG) and x.dtype == torch.float32 for x, _ in batches)


# --------------------------------------------------------------------------- corrupt and unsafe data


def truncated_shard(path: Path, labels: list[int], cut_in: str) -> str:
    write_shard(path, [sample(label) for label in labels])
    with tarfile.open(path) as tar:
        member = tar.getmember(cut_in)
    raw = path.read_bytes()
    path.write_bytes(raw[: member.offset_data + member.size // 2])
    return str(path)


@pytest.fixture
def corrupt(tmp_path: Path) -> tuple[Path, list[int], int]:
    """Shards with 4 bad samples among readable ones; returns (dir, good labels, skipped)."""
    write_shard(
        tmp_path / "train-000000.tar",
        [
            sample(0),
            sample(1, jpg=b"\xff\xd8\xff\xe0 not really a jpeg"),
            ("s00002", {"jpg": image_bytes(2)}),  # no cls
            sample(3, cls=b"three"),
            sample(4),
        ],
    )
    # Sample 7 is cut in the middle of its image; sample 8 after it is lost uncounted.
    truncated_shard(tmp_path / "train-000001.tar", [5, 6, 7, 8], cut_in="s00007.jpg")
    return tmp_path, [0, 4, 5, 6], 4


def test_corrupt_samples_are_skipped_and_counted_fast(corrupt):
    directory, good, skipped = corrupt
    start = time.perf_counter()
    for world_size, num_workers in [(1, 0), (2, 2)]:
        loaders = [
            make_eval_loader(
                str(directory), batch_size=2, img_size=IMG, rank=r, world_size=world_size, num_workers=num_workers
            )
            for r in range(world_size)
        ]
        assert sorted(label for loader in loaders for label in labels_of(loader)) == good
        assert sum(loader.skipped for loader in loaders) == skipped
    assert time.perf_counter() - start < 10  # no per-error sleeps


def test_a_shard_cut_inside_a_tar_header_is_counted_not_silently_ended(tmp_path):
    # tarfile alone ends the archive at a cut header as at its real end: sample 1 (whose members may go on
    # past the cut) would pass as whole and the loss go unnoticed. The shard reader says it broke there.
    write_shard(tmp_path / "cut-000000.tar", [sample(i) for i in range(4)])
    with tarfile.open(tmp_path / "cut-000000.tar") as tar:
        header = tar.getmember("s00002.jpg").offset
    raw = (tmp_path / "cut-000000.tar").read_bytes()
    (tmp_path / "cut-000000.tar").write_bytes(raw[: header + 100])
    loader = make_eval_loader(str(tmp_path), batch_size=2, img_size=IMG, num_workers=0)
    assert labels_of(loader) == [0]
    assert loader.skipped == 1


def test_train_skips_corrupt_samples_without_changing_batch_count(corrupt):
    directory, good, _ = corrupt
    loader = make_train_loader(
        str(directory), batch_size=2, img_size=IMG, num_workers=2, samples_per_epoch=40, shuffle_buffer=4
    )
    labels = labels_of(loader)
    assert len(labels) == 40
    assert set(labels) <= set(good)
    assert loader.skipped > 0


def test_train_raises_when_nothing_is_readable(tmp_path):
    write_shard(tmp_path / "bad-000000.tar", [sample(i, jpg=b"junk") for i in range(3)])
    loader = make_train_loader(str(tmp_path), batch_size=1, img_size=IMG, num_workers=0, samples_per_epoch=4)
    with pytest.raises(DataError, match="consecutive"):
        list(loader)


class _WritesMarker:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_members_are_never_loaded(tmp_path):
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_WritesMarker(probe))).close()
    assert probe.exists()  # the payload really does have a side effect when unpickled

    marker = tmp_path / "marker"
    payload = pickle.dumps(_WritesMarker(marker))
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "train-000000.tar", [sample(i, pyd=payload, pickle=payload, pth=payload) for i in range(4)])
    assert labels_of(make_eval_loader(str(shards), batch_size=2, img_size=IMG, num_workers=0)) == [0, 1, 2, 3]
    assert len(list(make_train_loader(str(shards), batch_size=2, img_size=IMG, num_workers=0))) == 2
    assert not marker.exists()


# --------------------------------------------------------------------------- decoding and transforms

IMAGE_KINDS = [
    ("L", "JPEG"),
    ("CMYK", "JPEG"),
    ("P", "PNG"),
    ("RGBA", "PNG"),
    ("LA", "PNG"),
    ("RGB", "PNG"),
    ("I;16", "PNG"),
    ("RGB", "WEBP"),
    ("RGB", "BMP"),  # not decodable by torchvision: PIL fallback
]


@pytest.mark.parametrize(("mode", "fmt"), IMAGE_KINDS)
def test_decode_gives_three_channel_uint8(mode, fmt):
    image = decode_rgb(image_bytes(1, mode, fmt))
    assert image.shape == (3, 20, 28) and image.dtype == torch.uint8


def test_all_image_kinds_through_loader(tmp_path):
    ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
    samples = [
        (f"s{i:05d}", {ext[fmt]: image_bytes(i, mode, fmt), "cls": str(i).encode()})
        for i, (mode, fmt) in enumerate(IMAGE_KINDS)
    ]
    write_shard(tmp_path / "val-000000.tar", samples)
    loader = make_eval_loader(str(tmp_path), batch_size=len(samples), img_size=IMG, num_workers=0)
    [(images, labels)] = list(loader)
    assert images.shape == (len(samples), 3, IMG, IMG) and images.dtype == torch.float32
    assert labels.tolist() == list(range(len(samples))) and loader.skipped == 0


@pytest.mark.parametrize("kind", ["pretrain", "linprobe", "finetune", "eval"])
def test_transform_shapes(kind):
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    out = build_transform(kind, 32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


@pytest.mark.parametrize("kind", ["pretrain", "linprobe", "eval"])
def test_uint8_transforms_and_deferred_normalisation(uneven, kind):
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    out = build_transform(kind, 32, normalize=False)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
    reference = (out.float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[
        :, None, None
    ]
    torch.testing.assert_close(normalize_batch(out[None])[0], reference)
    [(images, _)] = list(
        make_eval_loader(
            str(uneven), batch_size=32, transform=build_transform(kind, IMG, normalize=False), num_workers=0
        )
    )
    assert images.shape == (sum(SIZES), 3, IMG, IMG) and images.dtype == torch.uint8


def test_finetune_cannot_skip_normalisation():
    with pytest.raises(ValueError, match="finetune"):
        build_transform("finetune", 32, normalize=False)


def test_unknown_transform_kind():
    with pytest.raises(ValueError, match="unknown transform"):
        build_transform("mixup", 32)


# --------------------------------------------------------------------------- URL expansion


def test_expand_brace_dir_glob_and_list(uneven):
    names = [str(uneven / f"train-{i:06d}.tar") for i in range(5)]
    (uneven / "dataset.json").write_text("{}")  # not a shard
    assert expand_urls(str(uneven / "train-{000000..000004}.tar")) == names
    assert expand_urls(str(uneven)) == names
    assert expand_urls(str(uneven / "train-*.tar")) == names
    assert expand_urls([names[3], str(uneven / "train-00000{0..1}.tar")]) == [names[3], *names[:2]]
    assert expand_urls("file://" + names[0]) == [names[0]]


def test_expand_remote_urls():
    assert expand_urls("gs://b/x.tar") == ["pipe:gcloud storage cat gs://b/x.tar"]
    assert expand_urls("https://host/d-{0..1}.tar") == ["https://host/d-0.tar", "https://host/d-1.tar"]


@pytest.mark.parametrize("pattern", ["missing-{000000..000003}.tar", "nothing-*.tar", "absent.tar", "emptydir"])
def test_missing_shards_raise_data_error(tmp_path, pattern):
    (tmp_path / "emptydir").mkdir()
    full = str(tmp_path / pattern)
    with pytest.raises(DataError, match=pattern.split("{")[0].split("*")[0]) as info:
        make_train_loader(full, batch_size=1, num_workers=2)
    assert isinstance(info.value, ValueError)
    with pytest.raises(DataError):
        make_eval_loader(full, batch_size=1, num_workers=2)


def test_partly_missing_brace_pattern(uneven):
    with pytest.raises(DataError, match="1 path"):
        expand_urls(str(uneven / "train-{000000..000005}.tar"))


def test_remote_without_size_needs_samples_per_epoch():
    with pytest.raises(DataError, match="samples_per_epoch"):
        make_train_loader("https://host/d-{0..1}.tar", batch_size=1)
    assert make_eval_loader("https://host/d-0.tar", batch_size=1).num_samples is None


def test_pipe_urls_stream_through_a_subprocess(uneven):
    # The same gopen path serves gs:// (rewritten to `pipe:gcloud ...`); s3:// is tests/test_storage.py's.
    urls = [f"pipe:cat {uneven / f'train-{i:06d}.tar'}" for i in range(len(SIZES))]
    loader = make_eval_loader(urls, batch_size=4, img_size=IMG, num_workers=2)
    assert sorted(labels_of(loader)) == list(range(sum(SIZES)))
    assert loader.num_samples is None
    train = make_train_loader(urls, batch_size=4, img_size=IMG, num_workers=2, samples_per_epoch=40)
    assert len(list(train)) == 10
