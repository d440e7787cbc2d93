"""The checkpoint format's owner (mae_ray/cluster/checkpoints.py), in-process: what counts as a pre-training
checkpoint, and a state written and read back without unpickling anything."""

from __future__ import annotations

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
