"""The checkpoint format's owner (mae_ray/cluster/checkpoints.py), in-process: what counts as a pre-training
checkpoint, and a state written and read back without unpickling anything."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mae_ray.cluster import checkpoints
from mae_ray.errors import CheckpointError


def test_only_a_pretraining_state_is_recognised_as_one():
    model = {"w": torch.zeros(2)}
    state = checkpoints.TrainingState(model=model, config="model:\n  name: x\n", epoch=3, mlflow_run_id="abc")
    assert checkpoints.pretraining_parts(state) == ("model:\n  name: x\n", model, "abc")
    assert checkpoints.pretraining_parts({"model": model}) is None  # an official .pth: no config
    assert checkpoints.pretraining_parts(checkpoints.TrainingState(head=model, epoch=0)) is None  # a probe's
    assert checkpoints.pretraining_parts([model]) is None


class Pickled:
    """An arbitrary object: loading it would mean running unpickling code."""


def test_state_round_trip_is_weights_only(tmp_path):
    folder = tmp_path / checkpoints.folder_name(7)
    folder.mkdir()
    state = checkpoints.TrainingState(model={"w": torch.arange(3.0)}, epoch=7, step=70, history=[{"epoch": 7}],
                                      attempts=[{"start_epoch": 0, "resumed_from": ""}], mlflow_run_id="r")
    torch.save(state, folder / checkpoints.STATE_FILE)
    back = checkpoints.load_state(str(folder))
    assert folder.name == "epoch_000007" and back["epoch"] == 7 and torch.equal(back["model"]["w"], torch.arange(3.0))

    torch.save({"model": Pickled()}, folder / checkpoints.STATE_FILE)  # needs unpickling: refused, one line
    try:
        checkpoints.load_state(str(folder))
    except CheckpointError as e:
        assert str(e).startswith(f"cannot read {folder / checkpoints.STATE_FILE}")
    else:
        raise AssertionError("a pickled object was loaded")


# ------------------------------------------------------------------ one owner of the names of what a run leaves
FORMAT_NAMES = ("STATE_FILE", "ENCODER_FILE", "ENCODER_SAFETENSORS", "CONFIG_FILE", "FINETUNED_FILE", "HEAD_FILE",
                "MLFLOW_ENCODER", "MLFLOW_CHECKPOINT", "CHECKPOINT_PREFIX")
PKG = Path(checkpoints.__file__).resolve().parents[1]


def test_no_other_module_spells_a_file_name_of_the_format():
    """The checkpoint files' names appear as strings in cluster/checkpoints.py only (docstrings aside).
    ``config.yaml`` is left out: a run's output folder has one too, the lifecycle's (jobs/lifecycle.py)."""
    names = {getattr(checkpoints, n) for n in FORMAT_NAMES if n.endswith(("_FILE", "SAFETENSORS"))}
    names.discard(checkpoints.CONFIG_FILE)
    found = []
    for path in sorted(PKG.rglob("*.py")):
        if path.name == "checkpoints.py" and path.parent.name == "cluster":
            continue
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                if any(node.value.endswith(n) for n in names):
                    found.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {node.value!r}")
    assert not found, "file names of the checkpoint format outside cluster/checkpoints.py:\n" + "\n".join(found)


RENAMED = """
import json, sys
from mae_ray.cluster import checkpoints
from mae_ray.config import load_config
from mae_ray.jobs import evaluate, pretrain

tiny = json.loads(sys.argv[1])
done = pretrain.run(load_config(None, tiny + ["output_dir=" + sys.argv[2] + "/pre"]))
folder = done["checkpoint"]
scores = {}
for spec, job in ((folder, "linprobe"), ("runs:/" + done["mlflow_run_id"], "finetune")):  # each reader, each job
    cfg = load_config(None, tiny + ["eval.checkpoint=" + spec, "output_dir=" + sys.argv[2] + "/" + job,
                                    "linprobe.epochs=1", "linprobe.warmup_epochs=0", "finetune.epochs=1",
                                    "finetune.warmup_epochs=0"])
    scores[spec] = evaluate.run(cfg, skip=tuple({"linprobe", "finetune"} - {job}))
print(json.dumps({"checkpoint": folder, "encoder": done["encoder"], "scores": scores,
                  "names": [getattr(checkpoints, n) for n in sys.argv[3:]]}))
"""


def test_the_format_renamed_in_its_one_module_still_pretrains_and_evaluates(demo_data, tmp_path):
    """A copy of the package with every file and folder name of the format changed in cluster/checkpoints.py
    alone: pre-training writes the new names, and the probe and fine-tuning read its encoder back both from the
    checkpoint folder (the probe) and through runs:/ (MLflow's artifact layout; fine-tuning)."""
    copy = tmp_path / "pkg"
    shutil.copytree(PKG, copy / "mae_ray", ignore=shutil.ignore_patterns("__pycache__"))
    source = (copy / "mae_ray" / "cluster" / "checkpoints.py").read_text()
    renamed = {n: f"x{getattr(checkpoints, n)}" if n != "CHECKPOINT_PREFIX" else "step_" for n in FORMAT_NAMES}
    for n in FORMAT_NAMES:
        source, count = re.subn(rf'^({n}\s*=\s*)"[^"]+"', rf'\1"{renamed[n]}"', source, flags=re.M)
        if count == 0:  # MLFLOW_ENCODER, MLFLOW_CHECKPOINT = "encoder", "checkpoint"
            source = source.replace(f'"{getattr(checkpoints, n)}"', f'"{renamed[n]}"', 1)
    (copy / "mae_ray" / "cluster" / "checkpoints.py").write_text(source)
    tiny = ["model.name=mae_vit_micro_patch4", "model.img_size=32", f"data.train_shards={demo_data['train']}",
            f"data.val_shards={demo_data['val']}", "data.num_workers=0", "data.samples_per_epoch=64",
            "train.batch_size=32", "train.effective_batch=32", "train.epochs=1", "train.warmup_epochs=0",
            "train.visualize_every=0", "linprobe.batch_size=32", "finetune.batch_size=32", "ray.num_workers=0",
            f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    env = {**os.environ, "PYTHONPATH": str(copy)}
    proc = subprocess.run([sys.executable, "-c", RENAMED, json.dumps(tiny), str(tmp_path), *FORMAT_NAMES],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["names"] == [renamed[n] for n in FORMAT_NAMES], "the copy was not the one imported"
    folder = Path(out["checkpoint"])
    assert folder.name.startswith("step_") and out["encoder"] == str(folder / renamed["ENCODER_FILE"])
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        renamed[n] for n in ("STATE_FILE", "ENCODER_FILE", "ENCODER_SAFETENSORS", "CONFIG_FILE"))
    (by_folder, probe), (by_run, tuned) = out["scores"].items()
    assert by_folder == str(folder) and by_run.startswith("runs:/")
    assert "linprobe_top1" in probe and "finetune_top1" in tuned, out["scores"]


def test_a_failed_background_copy_fails_the_next_report_and_no_copy_begins_after_it(tmp_path):
    """Ray Train's background upload thread (``CheckpointUploadMode.ASYNC``) on rank 0: a copy that fails for good
    is kept (``upload.Background``) and raised by the next checkpoint's report, naming the last good checkpoint;
    a copy queued behind it writes nothing, even where the storage works again; the run's last checkpoint waits
    for the copies in flight. (Here the copies run in this thread, into a run in this process's storage.)"""
    import threading

    import pyarrow.fs as pafs
    import pytest
    from ray.train import Checkpoint

    from mae_ray.cluster import launch
    from mae_ray.cluster.upload import Background

    state = tmp_path / "ckpt"
    state.mkdir()
    (state / checkpoints.STATE_FILE).write_bytes(b"state")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")  # a storage that refuses every write (as root, permissions would not)
    store = tmp_path / "store"
    store.mkdir()
    run = launch.InProcessRun(fs=pafs.LocalFileSystem(), root=str(not_a_folder))
    launch._IN_PROCESS.append(run)
    try:
        copies = Background()
        copies.queued(), copies.queued()
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint epoch_000001 .*last good checkpoint: "
                                                  r"epoch_000000$"):
            checkpoints._upload(Checkpoint.from_directory(str(state)), "epoch_000001", last_good="epoch_000000",
                                background=copies)
        run.root = str(store)  # the storage works again: the copy queued behind the failed one still writes nothing
        with pytest.raises(CheckpointError, match="epoch_000002 not copied: an earlier copy failed"):
            checkpoints._upload(Checkpoint.from_directory(str(state)), "epoch_000002", background=copies)
        assert not list(store.iterdir())
        with pytest.raises(CheckpointError, match="epoch_000001 .*last good checkpoint: epoch_000000$"):
            copies.check()  # the next report raises the first failure, before writing anything
    finally:
        launch._IN_PROCESS.pop()

    # the run's last checkpoint waits for a copy in flight, and raises its failure once it has failed
    copies = Background()
    copies.queued()
    threading.Timer(0.3, copies.finished, [CheckpointError("cannot write checkpoint epoch_000003")]).start()
    copies.check()  # not waiting: nothing has failed yet
    with pytest.raises(CheckpointError, match="epoch_000003"):
        copies.check(wait_s=30)
