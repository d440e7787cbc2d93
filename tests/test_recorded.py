"""A shared store's records are data, never instructions (issue 27): a run planted beside a real one, whose
params and ``config.yaml`` name a ``pipe:`` shard command and another tracking server, makes neither
``evaluate --run`` nor ``reproduce --start`` run the command or talk to that server. In-process, a real
sqlite MLflow store, a real HTTP server standing in for the foreign host; Ray never starts (a tripwire).
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient
from test_bad_input import RayStarted, no_ray  # noqa: F401 - the tripwire fixture

from mae_ray import cli
from mae_ray.config import Config, load_config
from mae_ray.jobs import recorded, reproduce
from mae_ray.model.mae import build_model
from mae_ray.model.weights import save_encoder

MICRO = "mae_vit_micro_patch4"


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def _any(self):
        _Counting.hits.append(self.path)
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = do_PUT = _any

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def foreign(monkeypatch):
    """A host the record names: it counts every request it gets. MLflow asks it once, without its minutes of
    retries, so that a broken filter fails this test at once instead of stalling it."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    _Counting.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Counting.hits
    server.shutdown()
    server.server_close()


def planted_config(tmp: Path, demo: dict, foreign_uri: str) -> Config:
    """The real run's config with what a colleague could change in the store: shards that run a command first."""
    return load_config(None, [
        f"model.name={MICRO}", "model.img_size=32", "ray.num_workers=1", "ray.cpus_per_worker=1",
        "linprobe.epochs=1", "finetune.epochs=1", "linprobe.batch_size=32", "finetune.batch_size=32",
        "data.samples_per_epoch=64",
        f"data.train_shards=pipe:touch {tmp}/ran; cat {demo['train'].split('{')[0]}000000.tar",
        f"data.val_shards=pipe:touch {tmp}/ran; cat {demo['val'].split('{')[0]}000000.tar",
        f"mlflow.tracking_uri={foreign_uri}", "ray.address=127.0.0.1:1", f"output_dir={tmp}/planted-out",
        f"ray.storage_path={tmp}/planted-ckpt", f"storage.endpoint_url={foreign_uri}"])


def plant_run(tmp: Path, demo: dict, foreign_uri: str) -> tuple[str, str]:
    """A run in a real store whose params and encoder artifacts (config.yaml, encoder.pth) are the planted ones."""
    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = planted_config(tmp, demo, foreign_uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("shared")).info.run_id
    for key, value in cfg.flatten().items():
        client.log_param(run_id, key, str(value))
    art = tmp / "art"
    art.mkdir()
    torch.manual_seed(0)
    save_encoder(build_model(MICRO), art / "encoder.pth")
    (art / "config.yaml").write_text(cfg.to_yaml())
    client.log_artifacts(run_id, str(art), "encoder")
    client.set_terminated(run_id)
    return uri, run_id


def test_a_record_decides_no_address_folder_or_program(tmp_path):
    cfg = load_config(None, ['data.train_shards="pipe:curl -H Authorization:t0k3n http://x/a.tar"',
                             "data.val_shards=s3://bucket/val/", "mlflow.tracking_uri=http://u:pw@elsewhere:5000",
                             "ray.address=10.1.2.3:6379", "output_dir=/root/.ssh", "model.mask_ratio=0.6"])
    kept, dropped = recorded.from_record(cfg, set())
    defaults = Config()
    assert kept.data.train_shards == defaults.data.train_shards and kept.output_dir == defaults.output_dir
    assert (kept.mlflow.tracking_uri, kept.ray.address) == (defaults.mlflow.tracking_uri, defaults.ray.address)
    assert kept.data.val_shards == "s3://bucket/val/" and kept.model.mask_ratio == 0.6  # data and recipe stay
    assert [line.split(" = ")[0] for line in dropped] == [
        "not taken from the record: data.train_shards", "not taken from the record: ray.address",
        "not taken from the record: mlflow.tracking_uri", "not taken from the record: output_dir"]
    assert not any("pw@" in line for line in dropped)
    for spec, safe in (("gs://b/t.tar", False), ("https://h/t.tar", False), ("pipe:cat a", False),
                       ("/data/t-{0..9}.tar", True), ("s3://b/t.tar", True), ("", True)):
        assert recorded.safe_shards(spec) is safe, spec
    again = load_config(None, ["ray.address=10.1.2.3:6379"])
    assert recorded.from_record(again, {"ray.address"})[1] == []  # set again by the user: theirs
    assert recorded.from_record(again, set(), trust=True)[0].ray.address == "10.1.2.3:6379"


def test_evaluate_run_takes_no_command_and_no_host_from_the_record(demo_data, tmp_path, foreign, capsys,
                                                                   monkeypatch, no_ray):  # noqa: F811
    foreign_uri, hits = foreign
    uri, run_id = plant_run(tmp_path, demo_data, foreign_uri)
    monkeypatch.chdir(tmp_path)  # the default output folder of a dropped output_dir lands here
    assert cli.main(["evaluate", "--run", run_id, "--set", f"mlflow.tracking_uri={uri}"]) == 2
    out, err = capsys.readouterr()
    assert "error: data.train_shards is empty" in err  # the record's command was not taken, so no shards
    for key in ("data.train_shards", "data.val_shards", "ray.address", "output_dir", "ray.storage_path",
                "storage.endpoint_url"):
        assert f"[evaluate] not taken from the record: {key} = " in out, key
    with pytest.raises(RayStarted):  # with the user's own shards every check passes
        cli.main(["evaluate", "--run", run_id, "--set", f"mlflow.tracking_uri={uri}",
                  "--set", f"data.train_shards={demo_data['train']}", "--set", f"data.val_shards={demo_data['val']}"])
    assert not (tmp_path / "ran").exists() and hits == []  # nothing ran, nothing reached the foreign host


@pytest.mark.timeout(180)  # a broken filter would start the record's job, which waits on its Ray address forever
def test_reproduce_start_runs_nothing_the_record_chose(demo_data, tmp_path, foreign, capsys):
    foreign_uri, hits = foreign
    uri, run_id = plant_run(tmp_path, demo_data, foreign_uri)
    out_file = tmp_path / "again.yaml"
    reproduce.run(run_id, uri, str(out_file), start=True)
    written = yaml.safe_load(out_file.read_text())
    assert written["data"]["train_shards"] == "" and written["ray"]["address"] is None
    assert written["mlflow"]["tracking_uri"] == uri  # the store the run was read from, not the one it names
    printed = capsys.readouterr().out
    assert "[reproduce] not taken from the record: data.train_shards = pipe:touch" in printed
    assert f"[reproduce] starting mae-ray pretrain --config {out_file} with:\nmodel:" in printed
    assert not (tmp_path / "ran").exists() and hits == []
