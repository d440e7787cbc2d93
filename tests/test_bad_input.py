"""The bad-input matrix (issue #7): each user mistake is one ``error:`` line and exit code 2, without a
traceback, before Ray starts where it can be, and leaves nothing behind (no output folder, no MLflow
store, an earlier run's files untouched).

Rows by kind of mistake (more workers than the cluster has is in test_pretrain.py; config keys and
values one by one in test_config.py; make_shards' parquet columns in test_make_shards.py):

1. config keys and values               -> test_cli_pretrain_* (real ``python -m`` processes)
2. shard paths that match nothing       -> test_refused_before_ray (pretrain, linprobe)
3. empty, truncated, unreadable shards  -> test_refused_before_ray (0 bytes, empty archive, not a tar),
                                           test_truncated_* (skipped and counted), test_nothing_readable_*,
                                           test_shards_without_a_single_sample_*
4. checkpoint of another model or size  -> test_cli_linprobe_*, test_refused_before_ray, test_*_image_size_*
6. a class folder with no images        -> test_cli_make_shards_*, test_class_with_every_image_skipped_*
7. labels out of range                  -> test_refused_before_ray (dataset.json), test_label_out_of_range_*

Most rows call a job's ``main(argv)`` in this process (what ``python -m`` runs, minus 5-10 s of imports
per row) with Ray's start replaced by a tripwire: reaching it means the mistake was not caught up front.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from _helpers import write_shard

from mae_ray import cli
from mae_ray.cluster import launch
from mae_ray.config import load_config
from mae_ray.data.loader import DataError, make_eval_loader, make_train_loader
from mae_ray.errors import UserError
from mae_ray.jobs import finetune, linprobe, pretrain
from mae_ray.model.mae import build_model
from mae_ray.train import classify

# torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

MICRO = "mae_vit_micro_patch4"
WIDE_KEYS = r"shape mismatch (file vs model): blocks.0.attn.proj.bias (96,) vs (64,)"


# --------------------------------------------------------------------------- helpers


def overrides(demo: dict, tmp: Path, *extra: str) -> list[str]:
    """A complete, cheap job (micro model, 1 worker, 1 epoch) on the demo shards; ``extra`` breaks it."""
    return [
        f"model.name={MICRO}", "model.img_size=32",
        f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
        "data.num_workers=1", "data.samples_per_epoch=64", "train.batch_size=32", "train.epochs=1",
        "train.warmup_epochs=0", "train.visualize_every=0", "linprobe.epochs=1", "linprobe.warmup_epochs=0",
        "finetune.epochs=1", "finetune.warmup_epochs=0", "linprobe.batch_size=32", "finetune.batch_size=32",
        "ray.num_workers=1", "ray.cpus_per_worker=1",
        "eval.checkpoint=random", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "mlflow.experiment=bad-input",
        f"output_dir={tmp}/out", *extra,
    ]


def as_args(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders): equal snapshots = nothing written."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def refused(capsys, job, argv: list[str]) -> str:
    """``mae-ray <job> ARGV`` in-process: exit code 2 and exactly one ``error:`` line on stderr; returns it."""
    assert cli.main([job.__name__.rsplit(".", 1)[1], *argv]) == 2
    return one_error_line(capsys.readouterr().err)


def run_cli(command: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m mae_ray <command>``, or ``python -m <command>`` for a dotted module (data_tools)."""
    module = ["-m", command] if "." in command else ["-m", "mae_ray", command]
    return subprocess.run([sys.executable, *module, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


class RayStarted(Exception):
    """Raised by the tripwire in place of starting Ray."""


@pytest.fixture
def no_ray(monkeypatch):
    def tripwire(*args, **kwargs):
        raise RayStarted("the job got as far as starting Ray")

    monkeypatch.setattr(launch, "init_ray", tripwire)


def shard_dir(tmp: Path, name: str, *sources: Path) -> Path:
    """A fresh folder of copies of ``sources`` (the session's demo shards are shared: never damage them)."""
    folder = tmp / name
    folder.mkdir()
    for src in sources:
        shutil.copy(src, folder / src.name)
    return folder


def demo_shard(demo: dict, split: str = "train", index: int = 0) -> Path:
    return Path(demo[f"{split}_dir"]) / f"{split}-{index:06d}.tar"


def wide_checkpoint(tmp: Path) -> Path:
    """An official-layout .pth of another width (96 instead of the micro preset's 64)."""
    path = tmp / "wide.pth"
    torch.save({"model": build_model(MICRO, embed_dim=96, num_heads=2).state_dict()}, path)
    return path


def a_demo_jpeg(demo: dict) -> bytes:
    with tarfile.open(demo_shard(demo, "val")) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        return tar.extractfile(member).read()


# --------------------------------------------------------------------------- 1, 4, 6: real CLI processes


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.mask_ratoi=0.5", "error: unknown key 'model.mask_ratoi'; valid keys in 'model': name, mask_ratio"),
        ("train.batch_size=big", "error: train.batch_size: expected int, got 'big' (str)"),
        ("ray.num_workers=1.5", "error: ray.num_workers: expected int, got 1.5 (float)"),
        # on a machine without a GPU: decoding on the GPU is refused at once
        ("data.decode=gpu", "error: data.decode=gpu decodes on the training GPU: it needs ray.use_gpu=true"),
        # an elastic group of more than its largest size, or of none (ray.num_workers is 1 here)
        ("ray.min_workers=2", "error: ray.min_workers must be in [1, ray.num_workers = 1], got 2"),
        ("ray.min_workers=0", "error: ray.min_workers must be in [1, ray.num_workers = 1], got 0"),
    ],
)
def test_cli_pretrain_bad_config_key_or_value(tmp_path, setting, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"model:\n  name: {MICRO}\noutput_dir: {tmp_path}/out\n")
    proc = run_cli("pretrain", ["--config", str(config), "--set", setting], tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr).startswith(message)
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no output folder, no mlflow.db


def test_cli_pretrain_wrong_type_in_the_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"train:\n  epochs: ten\noutput_dir: {tmp_path}/out\n")
    proc = run_cli("pretrain", ["--config", str(config)], tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == "error: train.epochs: expected int, got 'ten' (str)"
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


def test_cli_linprobe_checkpoint_of_another_architecture_names_the_keys(demo_data, tmp_path):
    path = wide_checkpoint(tmp_path)
    before = snapshot(tmp_path)
    proc = run_cli("linprobe", as_args(overrides(demo_data, tmp_path, f"eval.checkpoint={path}")), tmp_path)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert f"weights in {path} do not fit this model" in line and WIDE_KEYS in line
    assert "[linprobe]" not in proc.stdout  # refused before the job announced itself (and before Ray)
    assert snapshot(tmp_path) == before


def test_cli_make_shards_class_folder_without_images(tmp_path):
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "cat" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # never opened: the empty folder is found first
    (src / "dog").mkdir()
    (src / "dog" / "notes.txt").write_text("no images here")
    proc = run_cli("data_tools.make_shards", ["--input", str(src), "--output", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == f"error: class folder {src / 'dog'} has no images"
    assert not (tmp_path / "out").exists()


def test_class_with_every_image_skipped_is_kept_with_a_warning(tmp_path, capsys):
    from PIL import Image

    from data_tools import make_shards as ms

    src = tmp_path / "src"
    for name in ("ant", "bee", "cat"):
        (src / name).mkdir(parents=True)
    for i, name in enumerate(("ant", "cat")):
        Image.new("RGB", (8, 8), (60 * i, 0, 0)).save(src / name / "ok.png")
    (src / "bee" / "broken.png").write_bytes(b"not a png")
    assert ms.main(["--input", str(src), "--output", str(tmp_path / "out"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "2 samples written, 1 skipped" in captured.out
    assert captured.err.splitlines() == [
        "warning: 1 of 3 classes have no samples: bee; they keep their label index and count in num_classes "
        "(see skipped.jsonl for images that were skipped)"]
    manifest = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert manifest["num_classes"] == 3 and manifest["classes"] == ["ant", "bee", "cat"]  # labels unchanged


# --------------------------------------------------------------------------- 2, 3, 4, 7: refused before Ray


def _no_match(demo, tmp):
    return pretrain, [f"data.train_shards={tmp}/nothing-*.tar"], ["shard pattern", "nothing-*.tar", "not found"]


def _val_partly_missing(demo, tmp):  # pretraining uses val_shards too (reconstructions, kNN)
    spec = f"{demo['val_dir']}/val-{{000000..000002}}.tar"
    return pretrain, [f"data.val_shards={spec}"], ["1 path(s) not found", "val-000002.tar"]


def _zero_byte_shard(demo, tmp):
    folder = shard_dir(tmp, "shards", demo_shard(demo))
    (folder / "train-000001.tar").write_bytes(b"")
    return pretrain, [f"data.train_shards={folder}"], [f"shard {folder}/train-000001.tar is empty (0 bytes)"]


def _empty_archive(demo, tmp):
    folder = shard_dir(tmp, "shards", demo_shard(demo))
    tarfile.open(folder / "train-000001.tar", "w").close()  # a valid tar with no members
    return pretrain, [f"data.train_shards={folder}"], [f"{folder}/train-000001.tar holds no samples"]


def _not_a_tar(demo, tmp):
    folder = shard_dir(tmp, "shards", demo_shard(demo))
    (folder / "train-000001.tar").write_bytes(bytes(range(256)) * 8)
    return pretrain, [f"data.train_shards={folder}"], [f"shard {folder}/train-000001.tar is not a tar file"]


def _linprobe_no_match(demo, tmp):
    return linprobe, [f"data.train_shards={tmp}/train-{{000000..000003}}.tar"], ["4 path(s) not found"]


def _linprobe_folder_without_shards(demo, tmp):
    (tmp / "empty").mkdir()
    return linprobe, [f"data.train_shards={tmp}/empty"], ["contains no *.tar shards"]


def _linprobe_no_val(demo, tmp):
    return linprobe, ["data.val_shards="], ["data.val_shards is empty"]


def _linprobe_empty_val_shard(demo, tmp):
    folder = shard_dir(tmp, "val", demo_shard(demo, "val"))
    tarfile.open(folder / "val-000001.tar", "w").close()
    return linprobe, [f"data.val_shards={folder}"], [f"{folder}/val-000001.tar holds no samples"]


def _linprobe_checkpoint_missing(demo, tmp):
    return linprobe, [f"eval.checkpoint={tmp}/nope.pth"], [f"checkpoint not found: {tmp}/nope.pth"]


def _linprobe_not_a_checkpoint(demo, tmp):
    (tmp / "notes.pth").write_text("not a checkpoint")
    return linprobe, [f"eval.checkpoint={tmp}/notes.pth"], [
        f"cannot read {tmp}/notes.pth as a weights-only checkpoint (a torch file of tensors only"]


def _finetune_checkpoint_of_another_architecture(demo, tmp):
    return finetune, [f"eval.checkpoint={wide_checkpoint(tmp)}"], [WIDE_KEYS]


def _linprobe_fewer_classes_than_the_shards(demo, tmp):
    return linprobe, ["data.num_classes=5"], [
        f"the training shards' {demo['train_dataset_json']} lists 10 classes but the classifier gets 5 "
        "(from data.num_classes): their labels would be out of range"]


def _finetune_val_shards_of_a_bigger_dataset(demo, tmp):
    folder = shard_dir(tmp, "val", demo_shard(demo, "val"))
    manifest = json.loads(Path(demo["val_dataset_json"]).read_text())
    (folder / "dataset.json").write_text(json.dumps({**manifest, "num_classes": 100}))
    return finetune, [f"data.val_shards={folder}"], [
        f"the validation shards' {folder}/dataset.json lists 100 classes but the classifier gets 10 "
        f"(from {demo['train_dataset_json']})"]


def _linprobe_no_class_count(demo, tmp):
    folder = shard_dir(tmp, "shards", demo_shard(demo))  # no dataset.json beside it
    return linprobe, [f"data.train_shards={folder}"], [f"no num_classes in {folder}/dataset.json", "data.num_classes"]


# An epoch shorter than one update (issue 26): the optimiser would never step, and the run would record the
# accuracy of its initial weights. 64 samples per epoch, 1 worker.
def _pretrain_epoch_shorter_than_an_update(demo, tmp):
    return pretrain, ["train.effective_batch=128"], [  # 2 micro-batches of 32, accumulation 4
        "train: an epoch of 64 samples is 2 micro-batch(es) per worker", "fewer than the 4 of one update",
        "train.effective_batch <= 64", "data.samples_per_epoch >= 128"]


def _pretrain_max_steps_shorter_than_an_update(demo, tmp):
    return pretrain, ["train.effective_batch=64", "train.max_steps_per_epoch=1"], [
        "is 1 micro-batch(es) per worker", "train.max_steps_per_epoch >= 2 (it is 1)"]


def _pretrain_epoch_shorter_than_a_micro_batch(demo, tmp):
    return pretrain, ["train.batch_size=128"], [
        "train: an epoch of 64 samples is less than one micro-batch per worker", "train.batch_size <= 64"]


def _linprobe_epoch_shorter_than_an_update(demo, tmp):  # cached features: the whole training set, 1200
    return linprobe, ["linprobe.cache_features=true", "linprobe.batch_size=64", "linprobe.effective_batch=16384"], [
        "linprobe: an epoch of 1200 samples is 18 micro-batch(es) per worker", "fewer than the 256 of one update",
        "linprobe.effective_batch <= 1152"]


def _finetune_epoch_shorter_than_an_update(demo, tmp):
    return finetune, ["finetune.batch_size=16", "finetune.effective_batch=1024", "finetune.samples_per_epoch=512"], [
        "finetune: an epoch of 512 samples is 32 micro-batch(es) per worker", "finetune.samples_per_epoch >= 1024"]


ROWS = [_no_match, _val_partly_missing, _zero_byte_shard, _empty_archive, _not_a_tar, _linprobe_no_match,
        _linprobe_folder_without_shards, _linprobe_no_val, _linprobe_empty_val_shard, _linprobe_checkpoint_missing,
        _linprobe_not_a_checkpoint, _finetune_checkpoint_of_another_architecture,
        _linprobe_fewer_classes_than_the_shards, _finetune_val_shards_of_a_bigger_dataset, _linprobe_no_class_count,
        _pretrain_epoch_shorter_than_an_update, _pretrain_max_steps_shorter_than_an_update,
        _pretrain_epoch_shorter_than_a_micro_batch,
        _linprobe_epoch_shorter_than_an_update, _finetune_epoch_shorter_than_an_update]


@pytest.mark.parametrize("row", ROWS, ids=[row.__name__.strip("_") for row in ROWS])
def test_refused_before_ray(row, demo_data, tmp_path, capsys, no_ray):
    job, extra, fragments = row(demo_data, tmp_path)
    before = snapshot(tmp_path)
    line = refused(capsys, job, as_args(overrides(demo_data, tmp_path, *extra)))
    for fragment in fragments:
        assert fragment in line
    assert "weights_only" not in line  # torch's advice to load a file unsafely is not passed on
    assert snapshot(tmp_path) == before  # no output folder, no mlflow.db, inputs untouched


def test_a_refused_rerun_leaves_the_earlier_runs_files_untouched(demo_data, tmp_path, capsys, no_ray):
    out = tmp_path / "out"
    (out / "ray" / "out" / "epoch_000001").mkdir(parents=True)  # pretrain's checkpoints for run name "out"
    (out / "config.yaml").write_text("the earlier run's config\n")
    (out / "result.json").write_text('{"earlier": true}\n')
    before = snapshot(tmp_path)
    line = refused(capsys, pretrain, as_args(overrides(demo_data, tmp_path)))
    assert "already holds checkpoints of an earlier run (epoch_000001)" in line and "--resume-from" in line
    line = refused(capsys, linprobe, as_args(overrides(demo_data, tmp_path, f"eval.checkpoint={tmp_path}/x")))
    assert "checkpoint not found" in line
    assert snapshot(tmp_path) == before  # config.yaml not overwritten by the refused jobs


def test_checkpoint_of_another_image_size_is_interpolated_and_the_job_proceeds(demo_data, tmp_path, capsys, no_ray):
    from mae_ray.jobs.encoders import resolve_encoder

    path = tmp_path / "mae_micro_32px.pth"
    small = build_model(MICRO)
    torch.save({"model": {k: v for k, v in small.state_dict().items() if not k.startswith("decoder")}}, path)
    settings = overrides(demo_data, tmp_path, f"eval.checkpoint={path}", "model.img_size=48")
    source = resolve_encoder(str(path), load_config(None, settings), "sqlite:///unused.db")
    model = source.build()
    assert model.pos_embed.shape == (1, 1 + 12 * 12, 64)  # 48 px / 4 px patches, from a 8 x 8 table
    assert torch.equal(model.pos_embed[0, 0], small.pos_embed[0, 0])
    with pytest.raises(RayStarted):  # every check passed: the job went on to start Ray
        cli.main(["linprobe", *as_args(settings)])
    assert f"encoder: {path}" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- 3: damaged shards in the loaders


def test_truncated_shard_is_read_up_to_the_cut_and_the_broken_sample_counted(demo_data, tmp_path):
    """The loaders' documented behaviour (docs/data.md): skip and count, never fatal for some bad samples."""
    good = demo_shard(demo_data)
    folder = shard_dir(tmp_path, "shards", good)
    raw = good.read_bytes()
    (folder / "train-000001.tar").write_bytes(raw[: len(raw) // 2 + 100])  # a real shard cut in half
    with tarfile.open(good) as tar:
        per_shard = len({m.name.split(".")[0] for m in tar})
    loader = make_eval_loader(str(folder), batch_size=100, img_size=32, num_workers=0, num_classes=10)
    labels = [int(y) for _, ys in loader for y in ys]
    assert loader.skipped == 1  # the sample the cut went through; those after it cannot be known
    assert per_shard + per_shard * 0.4 < len(labels) < per_shard * 1.5
    train = make_train_loader(str(folder), batch_size=32, img_size=32, num_workers=1, samples_per_epoch=2 * 32 * 10,
                              shuffle_buffer=32, num_classes=10)
    assert sum(x.shape[0] for x, _ in train) == 640 and train.skipped >= 1  # full batches all the same


def cut_in_first_sample(demo: dict, folder: Path, count: int = 2) -> Path:
    folder.mkdir()
    for i in range(count):
        raw = demo_shard(demo, index=i).read_bytes()
        (folder / f"train-{i:06d}.tar").write_bytes(raw[:700])  # first header whole, its image cut
    return folder


def test_nothing_readable_in_the_validation_set_is_an_error_not_zero_accuracy(demo_data, tmp_path):
    loader = make_eval_loader(str(cut_in_first_sample(demo_data, tmp_path / "val")), batch_size=8, img_size=32,
                              num_workers=0)
    with pytest.raises(DataError, match="no readable validation samples"):
        classify.score(lambda x: torch.zeros(x.shape[0], 10), loader, torch.device("cpu"))
    assert loader.skipped == 2


@pytest.mark.timeout(60)
def test_shards_without_a_single_sample_raise_instead_of_looping_forever(tmp_path):
    # Remote shards are not checked up front: a pipe: shard that is an empty archive reaches the loader.
    tarfile.open(tmp_path / "empty.tar", "w").close()
    loader = make_train_loader([f"pipe:cat {tmp_path}/empty.tar"], batch_size=4, num_workers=0, samples_per_epoch=8)
    with pytest.raises(DataError, match=r"no samples in any of the 1 shard\(s\), e.g. pipe:cat"):
        list(loader)


@pytest.mark.ray
def test_nothing_readable_is_a_one_line_error_of_the_training_job(local_ray, demo_data, tmp_path):
    folder = cut_in_first_sample(demo_data, tmp_path / "shards")
    cfg = load_config(None, overrides(demo_data, tmp_path, f"data.train_shards={folder}"))
    with pytest.raises(UserError) as info:
        pretrain.run(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("pre-training failed: ") and "100 consecutive unreadable samples" in message
    assert not (tmp_path / "out" / "result.json").exists()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("bad-input").experiment_id])
    assert run.info.status == "FAILED"


# --------------------------------------------------------------------------- 7: labels out of range


@pytest.mark.parametrize(("kind", "label", "num_workers"), [("eval", 10, 1), ("train", -1, 0)])
def test_label_out_of_range_is_a_clear_error_naming_sample_and_shard(demo_data, tmp_path, kind, label, num_workers):
    jpeg = a_demo_jpeg(demo_data)
    shard = write_shard(tmp_path / "val-000000.tar", [
        ("s00000", {"jpg": jpeg, "cls": b"3"}),
        ("s00001", {"jpg": jpeg, "cls": str(label).encode()}),
    ])
    make = make_eval_loader if kind == "eval" else make_train_loader
    extra = {"samples_per_epoch": 8, "shuffle_buffer": 1} if kind == "train" else {}
    loader = make(str(shard), batch_size=2, img_size=32, num_workers=num_workers, num_classes=10, **extra)
    expected = f"sample s00001 of {shard} has label {label}, outside 0..9 for 10 classes"
    with pytest.raises(DataError, match=expected.replace(".", r"\.")) as info:
        list(loader)
    assert expected in launch.worker_error(info.value)  # the one line a job's error would show
    # Without num_classes (pre-training, where labels are unused) the same shard is fine.
    assert len(list(make(str(shard), batch_size=2, img_size=32, num_workers=0, **extra))) >= 1
