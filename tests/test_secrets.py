"""No secret reaches MLflow: not from the environment, not from URLs in the config (real sqlite MLflow)."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from mae_ray import tracking
from mae_ray.config import load_config

SECRETS = ["s3cr3t-pass", "AKIAEXAMPLEKEY", "wJalrXUtnFEMI-secret", "sig-0123456789abcdef", "bearer-tok-42"]


@pytest.mark.parametrize("url, shown", [
    ("https://alice:s3cr3t-pass@mlflow.example.org", "https://***@mlflow.example.org"),
    ("https://h/train-{0..3}.tar?X-Amz-Credential=AKIAEXAMPLEKEY&X-Amz-Signature=sig-0123456789abcdef&n=1",
     "https://h/train-{0..3}.tar?X-Amz-Credential=***&X-Amz-Signature=***&n=1"),
    ("https://h/val.tar?token=bearer-tok-42", "https://h/val.tar?token=***"),
    ("pipe:curl -s https://u:s3cr3t-pass@h/x.tar", "pipe:curl -s https://***@h/x.tar"),
    ("/data/shards/train-{000000..000009}.tar", "/data/shards/train-{000000..000009}.tar"),
])
def test_urls_lose_their_credentials(url, shown):
    assert tracking.redact(url) == shown


def test_nothing_secret_in_params_tags_or_saved_config(tmp_path, monkeypatch):
    # credentials where users put them: the environment (the documented way) and, by mistake, URLs
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-pass")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLEKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI-secret")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "bearer-tok-42")
    cfg = load_config(None, [
        "data.train_shards=https://bob:s3cr3t-pass@h/train-{0..3}.tar",
        "data.val_shards=https://h/val.tar?X-Amz-Credential=AKIAEXAMPLEKEY&X-Amz-Signature=sig-0123456789abcdef",
        "ray.storage_path=s3://bucket/ckpt?token=bearer-tok-42",
    ])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = tracking.start_run(uri, "secrets", "r", tracking.params_from_config(cfg.flatten()), tracking.run_tags())
    run = MlflowClient(uri).get_run(run_id)
    stored = " ".join([*run.data.params.values(), *run.data.tags.values()])
    assert run.data.params["data.train_shards"] == "https://***@h/train-{0..3}.tar"  # still there, redacted
    saved = tracking.redact(cfg.to_yaml())  # what checkpoints and the encoder's config.yaml hold
    for secret in SECRETS:
        assert secret not in stored and secret not in saved, secret
