"""Small helpers shared by the integration tests (ports, finding our own processes)."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every process (but this one) whose command line contains ``text``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found[int(entry)] = cmdline.strip()
    return found


class MlflowServer:
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend, artifact folder), started and stopped by pid.

    ``stop`` and ``start`` again keep the port and the stores: the same server, back after an outage.
    """

    def __init__(self, root: Path):
        self.root, self.port = Path(root), free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> str:
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", str(self.root / "art"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self.uri
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        """Kill the server's process group (the server and its uvicorn worker) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


def tiny_config(demo, tmp_path, *extra):
    """A pre-training config that runs in seconds: micro ViT, 256 demo images an epoch, 2 workers, sqlite."""
    from mae_ray.config import load_config

    return load_config(None, [
        "model.name=mae_vit_micro_patch4", "model.img_size=32",
        f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
        "data.num_workers=1", "data.samples_per_epoch=256", "data.shuffle_buffer=200",
        "train.batch_size=32", "train.epochs=3", "train.lr=2e-3", "train.warmup_epochs=1",
        "train.checkpoint_every=1", "train.visualize_every=0",
        "ray.num_workers=2", "ray.cpus_per_worker=1",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment=test",
        f"output_dir={tmp_path}/run", *extra,
    ])


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A tar shard of ``(key, {extension: bytes})`` samples, members in the given order."""
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path
