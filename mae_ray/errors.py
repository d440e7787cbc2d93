"""User mistakes (bad config, paths, data, checkpoints): the CLIs print these as one line and exit 2.

Every other exception is a bug in mae-ray and keeps its traceback.
"""

from __future__ import annotations

from mae_ray.redaction import redact


class UserError(Exception):
    """Something the user can fix; its message is the whole report, redacted when made: it names shards,
    buckets and servers, and is printed, logged, and carried through Ray from the worker that raised it."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(redact(a) for a in args))


class ConfigError(UserError, ValueError):
    """A config file or ``--set`` override that cannot be used."""


class CheckpointError(UserError, ValueError):
    """A weights file that cannot be used for the model at hand."""


class DataError(UserError, ValueError):
    """Shards or images that cannot be read as asked."""
