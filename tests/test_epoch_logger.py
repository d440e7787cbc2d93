"""tracking.EpochLogger against a real MLflow store (sqlite): an epoch logged a second time, after a restart.

A worker group restarted from a checkpoint older than its last logged epoch trains that epoch again. Exact
resume gives it the same values, timings aside: counted as a re-run, visibly. Other values: a warning, a
count and a tag naming the epoch and what differed. Never a silent drop, and MLflow keeps the first values.
"""

from __future__ import annotations

import logging

import pytest
from mlflow import MlflowClient

from mae_ray import tracking
from mae_ray.tracking import MISMATCH_METRIC, MISMATCH_TAG, RERUN_METRIC, EpochLogger


def epoch_metrics(epoch: int, loss: float | None = None, seconds: float = 1.0) -> dict[str, float]:
    return {"train_loss": 2.0 - epoch / 10 if loss is None else loss, "lr": 1e-3, "knn_top1": 10.0 + epoch,
            "images_per_s": 100 / seconds, "epoch_time_s": seconds, "data_wait_frac": 0.1 * seconds,
            "rss_mb": 1000.0 + seconds}


@pytest.fixture(scope="module")
def uri(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture
def run_id(uri, request):
    return tracking.start_run(uri, "epoch-logger", request.node.name, {})


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def first_attempt(uri: str, run_id: str, epochs: int) -> list[dict[str, float]]:
    """Epochs 0.. logged by one worker group; returns the checkpoint's history rows."""
    logger = EpochLogger(uri, run_id)
    for epoch in range(epochs):
        logger.log_epoch(epoch, epoch_metrics(epoch))
    return [{"epoch": e, **epoch_metrics(e)} for e in range(epochs)]


def test_an_epoch_trained_again_with_the_same_values_is_counted_and_said(uri, run_id, caplog):
    rows = first_attempt(uri, run_id, 3)
    # restarted from epoch 0's checkpoint: epochs 1 and 2 again, timings new, everything else reproduced
    logger = EpochLogger(uri, run_id)
    logger.backfill(rows[:1])
    with caplog.at_level(logging.WARNING, logger="mae_ray.tracking"):
        for epoch in (1, 2):
            logger.log_epoch(epoch, epoch_metrics(epoch, seconds=3.0))
    said = [r.getMessage() for r in caplog.records]
    assert [line.split(" (")[0] for line in said] == ["epoch 1 trained again after a restart",
                                                      "epoch 2 trained again after a restart"], said
    assert all(line.endswith("same values, timings aside") for line in said), said
    assert history(uri, run_id, RERUN_METRIC) == [(1, 1.0), (2, 2.0)]  # a running count, at the epochs re-run
    # each epoch once, with the values first logged (the first attempt's timings)
    assert history(uri, run_id, "epoch_time_s") == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert history(uri, run_id, "train_loss") == [(e, 2.0 - e / 10) for e in range(3)]
    run = MlflowClient(uri).get_run(run_id)
    assert MISMATCH_METRIC not in run.data.metrics
    assert not [t for t in run.data.tags if t.startswith(MISMATCH_TAG)]

    # a second restart re-running epoch 2: the count goes on across attempts
    EpochLogger(uri, run_id).log_epoch(2, epoch_metrics(2, seconds=2.0))
    assert history(uri, run_id, RERUN_METRIC) == [(1, 1.0), (2, 2.0), (2, 3.0)]


def test_an_epoch_trained_again_with_other_values_is_a_warning_a_count_and_a_tag(uri, run_id, caplog):
    first_attempt(uri, run_id, 2)
    logger = EpochLogger(uri, run_id)
    with caplog.at_level(logging.WARNING, logger="mae_ray.tracking"):
        logger.log_epoch(1, epoch_metrics(1, loss=1.25, seconds=2.0))  # exact resume broken
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[0].endswith("values differ"), said
    assert said[1] == "epoch 1 trained again does not reproduce the values MLflow holds (kept): " \
                      "train_loss: logged 1.9, now 1.25", said  # the timings are not named
    assert history(uri, run_id, MISMATCH_METRIC) == [(1, 1.0)]
    assert history(uri, run_id, RERUN_METRIC) == [(1, 1.0)]
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags[f"{MISMATCH_TAG}1"] == "train_loss: logged 1.9, now 1.25"
    assert history(uri, run_id, "train_loss") == [(0, 2.0), (1, 1.9)]  # the first values kept, once


def test_backfilled_history_is_checked_not_counted_as_a_rerun(uri, run_id, caplog):
    rows = first_attempt(uri, run_id, 2)
    logger = EpochLogger(uri, run_id)
    logger.backfill(rows)  # the checkpoint's record of the very epochs MLflow holds
    assert MlflowClient(uri).get_run(run_id).data.metrics.keys() == rows[0].keys() - {"epoch"}
    assert not caplog.records
    # a checkpoint whose history disagrees with MLflow (the run's logs and checkpoints come from two runs)
    with caplog.at_level(logging.WARNING, logger="mae_ray.tracking"):  # whatever an earlier test set
        logger.backfill([{**rows[1], "knn_top1": 0.0}])
    assert history(uri, run_id, MISMATCH_METRIC) == [(1, 1.0)]
    assert RERUN_METRIC not in MlflowClient(uri).get_run(run_id).data.metrics
    assert "in the checkpoint does not reproduce" in caplog.records[-1].getMessage()
