"""The run configs and sweep files that ship inside the package, found by name.

``--config mae_vit_base_800ep`` and ``--config quickstart`` work from any folder, from a checkout or an
installed wheel alike; a path to a file (a user's own config) is taken as it is, and wins over a name.
"""

from __future__ import annotations

import os

from mae_ray.errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = {"configs": "run config", "sweeps": "sweep file"}


def names(kind: str) -> list[str]:
    """The shipped ``kind`` ("configs" or "sweeps"), by name."""
    return sorted(f[:-5] for f in os.listdir(os.path.join(HERE, kind)) if f.endswith(".yaml"))


def path(name: str, kind: str) -> str:
    """The file of the shipped ``kind`` called ``name`` (with or without ``.yaml``)."""
    return os.path.join(HERE, kind, f"{name.removesuffix('.yaml')}.yaml")


def resolve(given: str, kind: str) -> str:
    """``given`` if it is a file, else the shipped ``kind`` of that name; neither: one ``ConfigError`` line."""
    if os.path.isfile(given):
        return given
    if os.sep not in given and os.path.isfile(path(given, kind)):
        return path(given, kind)
    raise ConfigError(f"{KINDS[kind]} not found: {given} (no such file, and no shipped {KINDS[kind]} of that "
                      f"name: {', '.join(names(kind))})")
