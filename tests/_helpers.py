"""Small helpers shared by the integration tests (ports, finding our own processes)."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path


class PortReservation:
    """A port on 127.0.0.1 held for a server this test starts, not merely found free and hoped for.

    The socket stays bound (never listening) with SO_REUSEADDR and SO_REUSEPORT until ``release``:
    the kernel hands the port to no other ``bind(0)`` or connection meanwhile, while the server we
    start, which binds with SO_REUSEADDR (uvicorn, aiohttp, http.server) or SO_REUSEPORT (gRPC), can
    still take it. Hold it until the server listens (or for the server's whole life).
    """

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]

    def release(self) -> None:
        self._sock.close()


def reserve_ports(n: int) -> list[PortReservation]:
    return [PortReservation() for _ in range(n)]


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

    def __init__(self, root: Path, artifacts: str | None = None):
        self.root, self.reservation = Path(root), PortReservation()
        self.artifacts = artifacts or str(self.root / "art")  # a folder, or s3://... (proxied: clients need no S3)
        self.port = self.reservation.port  # the same port across stop/start, held while this object lives
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> str:  # ~10 s on a quiet machine, 67 s seen under load 25
        self.proc = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(self.port), "--backend-store-uri", f"sqlite:///{self.root}/server.db",
             "--artifacts-destination", self.artifacts, "--workers", "1"],
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


@contextlib.contextmanager
def local_cluster(*node_cpus: int, env: dict[str, str] | None = None):
    """A ``ray.cluster_utils.Cluster`` of one node per entry (the first the head, with its CPUs), this
    process connected to its head; every process of it gone afterwards (asserted). ``env``: set in the
    environment of its processes (Ray Train's controller reads its settings from there)."""
    import shutil
    import tempfile

    import pytest
    import ray
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "Ray was already running in this process"
    # Cluster writes its address to <default temp dir>/ray/ray_current_cluster and deletes that file on
    # shutdown; with the default (/tmp/ray) it would overwrite, then remove, the file of any other head
    # on this machine. RAY_TMPDIR gives the cluster, its sessions and that file a directory of its own.
    temp_root = tempfile.mkdtemp(prefix="rm_", dir="/tmp")  # short: Ray's unix socket paths live under it
    agent_port = PortReservation()  # held for the cluster's life: no other process can be handed it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", temp_root)
        for key, value in (env or {}).items():
            mp.setenv(key, value)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": node_cpus[0], "include_dashboard": False, "dashboard_agent_listen_port": agent_port.port,
        })
        try:
            for cpus in node_cpus[1:]:
                cluster.add_node(num_cpus=cpus)
            ray.init(address=cluster.address)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            agent_port.release()
    left = processes_mentioning(temp_root)
    for pid in left:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    shutil.rmtree(temp_root, ignore_errors=True)
    assert not left, f"processes of the test's cluster outlived cluster.shutdown(): {left}"


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


class AuthShardServer:
    """Serves the files under ``root`` over HTTP on 127.0.0.1 only to requests that carry the credentials:
    HTTP basic auth ``user:password`` (in the URL: ``http://user:password@host/...``) and one of the
    ``tokens`` (``(name, value)`` pairs) as a query parameter (``?token=...``, ``?X-Amz-Signature=...``),
    as signed shard URLs do.

    A thread of the test process; ``served`` / ``refused`` count the requests. Logs nothing (the
    request lines hold the tokens).
    """

    def __init__(self, root: Path, user: str, password: str, tokens: list[tuple[str, str]]):
        import base64
        import functools
        import http.server
        import threading
        from urllib.parse import parse_qs, urlsplit

        self.served = self.refused = 0
        expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def _allowed(self) -> bool:
                query = parse_qs(urlsplit(self.path).query)
                return self.headers.get("Authorization") == expected and any(
                    value in query.get(name, []) for name, value in tokens)

            def send_head(self):
                if not self._allowed():
                    outer.refused += 1
                    self.send_error(403)
                    return None
                outer.served += 1
                return super().send_head()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, user: str, password: str, query: str) -> str:
        return f"http://{user}:{password}@127.0.0.1:{self.port}/{path.lstrip('/')}?{query}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class S3Server:
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1 in this process, for as long as the
    ``with`` block lasts; its endpoint in ``$AWS_ENDPOINT_URL`` and dummy credentials in the environment
    (restored on leaving), and one empty bucket. Processes started meanwhile (loader workers, Ray's
    workers) reach it over HTTP like any S3 service."""

    ENV = {"AWS_ACCESS_KEY_ID": "mae-ray-test", "AWS_SECRET_ACCESS_KEY": "mae-ray-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}

    def __init__(self, bucket: str = "mae-ray-test", outages: bool = False) -> None:
        self.bucket, self._outages = bucket, outages

    def __enter__(self) -> S3Server:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        if self._outages:
            self._relay = _Relay(port)
            port = self._relay.port
        self.endpoint = f"http://{host}:{port}"
        self._saved = {k: os.environ.get(k) for k in [*self.ENV, "AWS_ENDPOINT_URL"]}
        os.environ.update(self.ENV)
        os.environ["AWS_ENDPOINT_URL"] = self.endpoint
        self.fs.create_dir(self.bucket)
        return self

    def __exit__(self, *exc) -> None:
        if self._outages:
            self._relay.cut()
        self._server.stop()
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    def stop_serving(self) -> None:
        """An outage: every open connection is cut and new ones are refused; the buckets keep their contents.
        Needs ``S3Server(outages=True)``: clients then talk to moto through a relay this can cut (moto's
        own ``stop`` leaves kept-alive connections served)."""
        self._relay.cut()

    def serve_again(self) -> None:
        self._relay.restore()

    @property
    def fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, allow_bucket_creation=True)

    def upload(self, folder: Path, prefix: str) -> str:
        """Every file of ``folder`` (not recursive) under ``s3://<bucket>/<prefix>/``; returns that URI."""
        for path in sorted(Path(folder).iterdir()):
            if path.is_file():
                with self.fs.open_output_stream(f"{self.bucket}/{prefix}/{path.name}") as f:
                    f.write(path.read_bytes())
        return f"s3://{self.bucket}/{prefix}"


class _Relay:
    """A TCP relay on 127.0.0.1 to a local port, which a test can cut (all connections closed, new ones
    refused) and restore on the same port."""

    def __init__(self, target_port: int) -> None:
        import threading

        self._target, self._lock, self._conns = target_port, threading.Lock(), set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._start()

    def _start(self) -> None:
        import threading

        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def _accept(self, listener) -> None:
        import threading

        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            upstream = socket.create_connection(("127.0.0.1", self._target))
            with self._lock:
                self._conns.update((client, upstream))
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with self._lock:
                    self._conns.discard(sock)
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def cut(self) -> None:
        try:  # wakes the accept() blocked in the relay's thread (close alone would not free the port)
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def restore(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._start()
