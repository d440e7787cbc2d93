"""MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory where ``pynvml`` sees a GPU)
for every node a job's workers run on, into the job's own run, each series named by its node:
``system/<node>/cpu_utilization_percentage``. One sampler per node (its first worker), started with the worker
loop and stopped after its last epoch; a restarted group goes on with the steps after the last one logged.
``mlflow.system_metrics: false`` turns it off, ``mlflow.system_metrics_interval_s`` sets how often it samples.
"""

from __future__ import annotations

import logging
import socket

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from mae_ray.cluster import launch
from mae_ray.cluster.worker_spec import WorkerSpec

log = logging.getLogger(__name__)


def node_name() -> str:
    """This node as its series are named: its host name and the start of its Ray node id (nodes of one host,
    as in a test cluster, stay apart); ``local`` in-process."""
    node = launch.node_id()
    return f"{socket.gethostname()}-{node[:8]}" if node else "local"


def start(spec: WorkerSpec) -> SystemMetricsMonitor | None:
    """A sampler for this node, if this worker is its first and the config asks for one; never an error that
    stops training (a warning instead)."""
    cfg = spec.config.mlflow
    if not cfg.system_metrics or not launch.first_on_node():
        return None
    if not spec.verbose:  # its start and stop lines at INFO, on every node's console
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        monitor = SystemMetricsMonitor(spec.run_id, sampling_interval=cfg.system_metrics_interval_s,
                                       resume_logging=True, node_id=node_name(), tracking_uri=spec.tracking_uri)
        monitor.start()
        return monitor
    except Exception as e:  # noqa: BLE001 - a record, never a reason to stop a run
        log.warning("system metrics of this node not logged: %s", e)
        return None


def stop(monitor: SystemMetricsMonitor | None) -> None:
    """Stop sampling and send what is left (what the last interval collected is not sent: MLflow's own rule)."""
    if monitor is not None:
        try:
            monitor.finish()
        except Exception as e:  # noqa: BLE001
            log.warning("system metrics: %s", e)
