"""Shared stores are untrusted (issue #27), the parts that need no Ray: one redaction on every path out
(items 2), whole files and one job per folder (item 3), bounded inputs (item 4).

Servers are real (an HTTP shard server that refuses, an MLflow store, moto's S3 with authentication on);
jobs run through ``mae-ray``'s own ``main`` in this process, Ray's start replaced by a tripwire: each
refusal here must come before Ray, with one ``error:`` line.
"""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from _helpers import write_shard
from PIL import Image
from test_bad_input import a_demo_jpeg, as_args, no_ray, overrides, refused  # noqa: F401 (no_ray: a fixture)

from mae_ray import redaction, tracking
from mae_ray.data import sources
from mae_ray.data.device_decode import pretrain_batch
from mae_ray.data.loader import make_eval_loader, make_train_loader
from mae_ray.errors import DataError, UserError
from mae_ray.jobs import files, pretrain

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

SECRET = "planted-untrusted-pass-5e1f"


# --------------------------------------------------------------------------- item 2: one redaction
@pytest.mark.parametrize("text, shown", [
    ("pipe:curl -s -H 'Authorization: Bearer tok-123456' https://h/x.tar",
     "pipe:curl -s -H 'Authorization: Bearer ***' https://h/x.tar"),
    ("Authorization: Basic dXNlcjpwYXNz", "Authorization: Basic ***"),
    ("got Bearer eyJhbGciOiJIUzI1NiJ9.x.y back", "got Bearer *** back"),
    ("AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG mae-ray pretrain", "AWS_SECRET_ACCESS_KEY=*** mae-ray pretrain"),
    ("MLFLOW_TRACKING_TOKEN=abc123 MLFLOW_TRACKING_PASSWORD='p w'",
     "MLFLOW_TRACKING_TOKEN=*** MLFLOW_TRACKING_PASSWORD='***'"),
    ("+  password: hunter2\n+  api_key: \"k-99\"", "+  password: ***\n+  api_key: \"***\""),
    ('{"secret": "s3cr3t", "client_secret_key": "x"}', '{"secret": "***", "client_secret_key": "***"}'),
    ("key id AKIAIOSFODNN7EXAMPLE denied", "key id *** denied"),
    ("pipe:curl -u alice:pw https://h/x.tar", "pipe:curl -u *** https://h/x.tar"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", "***"),
    # not secrets: a config key that contains "token", a commit, an override, a shard path
    ("model.mask_token_in_encoder: true", "model.mask_token_in_encoder: true"),
    ("git 0123456789abcdef0123456789abcdef01234567", "git 0123456789abcdef0123456789abcdef01234567"),
    ("--set model.mask_ratio=0.75", "--set model.mask_ratio=0.75"),
    ("/data/shards/train-{000000..000009}.tar", "/data/shards/train-{000000..000009}.tar"),
])
def test_one_redaction_covers_headers_pairs_and_keys(text, shown):
    assert redaction.redact(text) == shown
    assert tracking.redact is redaction.redact  # one function, whoever calls it


def test_a_secret_written_in_pieces_is_redacted_whole():
    out = io.StringIO()
    stream = redaction.RedactingStream(out)
    stream.write("shard http://user:")
    stream.write(f"{SECRET}@host/x.tar failed\nnext")
    assert out.getvalue() == "shard http://***@host/x.tar failed\n"
    stream.flush()
    assert out.getvalue().endswith("next") and SECRET not in out.getvalue()


def test_errors_are_redacted_when_made_and_mlflow_warnings_too(caplog):
    error = DataError(f"cannot read http://u:{SECRET}@h/x.tar")
    assert SECRET not in str(error) and SECRET not in repr(error)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        logger = tracking.EpochLogger(f"http://u:{SECRET}@127.0.0.1:9/", "0" * 32)  # nothing listens on 9
        logger.log_epoch(0, {"train_loss": 1.0})
        assert not logger.flush()
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert "MLflow logging failed" in caplog.text and "127.0.0.1" in caplog.text
    assert SECRET not in caplog.text


class _RefusingServer:
    """An HTTP shard server that answers every request with 500, counting them."""

    def __init__(self):
        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests += 1
                self.send_error(500)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def refusing():
    server = _RefusingServer()
    yield server
    server.stop()


@pytest.mark.usefixtures("no_ray")
def test_a_refusing_shard_server_ends_the_job_with_one_redacted_line(demo_data, tmp_path, capsys, refusing):
    """Before: the pre-training printed its start line, then asked for the shards ~330 times in 10 minutes."""
    url = f"http://shard-user:{SECRET}@127.0.0.1:{refusing.port}/t-{{0..1}}.tar"
    t0 = time.time()
    line = refused(capsys, pretrain, as_args(overrides(demo_data, tmp_path, f"data.train_shards={url}",
                                                        "data.num_classes=10", "data.shard_tries=2")))
    assert line.startswith(f"error: shard http://***@127.0.0.1:{refusing.port}/t-0.tar could not be read (2 tries; "
                           "data.shard_tries): HTTPError: HTTP Error 500"), line
    assert refusing.requests == 2 and time.time() - t0 < 30
    assert SECRET not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_shard_that_fails_inside_a_worker_is_tried_a_bounded_number_of_times(refusing, monkeypatch):
    monkeypatch.setenv(sources.LIMITS_ENV["shard_tries"], "3")
    url = f"http://u:{SECRET}@127.0.0.1:{refusing.port}/t-0.tar"
    loader = make_train_loader([url], batch_size=2, num_workers=0, samples_per_epoch=8, img_size=32)
    with pytest.raises(DataError, match=r"could not be read \(3 tries") as caught:
        next(iter(loader))
    assert refusing.requests == 3 and SECRET not in str(caught.value)


@pytest.mark.usefixtures("no_ray")
def test_wrong_s3_credentials_are_one_line_without_the_keys(demo_data, tmp_path, capsys, monkeypatch):
    from _helpers import S3Server
    from moto import settings

    with S3Server() as s3:
        train = s3.upload(Path(demo_data["train_dir"]), "train")
        monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials from now on
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTEDWRONG0003")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        line = refused(capsys, pretrain, as_args(overrides(demo_data, tmp_path, f"data.train_shards={train}")))
    assert "error: " in line and "AKIAPLANTEDWRONG0003" not in line and SECRET not in line, line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- item 3: whole files, one job per folder
@pytest.mark.usefixtures("no_ray")
def test_a_folder_in_use_is_refused_and_freed_when_its_holder_is_killed(demo_data, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mae_ray.jobs import files\n"
                               f"with files.claim({str(out)!r}, 'pre-training'):\n"
                               "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        line = refused(capsys, pretrain, as_args(overrides(demo_data, tmp_path)))
        assert line.startswith(f"error: {out} is in use by pid {holder.pid} (pre-training, since "), line
        assert line.endswith(": wait for it to end, or use another folder")
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a kill leaves no lock behind: the kernel drops it
        holder.wait()
    assert (out / files.LOCK_NAME).exists()  # left by the killed holder, unlocked
    with files.claim(str(out), "the next job"):  # free again; and now held by this process
        other = subprocess.run([sys.executable, "-c", "from mae_ray.jobs import files\n"
                                f"with files.claim({str(out)!r}, 'b'): pass"], capture_output=True, text=True)
        assert other.returncode == 1 and f"is in use by pid {os.getpid()} (the next job" in other.stderr
    assert out.is_dir() and not (out / files.LOCK_NAME).exists()  # a job that ends removes its lock file


def test_a_job_refused_by_its_checks_leaves_no_folder_behind(tmp_path):
    with pytest.raises(UserError, match="bad"), files.claim(str(tmp_path / "new"), "job"):
        raise UserError("bad")
    assert not (tmp_path / "new").exists()


def test_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    files.write_json(str(path), {"top1": 1.0, "uri": f"http://u:{SECRET}@h"})
    assert json.loads(path.read_text()) == {"top1": 1.0, "uri": "http://***@h"}  # redacted, as every record
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space"):
        files.write_json(str(path), {"top1": 2.0})
    assert json.loads(path.read_text())["top1"] == 1.0 and [p.name for p in tmp_path.iterdir()] == ["result.json"]


# --------------------------------------------------------------------------- item 4: bounded inputs
def _bomb_jpeg(jpeg: bytes, side: int) -> bytes:
    """``jpeg`` with its frame header claiming ``side`` x ``side`` pixels (a few KB that would decode to GBs)."""
    at = jpeg.index(b"\xff\xc0") + 5  # SOF0: length (2), precision (1), then height, width
    return jpeg[:at] + side.to_bytes(2, "big") * 2 + jpeg[at + 4:]


def test_bombs_and_huge_members_are_skipped_and_counted_on_the_cpu_path(demo_data, tmp_path, monkeypatch):
    monkeypatch.setenv(sources.LIMITS_ENV["max_member_bytes"], "100000")
    jpeg = a_demo_jpeg(demo_data)
    noise = io.BytesIO()  # a real image, only too big: it would decode fine
    Image.fromarray(torch.randint(0, 256, (400, 400, 3), dtype=torch.uint8).numpy()).save(noise, "JPEG", quality=95)
    assert len(noise.getvalue()) > 100_000
    png = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(png, "PNG")  # 144 M pixels in ~20 KB: over PIL's 89 M default
    assert len(png.getvalue()) < 100_000
    samples = [(f"{i:03d}", {"jpg": jpeg, "cls": b"1"}) for i in range(3)]
    samples += [("bomb-jpeg", {"jpg": _bomb_jpeg(jpeg, 60_000), "cls": b"1"}),
                ("bomb-png", {"png": png.getvalue(), "cls": b"1"}),
                ("huge", {"jpg": noise.getvalue(), "cls": b"1"})]
    shard = write_shard(tmp_path / "s.tar", samples)
    loader = make_eval_loader(str(shard), batch_size=8, img_size=32, num_workers=0)
    images = [img for img, _ in loader]
    assert sum(len(b) for b in images) == 3 and loader.skipped == 3


def test_bombs_and_corrupt_jpegs_are_skipped_and_counted_on_the_device_path(demo_data):
    from mae_ray.data.decode import decode_raw as _decode_raw
    from mae_ray.data.shards import RawSample

    jpeg = a_demo_jpeg(demo_data)
    with pytest.raises(ValueError, match="over data.max_image_pixels"):  # before the device sees it
        _decode_raw(RawSample("b", 0, {"jpg": _bomb_jpeg(jpeg, 60_000), "cls": b"1"}), raw=True)
    as_tensor = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in
                 (jpeg, b"\xff\xd8\xff\xe0" + bytes(200), jpeg)]  # a JPEG signature, nothing decodable after it
    skips = [0]
    batch = pretrain_batch(as_tensor, torch.device("cpu"), 32, skips)
    assert batch.shape == (2, 3, 32, 32) and skips == [1]


@pytest.mark.parametrize("manifest, message", [
    ({"shards": {"train-000000.tar": -5}, "num_classes": 10}, "lists -5 samples for train-000000.tar"),
    ({"shards": {"train-000000.tar": 10**12}, "num_classes": 10}, "lists 1000000000000 samples"),
    ({"shards": {"train-000000.tar": 250}, "num_classes": 10**9}, "says num_classes 1000000000: not a class count"),
])
@pytest.mark.usefixtures("no_ray")
def test_an_absurd_dataset_json_is_one_clear_error(demo_data, tmp_path, capsys, manifest, message):
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "train-000000.tar").write_bytes((Path(demo_data["train_dir"]) / "train-000000.tar").read_bytes())
    (folder / "dataset.json").write_text(json.dumps(manifest))
    line = refused(capsys, pretrain, as_args(overrides(demo_data, tmp_path, f"data.train_shards={folder}",
                                                        "data.samples_per_epoch=null")))
    assert line.startswith(f"error: {folder}/dataset.json ") and message in line, line


def test_an_encoder_fetched_from_mlflow_leaves_no_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    from mlflow import MlflowClient

    from mae_ray.config import load_config
    from mae_ray.jobs.encoders import resolve_encoder
    from mae_ray.model.mae import build_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("enc", artifact_location=str(tmp_path / "art")))
    folder = tmp_path / "encoder"
    folder.mkdir()
    torch.save(build_model("mae_vit_micro_patch4", img_size=32).state_dict(), folder / "encoder.pth")
    client.log_artifact(run.info.run_id, str(folder / "encoder.pth"), "encoder")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = load_config(None, ["model.name=mae_vit_micro_patch4", "model.img_size=32"])
    found = resolve_encoder(f"runs:/{run.info.run_id}", cfg, uri)
    assert found.state and list(scratch.iterdir()) == []


@pytest.mark.usefixtures("no_ray")
@pytest.mark.parametrize("resume", [False, True])
def test_a_sweep_or_its_resume_beside_a_live_one_is_refused_before_anything_is_reaped(demo_data, tmp_path, resume):
    """The second sweep (or ``--resume``) would otherwise reach ``ray_processes.stop_stale``, which stops the Ray
    processes a live sweep started."""
    import yaml

    from mae_ray.jobs import sweep as sweeps
    from mae_ray.jobs.sweep_config import load_sweep

    (tmp_path / "base.yaml").write_text(yaml.safe_dump({
        "model": {"name": "mae_vit_micro_patch4", "img_size": 32},
        "data": {"train_shards": demo_data["train"], "val_shards": demo_data["val"], "num_classes": 10,
                 "samples_per_epoch": 64},
        "train": {"epochs": 1, "batch_size": 16}, "linprobe": {"batch_size": 16}, "finetune": {"batch_size": 16},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "name": "s", "output_dir": str(tmp_path / "sweeps"),
        "search": {"model.mask_ratio": {"grid": [0.75]}}, "scheduler": {"type": "none"}, "finetune": False,
        "random_baseline": False}))
    folder = tmp_path / "sweeps" / "s"
    if resume:  # a live sweep's record
        files.write_json(str(folder / "sweep.json"), {"parent_run_id": "0" * 32, "uri": "sqlite:///x"})
    holder = subprocess.Popen([sys.executable, "-c", "import time; from mae_ray.jobs import files\n"
                               f"with files.claim({str(folder)!r}, 'sweep s'):\n"
                               "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        spec, base = load_sweep(str(tmp_path / "sweep.yaml"), [])
        with pytest.raises(UserError, match=rf"{folder} is in use by pid {holder.pid} \(sweep s, since "):
            sweeps.run(spec, base, str(tmp_path / "sweep.yaml"), resume=resume)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
