"""Object storage on a real S3-compatible server (moto, server mode, on 127.0.0.1): shards from a bucket."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from _helpers import S3Server

from mae_ray import storage
from mae_ray.config import load_config
from mae_ray.data.loader import make_eval_loader, make_train_loader
from mae_ray.data.shards import dataset_size, expand_urls, manifest_classes, manifest_crop_ratio
from mae_ray.errors import ConfigError, DataError

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def bucket(demo_data):
    """The demo shards and their dataset.json, uploaded to s3://mae-ray-test/{train,val}."""
    with S3Server() as s3:
        s3.urls = {split: s3.upload(Path(demo_data[split]).parent, split) for split in ("train", "val")}
        yield s3


def labels(loader) -> list[int]:
    return [int(y) for _, ys in loader for y in ys]


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 2)])
def test_evaluation_from_a_bucket_sees_every_sample_once_as_from_disk(bucket, demo_data, world, workers):
    kw = dict(batch_size=64, img_size=32, world_size=world, num_workers=workers)
    local = [make_eval_loader(demo_data["val"], rank=r, **kw) for r in range(world)]
    remote = [make_eval_loader(bucket.urls["val"], rank=r, **kw) for r in range(world)]
    for a, b in zip(local, remote, strict=True):
        assert b.num_samples == a.num_samples  # from the bucket's dataset.json: no scan, no None
        assert Counter(labels(b)) == Counter(labels(a))  # loader processes reach the server too
    assert sum(b.num_samples for b in remote) == dataset_size(bucket.urls["val"]) == 300


def test_training_from_a_bucket_sizes_its_epoch_from_the_bucket_manifest(bucket, demo_data):
    kw = dict(batch_size=50, img_size=32, world_size=2, num_workers=1, seed=3)
    local = [make_train_loader(demo_data["train"], rank=r, **kw) for r in range(2)]
    remote = [make_train_loader(f"{bucket.urls['train']}/", rank=r, **kw) for r in range(2)]
    assert [len(x) for x in remote] == [len(x) for x in local] == [12, 12]  # 1200 // (2 x 50)
    assert [len(labels(x)) for x in remote] == [600, 600]
    assert manifest_classes(expand_urls(bucket.urls["train"])[0])[1] == 10
    assert manifest_crop_ratio(bucket.urls["val"]) == manifest_crop_ratio(demo_data["val"])


def test_bucket_patterns_expand_and_a_missing_object_is_named(bucket):
    one = expand_urls(f"{bucket.urls['train']}/train-{{000000..000001}}.tar")
    assert one == [f"{bucket.urls['train']}/train-000000.tar", f"{bucket.urls['train']}/train-000001.tar"]
    assert expand_urls(bucket.urls["train"]) == expand_urls(bucket.urls["train"] + "/")  # a prefix: its *.tar
    with pytest.raises(DataError, match=r"1 object\(s\) not found, e.g. 's3://mae-ray-test/train/train-000099.tar'"):
        expand_urls(f"{bucket.urls['train']}/train-{{000000,000099}}.tar")
    with pytest.raises(DataError, match="no \\*.tar shards under 's3://mae-ray-test/nothing'"):
        expand_urls("s3://mae-ray-test/nothing")


def test_the_config_names_the_endpoint_and_the_environment_is_the_fallback(bucket, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    cfg = load_config(None, [f"storage.endpoint_url={bucket.endpoint}"])
    storage.use_endpoint(cfg.storage.endpoint_url)  # what lifecycle.prepare and every Ray worker do first
    assert dataset_size(bucket.urls["val"]) == 300
    with pytest.raises(ConfigError, match="storage.endpoint_url must be the http"):
        load_config(None, ["storage.endpoint_url=127.0.0.1:9000"])


def test_verify_shards_checks_a_bucket_and_finds_a_truncated_upload(bucket, demo_data, capsys):
    from data_tools import verify_shards

    assert verify_shards.main([bucket.urls["val"], "--no-progress", "--workers", "2"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("verified 300 samples in 2 shards") and out.endswith(": OK"), out
    folder = Path(demo_data["val"]).parent
    bad = bucket.upload(folder, "val-truncated")
    first = sorted(folder.glob("*.tar"))[0]
    with bucket.fs.open_output_stream(f"{bad[5:]}/{first.name}") as f:
        f.write(first.read_bytes()[:-20000])  # an interrupted upload
    assert verify_shards.main([bad, "--no-progress"]) == 1
    report = capsys.readouterr().out
    assert f"{first.name}: size or sha256 differs" in report and "dataset.json says" in report, report


def test_a_checkpoint_in_a_bucket_loads_and_a_missing_one_is_named(bucket, tmp_path):
    import torch

    from mae_ray.cluster.checkpoints import checkpoint_folders, load_state
    from mae_ray.errors import CheckpointError

    torch.save({"epoch": 4, "model": {"w": torch.ones(2)}}, tmp_path / "state.pt")
    (tmp_path / "run" / "epoch_000004").mkdir(parents=True)
    (tmp_path / "run" / "epoch_000005").mkdir()  # a folder without its state: not a checkpoint
    (tmp_path / "run" / "epoch_000004" / "state.pt").write_bytes((tmp_path / "state.pt").read_bytes())
    (tmp_path / "run" / "epoch_000005" / "note").write_text("half written")
    for sub in ("epoch_000004", "epoch_000005"):
        bucket.upload(tmp_path / "run" / sub, f"unit/run/{sub}")
    run = f"s3://{bucket.bucket}/unit/run"
    assert load_state(f"{run}/epoch_000004")["epoch"] == 4
    assert checkpoint_folders(run) == [f"{run}/epoch_000004"]
    assert checkpoint_folders(run, with_state=False) == [f"{run}/epoch_000004", f"{run}/epoch_000005"]
    with pytest.raises(CheckpointError, match="no checkpoint at s3://mae-ray-test/unit/run/epoch_000005/state.pt"):
        load_state(f"{run}/epoch_000005")


@pytest.mark.ray
def test_a_run_keeps_everything_in_the_bucket_and_resumes_evaluates_and_is_found_by_mlflow_from_it(
        bucket, local_ray, demo_data, tmp_path):
    # checkpoints in ray.storage_path=s3://...; MLflow's artifacts in the same bucket, through an MLflow
    # server that proxies them (mlflow server --artifacts-destination s3://...): nothing on local disk
    from _helpers import MlflowServer, tiny_config

    from mae_ray.cluster.checkpoints import load_state
    from mae_ray.errors import UserError
    from mae_ray.jobs import linprobe, pretrain
    from mae_ray.jobs.encoders import resolve_encoder

    runs = f"s3://{bucket.bucket}/runs"
    server = MlflowServer(tmp_path / "mlflow", artifacts=f"s3://{bucket.bucket}/mlflow")
    uri = server.start()
    try:
        def config(*extra):
            return tiny_config(demo_data, tmp_path, f"ray.storage_path={runs}", f"mlflow.tracking_uri={uri}", *extra)

        first = pretrain.run(config("train.epochs=1", "mlflow.run_name=first", "train.visualize_every=1"))
        assert first["checkpoint"] == f"{runs}/first/epoch_000000"  # the full URI, scheme included
        assert first["encoder"] == f"{runs}/first/epoch_000000/encoder.pth"
        logged = storage.list_files(f"s3://{bucket.bucket}/mlflow/", recursive=True)
        for artifact in ("encoder/encoder.pth", "reconstructions/epoch_0001.png"):  # the encoder and the pictures
            assert any(o.endswith(f"/{first['mlflow_run_id']}/artifacts/{artifact}") for o in logged), logged
        from_mlflow = resolve_encoder(f"runs:/{first['mlflow_run_id']}", config(), uri)  # downloads via the server
        saved = load_state(first["checkpoint"])["model"]
        assert torch.equal(from_mlflow.state["patch_embed.proj.weight"], saved["patch_embed.proj.weight"])
        with pytest.raises(UserError, match=f"{runs}/first already holds checkpoints of an earlier run"):
            pretrain.run(config("mlflow.run_name=first"))

        # --resume-from a bucket: the second run starts after the first's epoch 0, and says where it came from
        resumed = pretrain.run(config("train.epochs=2", "mlflow.run_name=second", f"output_dir={tmp_path}/b"),
                               resume_from=first["checkpoint"])
        state = load_state(resumed["checkpoint"])
        assert state["epoch"] == 1 and state["attempts"][-1] == {"start_epoch": 1, "start_update": 0,
                                                            "resumed_from": first["checkpoint"],
                                                            "workers": 2}  # tiny_config's 2 workers

        # in this process (no Ray Train start: Ray workers reading a bucket are the run's above and
        # test_multinode's), its checkpoints in the bucket all the same
        probe = linprobe.run(config(f"output_dir={tmp_path}/c", f"eval.checkpoint={resumed['checkpoint']}",
                                    "mlflow.run_name=probe", "linprobe.epochs=1", "linprobe.batch_size=64",
                                    "linprobe.warmup_epochs=0", "linprobe.cache_features=true", "ray.num_workers=0"))
        assert probe["encoder"] == resumed["checkpoint"] and probe["checkpoint"].startswith(f"{runs}/probe/epoch_")
    finally:
        server.stop()
    local = [p for p in tmp_path.rglob("*") if p.suffix in (".pt", ".pth", ".safetensors")]
    assert not local, f"written to local disk: {local}"


@pytest.mark.ray
def test_an_upload_outlives_a_short_outage_and_a_lasting_one_fails_naming_the_last_good_checkpoint(
        bucket, local_ray, demo_data, tmp_path, monkeypatch):  # bucket first: Ray starts with its credentials
    """The S3 server stops while epoch 1's checkpoint is being written and comes back 5 s later: the epoch is
    saved (the S3 client's own retries bridge ~10 s; storage.upload_retry_s extends that). It stops for good
    at epoch 2: after trying for upload_retry_s the run fails with one line that names epoch 1's checkpoint,
    and epoch 2 left nothing a reader would take for a checkpoint."""
    with S3Server("mae-ray-outages", outages=True) as flaky:
        _outages_test(flaky, demo_data, tmp_path, monkeypatch)


def _outages_test(bucket, demo_data, tmp_path, monkeypatch):
    import contextlib
    import threading
    import time

    from _helpers import tiny_config
    from mlflow import MlflowClient

    from mae_ray.cluster import faults
    from mae_ray.cluster.checkpoints import checkpoint_folders, load_state
    from mae_ray.errors import UserError
    from mae_ray.jobs import pretrain

    runs, out = f"s3://{bucket.bucket}/outages", tmp_path / "run"
    monkeypatch.setenv(faults.ENV, "pause:rank=0:before_report=1,pause:rank=0:before_report=2")
    down = []

    snapshot = f"{bucket.bucket}/outages/flaky/checkpoint_manager_snapshot.json"

    def registered(epoch):  # Ray's controller lists the run's checkpoints in this file of its own
        with contextlib.suppress(OSError), bucket.fs.open_input_stream(snapshot) as f:
            return f"epoch_{epoch:06d}" in f.read().decode()
        return False

    def settled():  # and has not rewritten it for 3 s: its writes to the bucket are done for now
        with contextlib.suppress(OSError):
            before = bucket.fs.get_file_info(snapshot).mtime
            time.sleep(3)
            return bucket.fs.get_file_info(snapshot).mtime == before
        return False

    def outages():  # rank 0 waits at each pause until this has stopped the server
        for epoch, back_after_s in ((1, 5.0), (2, None)):
            marker = out / f".fault-pause-before_report-{epoch}-0"
            deadline = time.monotonic() + 120
            # the outage begins once Ray has recorded the previous checkpoint: its own write is not retried
            while not (marker.exists() and registered(epoch - 1) and settled()) and time.monotonic() < deadline:
                time.sleep(0.05)
            bucket.stop_serving()
            down.append(epoch)
            Path(f"{marker}.go").touch()
            if back_after_s is not None:
                time.sleep(back_after_s)
                bucket.serve_again()
                down.pop()

    thread = threading.Thread(target=outages, daemon=True)
    thread.start()
    cfg = tiny_config(demo_data, tmp_path, f"ray.storage_path={runs}", "mlflow.run_name=flaky", "ray.num_workers=1",
                      f"storage.endpoint_url={bucket.endpoint}",
                      "storage.upload_retry_s=5")  # CI seconds: a try is ~2-4 s while the server is away
    try:
        with pytest.raises(UserError) as failed:
            pretrain.run(cfg)
    finally:
        thread.join(timeout=120)
        if down:
            bucket.serve_again()
    assert down == [2]
    assert re.match(rf"pre-training failed: cannot write checkpoint epoch_000002 to {runs}/flaky "
                    r"\(tried [2-9] times in \d+ s\): ", str(failed.value)), str(failed.value)
    assert str(failed.value).endswith(f"; last good checkpoint: {runs}/flaky/epoch_000001")
    assert checkpoint_folders(f"{runs}/flaky") == [f"{runs}/flaky/epoch_000000", f"{runs}/flaky/epoch_000001"]
    assert load_state(f"{runs}/flaky/epoch_000001")["epoch"] == 1  # written whole after the retries
    assert not storage.list_files(f"{runs}/flaky/epoch_000002/")  # nothing half-written
    run = MlflowClient(cfg.mlflow.tracking_uri).search_runs(
        [MlflowClient(cfg.mlflow.tracking_uri).get_experiment_by_name("test").experiment_id],
        "attributes.run_name = 'flaky'")[0]
    assert run.info.status == "FAILED"


def test_in_a_bucket_the_state_file_is_written_last(tmp_path):
    # readers recognise a checkpoint by its state.pt: with it written last, a copy cut short anywhere
    # leaves a folder no reader takes for a checkpoint (a bucket has no rename to make the folder atomic)
    from mae_ray.cluster.checkpoints import STATE_FILE
    from mae_ray.cluster.upload import copy_last

    for name in ("encoder.pth", STATE_FILE, "config.yaml", "encoder.safetensors", "z.txt"):
        (tmp_path / name).write_bytes(name.encode())
    written = []

    class Recorder:  # the one call copy_last makes on a pyarrow filesystem
        def open_output_stream(self, path):
            written.append(path)
            return open(os.devnull, "wb")

    copy_last(str(tmp_path), Recorder(), "bucket/run/epoch_000003", STATE_FILE)
    assert written[-1] == f"bucket/run/epoch_000003/{STATE_FILE}" and len(written) == 5


def test_make_shards_writes_to_a_bucket_that_the_loader_and_verify_read(bucket, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from data_tools import make_shards, verify_shards

    for label in ("cat", "dog"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(5):
            pixels = np.random.default_rng(i).integers(0, 255, (12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    out = f"s3://{bucket.bucket}/made"
    args = ["--input", str(tmp_path / "images"), "--output", out, "--maxcount", "4", "--no-progress"]
    assert make_shards.main(args) == 0
    objects = storage.list_files(out + "/")
    assert [o.rsplit("/", 1)[-1] for o in objects] == [
        "dataset.json", "index.parquet", "skipped.jsonl", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert dataset_size(out) == 10 and verify_shards.main([out, "--no-progress"]) == 0
    capsys.readouterr()
    assert make_shards.main(args) == 2  # refused before any image is read
    assert capsys.readouterr().err.strip() == (f"error: {out} already holds a dataset (dataset.json); choose "
                                               "another --output or pass --overwrite")


def test_the_uploaded_dataset_is_marked_complete_last(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    from data_tools import bucket as uploads

    for name in ("dataset.json", "index.parquet", "train-000000.tar", "train-000001.tar"):
        (tmp_path / name).write_bytes(b"x")
    finals = []

    class Recorder:  # the calls upload_dataset makes on a pyarrow filesystem
        def get_file_info(self, path):
            return pafs.FileInfo(path, pafs.FileType.NotFound)

        def open_output_stream(self, path):
            return open(os.devnull, "wb")

        def copy_file(self, src, dest):
            finals.append(dest)

        def delete_file(self, path):
            pass

    monkeypatch.setattr(uploads.storage, "filesystem", lambda uri: (Recorder(), "b/p"))
    uploads.upload_dataset(tmp_path, "s3://b/p")
    assert finals[-1] == "b/p/dataset.json" and len(finals) == 4  # readers take the prefix as whole only now


WRONG_KEY = "AWS Error INVALID_ACCESS_KEY_ID"


@pytest.mark.parametrize(("settings", "expected"), [
    (["ray.storage_path=s3://no-such-bucket/runs"],
     "error: cannot write to s3://no-such-bucket/runs: When initiating multiple part upload"),
    (["data.train_shards=s3://no-such-bucket/train/"],
     "error: the bucket of 's3://no-such-bucket/train/' does not exist"),
    (["data.train_shards=s3://mae-ray-test/nothing-here/"],
     "error: no *.tar shards under 's3://mae-ray-test/nothing-here/'"),
    (["storage.endpoint_url=http://127.0.0.1:1", "data.train_shards=s3://mae-ray-test/train/"],
     "error: cannot list s3://mae-ray-test/train/: When listing objects under key"),
    # wrong credentials: moto checks keys when told to (INITIAL_NO_AUTH_ACTION_COUNT=0); ours are unknown to it
    (["ray.storage_path=s3://mae-ray-test/runs"], f"error: cannot write to s3://mae-ray-test/runs: .*{WRONG_KEY}"),
    (["data.train_shards=s3://mae-ray-test/train/"], f"error: cannot list s3://mae-ray-test/train/: .*{WRONG_KEY}"),
])
def test_a_bucket_that_cannot_be_used_is_one_line_before_ray_starts(bucket, demo_data, tmp_path, monkeypatch, capsys,
                                                                     settings, expected):
    from mae_ray import cli
    from mae_ray.cluster import launch

    def tripwire(*args, **kwargs):
        raise AssertionError("the job got as far as starting Ray")

    monkeypatch.setattr(launch, "init_ray", tripwire)
    monkeypatch.setattr(storage, "_filesystems", {})  # the endpoint case: no client cached from other tests
    monkeypatch.setenv("AWS_ENDPOINT_URL", bucket.endpoint)  # restored after the endpoint case overrides it
    if WRONG_KEY in expected:
        import moto.settings

        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    sets = ["model.name=mae_vit_micro_patch4", f"data.train_shards={demo_data['train']}",
            f"output_dir={tmp_path}/run", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", *settings]
    assert cli.main(["pretrain", *[a for s in sets for a in ("--set", s)]]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.match(re.escape(expected).replace(r"\.\*", ".*"), err[0]), err
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_trials_evaluation_jobs_get_run_folders_of_their_own(tmp_path, monkeypatch):
    # a sweep trial's pre-training, probe and fine-tuning share mlflow.run_name (the trial id); under one
    # ray.storage_path (a bucket) the same run name is the same checkpoint folder, and the probe would be
    # refused (or resume the pre-training's state). Each evaluation job gets a name of its own.
    from mae_ray.jobs import evaluate, finetune, linprobe
    from mae_ray.jobs.encoders import EncoderSource

    seen = {}

    def fake(job):
        def run(cfg, source=None, verbose=False):
            seen[job] = (cfg.mlflow.run_name, cfg.ray.storage_path)
            return {f"{job}_top1": 50.0, "mlflow_run_id": job}
        return run

    monkeypatch.setattr(linprobe, "run", fake("linprobe"))
    monkeypatch.setattr(finetune, "run", fake("finetune"))
    cfg = load_config(None, ["mlflow.run_name=abc_00000", "ray.storage_path=s3://b/runs", f"output_dir={tmp_path}"])
    evaluate.run(cfg, source=EncoderSource(None, cfg.model.kwargs(), None, "random"))
    assert seen == {"linprobe": ("abc_00000-linprobe", "s3://b/runs"), "finetune": ("abc_00000-finetune", "s3://b/runs")}


def test_the_quickstart_points_at_a_bucket_with_two_settings(bucket, demo_data, tmp_path, monkeypatch, capsys):
    # --storage and --endpoint-url: the demo shards go to the bucket once, the sweep state and the trials'
    # checkpoints with them (the sweep in a bucket itself: tests/test_sweep.py's killed-driver test)
    from mae_ray import cli
    from mae_ray.jobs import quickstart

    monkeypatch.setattr(quickstart, "build_demo_dataset", lambda folder: demo_data)  # the test's small one
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the flag alone names the server (restored after the test)
    root = f"s3://{bucket.bucket}/quickstart"
    sweep, base, _ = quickstart.prepare(None, str(tmp_path), [], storage_uri=root, endpoint_url=bucket.endpoint)
    assert sweep.storage_path == root and base.storage.endpoint_url == bucket.endpoint
    for split, count in (("train", 1200), ("val", 300)):
        assert getattr(base.data, f"{split}_shards").startswith(f"{root}/demo-data/{split}/")
        assert dataset_size(getattr(base.data, f"{split}_shards")) == count  # the bucket's dataset.json
    assert capsys.readouterr().out.count("[quickstart] uploading the demo") == 2
    quickstart.prepare(None, str(tmp_path), [], storage_uri=root, endpoint_url=bucket.endpoint)
    assert "uploading" not in capsys.readouterr().out  # the same data is there: not uploaded again

    assert cli.main(["quickstart", "--data-dir", str(tmp_path / "d"), "--endpoint-url", bucket.endpoint]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --endpoint-url names the S3 server of --storage")
    assert cli.main(["quickstart", "--data-dir", str(tmp_path / "d"), "--storage", "s3://no-such-bucket/q"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: cannot write to s3://no-such-bucket/q")
    assert not (tmp_path / "d").exists()  # refused before the demo data is built
