"""make_shards and verify_shards on real image files: round trips, determinism, resume, bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_tools import make_shards as ms
from data_tools import verify_shards as vs
from data_tools._common import DataToolError, member_bytes

CLASSES = ["ant", "bee", "cat"]
REPO = Path(__file__).resolve().parents[1]


def image_bytes(rng: np.random.Generator, fmt: str = "JPEG", size: int = 12) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size + 3, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    """ImageNet-train layout with mixed-case extensions, PNGs and a nested folder."""
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for c, name in enumerate(CLASSES):
        for i in range(6 + c):
            ext, fmt = [("JPEG", "JPEG"), ("jpg", "JPEG"), ("png", "PNG"), ("jpeg", "JPEG")][i % 4]
            sub = root / name / ("nested" if i == 5 else "")
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"{name}.{i}.{ext}").write_bytes(image_bytes(rng, fmt))
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def read_shards(directory: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes}, read with the standard library, checking member headers on the way."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob("*.tar")):
        with open(shard, "rb") as f:
            assert f.read(512)[257:265] == b"ustar\x0000"  # POSIX ustar, not GNU and not PAX
        with tarfile.open(shard) as tar:
            assert tar.pax_headers == {}
            for m in tar.getmembers():
                assert (m.mtime, m.mode, m.uid, m.gid, m.uname, m.gname, m.pax_headers) == (0, 0o444, 0, 0, "", "", {})
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def tree_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_imagefolder_round_trip(folder, tmp_path):
    out = tmp_path / "out"
    result = ms.make_shards(folder, out, maxcount=4, progress=False)
    samples = read_shards(out)
    assert len(samples) == result["total"] == 21 and result["num_skipped"] == 0
    for key, files in samples.items():
        assert "." not in key
        meta = json.loads(files["json"])
        ext = next(e for e in files if e not in ("cls", "json"))
        assert ext == ("png" if meta["source"].endswith(".png") else "jpg")
        assert files[ext] == (folder / meta["source"]).read_bytes()  # original bytes, not re-encoded
        assert int(files["cls"]) == meta["label"] == CLASSES.index(meta["class_name"])
        assert meta["source"].split("/")[0] == meta["class_name"]
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["classes"] == CLASSES and manifest["num_classes"] == 3 and manifest["total"] == 21
    assert list(manifest["shards"]) == [f"train-{i:06d}.tar" for i in range(6)]
    assert all(n <= 4 for n in manifest["shards"].values()) and manifest["pattern"] == "train-{000000..000005}.tar"
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert sorted(r["key"] for r in index) == sorted(samples)
    assert {r["source"]: r["label"] for r in index} == {
        json.loads(f["json"])["source"]: int(f["cls"]) for f in samples.values()
    }
    # The class-sorted listing was shuffled.
    labels = [int(s["cls"]) for _, s in sorted(samples.items())]
    assert labels != sorted(labels)
    # webdataset reads the same samples, in key order.
    read = list(wds.WebDataset(sorted(str(p) for p in out.glob("*.tar")), shardshuffle=False))
    assert [s["__key__"] for s in read] == sorted(samples)
    assert all(s["cls"] == samples[s["__key__"]]["cls"] for s in read)
    assert vs.main([str(out), "--no-progress"]) == 0


def test_deterministic_for_any_worker_count(folder, tmp_path):
    runs = [(tmp_path / "a", 1), (tmp_path / "b", 1), (tmp_path / "c", 2)]
    for out, workers in runs:
        ms.make_shards(folder, out, maxcount=3, workers=workers, seed=7, progress=False)
    assert tree_bytes(runs[0][0]) == tree_bytes(runs[1][0]) == tree_bytes(runs[2][0])
    ms.make_shards(folder, tmp_path / "d", maxcount=3, seed=8, progress=False)
    assert tree_bytes(tmp_path / "d")["train-000000.tar"] != tree_bytes(runs[0][0])["train-000000.tar"]


def test_interrupted_run_resumes_to_identical_output(folder, tmp_path):
    ms.make_shards(folder, tmp_path / "whole", maxcount=3, progress=False)
    out = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        ms.make_shards(folder, out, maxcount=3, progress=False, fail_after=3)
    assert not (out / "dataset.json").exists()
    assert sorted(p.name for p in out.glob("*.tar")) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    # What a kill could leave behind: a half-written temp file and a shard whose sidecar is stale.
    (out / ".train-000003.tar.tmp").write_bytes(b"partial")
    with open(out / "train-000001.tar", "r+b") as f:
        f.truncate(1024)
    result = ms.make_shards(folder, out, maxcount=3, progress=False)
    assert result["reused"] == 2
    assert tree_bytes(out) == tree_bytes(tmp_path / "whole")
    assert not (out / ".make_shards").exists()
    again = ms.make_shards(folder, out, maxcount=3, progress=False)  # complete: nothing to do
    assert again["written_now"] == 0 and tree_bytes(out) == tree_bytes(tmp_path / "whole")


def test_corrupt_sources_are_skipped_and_reported(folder, tmp_path, capsys):
    good = (folder / "bee" / "bee.1.jpg").read_bytes()
    (folder / "bee" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (folder / "bee" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    png = bytearray((folder / "cat" / "cat.2.png").read_bytes())
    png[40] ^= 0xFF  # breaks a chunk CRC
    (folder / "cat" / "badcrc.png").write_bytes(bytes(png))
    (folder / "cat" / "empty.png").write_bytes(b"")
    (folder / "cat" / "trailer.jpg").write_bytes(good + bytes(2000))  # data after the image: still good
    out = tmp_path / "out"
    assert ms.main(["--input", str(folder), "--output", str(out), "--no-progress"]) == 0
    assert "22 samples written, 4 skipped" in capsys.readouterr().out
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["source"] for s in skipped) == [
        "bee/garbage.jpg",
        "bee/truncated.jpg",
        "cat/badcrc.png",
        "cat/empty.png",
    ]
    assert all(s["reason"] and "0x" not in s["reason"] for s in skipped)  # no addresses: reports are reproducible
    assert json.loads((out / "dataset.json").read_text())["num_skipped"] == 4
    assert len(read_shards(out)) == 22


NAMED = (["ant", "cat", "bee"], ["ant", "bee", "cat"])


@pytest.mark.parametrize(
    ("name", "text", "classes_file", "expected"),
    [
        ("labels.txt", "# name class\n{a} 0\n{b} 2\n{c} 1\n", None, (["0", "2", "1"], ["0", "1", "2"])),
        ("labels.txt", "{a} ant\n{b} cat\n{c} bee\nunused.jpg ant\n", None, NAMED),
        ("LOC_val_solution.csv", "ImageId,PredictionString\n{sa},ant 1 2 3 4\n{sb},cat 5\n{sc},bee 1\n", None, NAMED),
        ("labels.json", '{{"{a}": "ant", "{b}": "cat", "{c}": "bee"}}', None, NAMED),
        ("labels.txt", "{a} ant\n{b} 3\n{c} bee\n", "zebra\nant\nbee\ncat\n", (NAMED[0], ["zebra", *NAMED[1]])),
    ],
)
def test_flat_folder_with_labels_file(tmp_path, name, text, classes_file, expected):
    rng = np.random.default_rng(1)
    src = tmp_path / "val"
    src.mkdir()
    stems = ["ILSVRC_val_01", "ILSVRC_val_02", "ILSVRC_val_03"]
    for stem in stems:
        (src / f"{stem}.JPEG").write_bytes(image_bytes(rng))
    files = [f"{s}.JPEG" for s in stems]
    labels = tmp_path / name
    labels.write_text(text.format(a=files[0], b=files[1], c=files[2], sa=stems[0], sb=stems[1], sc=stems[2]))
    classes = None
    if classes_file:
        classes = tmp_path / "classes.txt"
        classes.write_text(classes_file)
    result = ms.make_shards(src, tmp_path / "out", labels=labels, classes=classes, prefix="val", progress=False)
    got = {json.loads(s["json"])["source"]: s for s in read_shards(tmp_path / "out").values()}
    names = [json.loads(got[f]["json"])["class_name"] for f in files]
    assert (names, result["classes"]) == expected
    assert [int(got[f]["cls"]) for f in files] == [expected[1].index(n) for n in names]


def test_maxsize_cuts_shards(folder, tmp_path):
    limit = 4 * member_bytes(1000)
    result = ms.make_shards(folder, tmp_path / "out", maxsize=limit, progress=False)
    assert len(result["shards"]) > 1 and result["total"] == 21
    index = pq.read_table(tmp_path / "out" / "index.parquet").to_pylist()
    for shard in result["shards"]:
        planned = [member_bytes(r["size"]) + member_bytes(8) + member_bytes(300) for r in index if r["shard"] == shard]
        assert len(planned) == 1 or sum(planned) <= limit


def write_parquet(path: Path, rng, rows: int, struct: bool, group: int, names: list[str] | None = None) -> list:
    images = [image_bytes(rng, "PNG" if i % 3 == 0 else "JPEG") for i in range(rows)]
    labels = [i % 3 for i in range(rows)]
    column = (
        pa.array([{"bytes": b, "path": f"img_{i}.jpg"} for i, b in enumerate(images)])
        if struct
        else pa.array(images, pa.binary())
    )
    table = pa.table({"image": column, "label": pa.array(labels, pa.int64()), "other": pa.array(range(rows))})
    if names:
        features = {"label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})
    pq.write_table(table, path, row_group_size=group)
    return list(zip(images, labels, strict=True))


@pytest.mark.parametrize("struct", [True, False])
def test_parquet_round_trip(tmp_path, struct):
    rng = np.random.default_rng(2)
    src = tmp_path / "parquet"
    src.mkdir()
    names = CLASSES if struct else None
    rows = {
        "train-00000-of-00002.parquet": write_parquet(src / "train-00000-of-00002.parquet", rng, 14, struct, 4, names),
        "train-00001-of-00002.parquet": write_parquet(src / "train-00001-of-00002.parquet", rng, 9, struct, 5, names),
    }
    out = tmp_path / "out"
    result = ms.make_shards(src, out, format="parquet", maxcount=4, shuffle_buffer=6, progress=False)
    assert result["total"] == 23 and result["classes"] == (CLASSES if struct else ["0", "1", "2"])
    samples = read_shards(out)
    for files in samples.values():
        meta = json.loads(files["json"])
        file, row = meta["source"].rsplit(":", 1)
        data, label = rows[file][int(row)]
        ext = "png" if data.startswith(b"\x89PNG") else "jpg"
        assert files[ext] == data and int(files["cls"]) == label == meta["label"]
    ms.make_shards(src, tmp_path / "two", format="parquet", maxcount=4, shuffle_buffer=6, workers=2, progress=False)
    assert tree_bytes(out) == tree_bytes(tmp_path / "two")
    assert vs.main([str(out), "--no-progress", "--workers", "2"]) == 0


def test_parquet_missing_column_is_one_line_error(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": pa.array([b"x"]), "target": pa.array([1])}), path)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_tools.make_shards", "--format", "parquet", "--input", str(path)]
    proc = subprocess.run([*cmd, "--output", str(out)], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert str(path) in proc.stderr and "missing column 'label'" in proc.stderr and "image, target" in proc.stderr
    assert not out.exists()


def test_bad_input_gives_one_line_error_and_writes_nothing(folder, tmp_path, capsys):
    out = tmp_path / "out"

    def error(*args: str) -> str:
        assert ms.main(["--output", str(out), "--no-progress", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        return err

    assert "does not exist" in error("--input", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    assert "no images found" in error("--input", str(tmp_path / "empty"))
    (folder / "dog").mkdir()
    assert f"class folder {folder / 'dog'} has no images" in error("--input", str(folder))
    (folder / "dog").rmdir()
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(image_bytes(np.random.default_rng(3)))
    (flat / "b.jpg").write_bytes(image_bytes(np.random.default_rng(4)))
    assert "--labels" in error("--input", str(flat))
    labels = tmp_path / "labels.txt"
    labels.write_text("a.jpg 1\n")
    assert "no entry for 1 image(s), e.g. b.jpg" in error("--input", str(flat), "--labels", str(labels))
    labels.write_text("a.jpg 1\nb.jpg 5\n")
    (tmp_path / "classes.txt").write_text("x\ny\n")
    classes = ["--classes", str(tmp_path / "classes.txt")]
    assert "out of range" in error("--input", str(flat), "--labels", str(labels), *classes)
    labels.write_text("a.jpg 1\nb.jpg -1\n")
    assert "out of range" in error("--input", str(flat), "--labels", str(labels))
    assert not out.exists()

    # An output folder holding another dataset is refused unless --overwrite.
    assert ms.main(["--input", str(folder), "--output", str(out), "--no-progress"]) == 0
    before = tree_bytes(out)
    assert "different dataset" in error("--input", str(folder), "--seed", "1")
    assert tree_bytes(out) == before
    assert ms.main(["--input", str(folder), "--output", str(out), "--seed", "1", "--overwrite", "--no-progress"]) == 0
    assert tree_bytes(out) != before


def test_verify_detects_corruption_truncation_and_count_mismatch(folder, tmp_path, capsys):
    ms.make_shards(folder, tmp_path / "good", maxcount=5, progress=False)
    assert vs.main([str(tmp_path / "good"), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")

    def damaged(name: str, damage) -> str:
        copy = tmp_path / name
        copy.mkdir()
        for path in (tmp_path / "good").iterdir():
            (copy / path.name).write_bytes(path.read_bytes())
        damage(copy)
        assert vs.main([str(copy), "--no-progress", "--workers", "2"]) == 1
        return capsys.readouterr().out

    def flip_jpeg(copy: Path) -> None:
        shard = copy / "train-000001.tar"
        with tarfile.open(shard) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        data = bytearray(shard.read_bytes())
        data[member.offset_data : member.offset_data + 16] = bytes(16)  # wipe the JPEG header
        shard.write_bytes(bytes(data))

    report = damaged("flipped", flip_jpeg)
    assert "train-000001.tar: sample " in report and "does not decode" in report
    assert "train-000001.tar: size or sha256 differs" in report

    def truncate(copy: Path) -> None:
        with open(copy / "train-000002.tar", "r+b") as f:
            f.truncate(1500)

    report = damaged("truncated", truncate)
    assert "train-000002.tar" in report and "samples, dataset.json says 5" in report

    def cut_header(copy: Path) -> None:  # a cut tar header: plain tarfile would see a clean end
        shard = copy / "train-000002.tar"
        with tarfile.open(shard) as tar:
            offset = tar.getmembers()[4].offset
        shard.write_bytes(shard.read_bytes()[: offset + 100])

    assert "train-000002.tar: unreadable tar after 1 samples: ReadError: truncated or damaged tar header" in (
        damaged("cut-header", cut_header))

    def recount(copy: Path) -> None:
        manifest = json.loads((copy / "dataset.json").read_text())
        manifest["shards"]["train-000000.tar"] += 1
        (copy / "dataset.json").write_text(json.dumps(manifest))

    assert "train-000000.tar: 5 samples, dataset.json says 6" in damaged("recount", recount)

    def extra(copy: Path) -> None:
        (copy / "train-000099.tar").write_bytes((copy / "train-000000.tar").read_bytes())

    assert "train-000099.tar: not listed" in damaged("extra", extra)


def test_verify_usage_error(tmp_path, capsys):
    assert vs.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_errors_are_data_tool_errors(tmp_path):
    with pytest.raises(DataToolError, match="--prefix"):
        ms.make_shards(tmp_path, tmp_path / "out", prefix="a.b")
