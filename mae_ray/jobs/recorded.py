"""A config read back from a record - a run's MLflow params, its ``config.yaml`` artifact, a checkpoint's copy -
is data, never instructions (docs/operations.md, "Threat model").

Anyone who can write a run to a shared MLflow store or bucket chooses what such a record says. Taken as it
is, a record would choose what the colleague's machine runs (a ``pipe:`` shard spec is a shell command on
every Ray worker; ``gs://`` becomes one), which hosts it talks to with the colleague's credentials (the
MLflow tracking URI gets the user's token, the S3 endpoint their keys, ``ray.address`` their job), and where
it writes (``output_dir``, ``ray.storage_path``). Those keys are taken from the user: their command line
(``--set``), else the defaults. ``--trust-recorded`` takes the record whole.
"""

from __future__ import annotations

from typing import Any

from mae_ray import storage
from mae_ray.config import Config
from mae_ray.tracking import redact

# which hosts this machine talks to, with which credentials, and where it writes: never a record's to decide
ADDRESS_KEYS = ("mlflow.tracking_uri", "storage.endpoint_url", "ray.address", "ray.storage_path", "output_dir")
SHARD_KEYS = ("data.train_shards", "data.val_shards")


def safe_shards(shards: Any) -> bool:
    """A local path or an ``s3://`` URI: read as data, in this process. Everything else (``pipe:``, ``gs://``,
    ``http(s)://``, another scheme) starts a program or contacts a host the record names."""
    specs = [shards] if isinstance(shards, str) else list(shards or [])
    return all(not s or storage.is_object_uri(s) or ("://" not in s and not s.startswith("pipe:")) for s in specs)


def from_record(cfg: Config, user_keys: set[str], trust: bool = False) -> tuple[Config, list[str]]:
    """``cfg`` (read from a record) with what a record must not decide set back to the defaults, and one line per
    key so dropped. ``user_keys``: the keys the user sets again (``--set``), whose values win anyway."""
    if trust:
        return cfg, []
    defaults, dropped = Config().flatten(), []
    for key, value in cfg.flatten().items():
        if key in user_keys or value == defaults[key]:
            continue
        if key in ADDRESS_KEYS:
            why = "an address or a folder"
        elif key in SHARD_KEYS and not safe_shards(value):
            why = "a shard spec that runs a program or contacts a host"
        else:
            continue
        section, _, leaf = key.rpartition(".")
        setattr(getattr(cfg, section) if section else cfg, leaf, defaults[key])
        dropped.append(f"not taken from the record: {key} = {redact(str(value))} ({why}); set it with "
                       f"--set {key}=..., or pass --trust-recorded")
    return cfg, dropped


def user_keys(overrides: list[str]) -> set[str]:
    """The keys of ``--set key=value`` items."""
    return {item.partition("=")[0].strip() for item in overrides}
