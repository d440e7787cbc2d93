"""Pre-training across two Ray nodes (both on this machine, 1 CPU each): the two workers cannot share a
node, so DDP really runs between nodes, each reading the shards from its own node's filesystem. Last, an
elastic group (``ray.min_workers``) whose second node is reclaimed with notice mid-run: it checkpoints on the
notice, goes on with the worker left once the node has gone, grows back when a node is added, and shrinks again
when that node is lost without notice, repeating at most a checkpoint interval: one MLflow run throughout, with
the fixed group's recipe (the same updates, the same lr at each of them, the same effective batch)."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
from _helpers import S3Server, local_cluster
from mlflow import MlflowClient

from mae_ray.cluster.checkpoints import age, load_state
from mae_ray.config import load_config
from mae_ray.jobs import pretrain

pytestmark = pytest.mark.ray






@pytest.fixture(scope="module")
def s3():
    """The module's S3 server, started before the cluster so that both nodes' processes have its endpoint and
    (dummy) credentials in their environment, as real nodes would have theirs."""
    with S3Server() as server:
        yield server


@pytest.fixture(scope="module")
def two_nodes(s3):
    """A head and a second node with 1 CPU each; the driver (this process) connected to the head. A group
    whose node went away is started again in 15 s, not Ray's 60 (the size Ray first picks may still count the
    node just lost: an elastic run then tries again at the size that fits)."""
    with local_cluster(1, 1, env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15",
                                  "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"}) as cluster:
        yield cluster


EPOCHS = 6


def config(demo, tmp: Path, *extra):
    """2 workers on the two nodes; 4 micro-batches of 32 per update: accumulation 2 on two workers, 4 on one
    (an elastic group of one); epochs of ~4 s on two workers, long enough for a node to go and come back in
    the middle of a run."""
    return load_config(None, [
        "model.name=mae_vit_micro_patch4", "model.img_size=32",
        f"data.train_shards={demo['train']}", f"data.val_shards={demo['val']}",
        "data.num_workers=0", "data.samples_per_epoch=4096", "data.shuffle_buffer=100",
        "train.batch_size=32", "train.effective_batch=128", f"train.epochs={EPOCHS}", "train.lr=2e-3",
        "train.warmup_epochs=1", "train.checkpoint_every=1", "train.visualize_every=0",
        "ray.num_workers=2", "ray.cpus_per_worker=1",
        f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db", "mlflow.experiment=multinode", f"output_dir={tmp}/run",
        *extra,
    ])


def history(tmp: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def fixed_run(two_nodes, demo_data, tmp_path_factory):
    """A fixed group of 2 workers, one per node: the first test's subject, the elastic test's reference."""
    tmp = tmp_path_factory.mktemp("fixed")
    return tmp, pretrain.run(config(demo_data, tmp, "mlflow.system_metrics_interval_s=1"))


def test_two_workers_on_two_nodes_train_and_checkpoint(two_nodes, fixed_run):
    import ray

    nodes = [n for n in ray.nodes() if n["Alive"]]
    assert len(nodes) == 2 and all(n["Resources"]["CPU"] == 1 for n in nodes)
    tmp_path, summary = fixed_run
    assert ray.is_initialized()  # run() joined the cluster it found and left it up

    # the job finished and checkpointed
    assert json.loads((tmp_path / "run" / "result.json").read_text()) == summary
    ckpt = Path(summary["checkpoint"])
    assert ckpt.name == f"epoch_{EPOCHS - 1:06d}"
    # the newest two kept (checkpoints.KEEP), pruned by the workers' upload as in-process runs prune
    assert sorted(p.name for p in ckpt.parent.glob("epoch_*")) == [f"epoch_{e:06d}" for e in (EPOCHS - 2, EPOCHS - 1)]
    assert {"state.pt", "encoder.pth", "encoder.safetensors", "config.yaml"} <= {p.name for p in ckpt.iterdir()}
    assert summary["metrics"]["epoch"] == EPOCHS - 1 and math.isfinite(summary["metrics"]["train_loss"])

    # both workers read data: the metrics are reduced over the two ranks (DDP would hang if one rank
    # ran out of batches), none of the samples either rank read was skipped, the loss stays finite
    run = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["ray.num_workers"] == "2"
    for key in ("train_loss", "data/skipped", "images_per_s"):
        values = history(tmp_path, run.info.run_id, key)
        assert [s for s, _ in values] == list(range(EPOCHS)), key
        assert all(math.isfinite(v) for _, v in values), key
        if key == "data/skipped":
            assert all(v == 0 for _, v in values)
    # the group and the accumulation it ran with, every epoch: 2 workers x 32 x 2 = the effective batch 128
    assert [v for _, v in history(tmp_path, run.info.run_id, "workers")] == [2] * EPOCHS
    assert [v for _, v in history(tmp_path, run.info.run_id, "accumulation")] == [2] * EPOCHS

    # each node's system metrics in the run, named by its host and Ray node id: both nodes' series (issue 30)
    series = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
    assert {name.rsplit("-", 1)[1] for name in series} == {n["NodeID"][:8] for n in nodes}, sorted(run.data.metrics)
    for name in series:
        for what in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage",
                     "network_receive_megabytes"):
            assert len(history(tmp_path, run.info.run_id, f"system/{name}/{what}")) >= 2, (name, what)

    # ...on two different nodes: Ray's actor table (GCS; kept for dead actors) says where each
    # Train worker ran. (ray.util.state.list_actors would say the same but needs a dashboard.)
    from ray._private import state

    workers = [a for a in state.actors().values() if a["ActorClassName"] == "RayTrainWorker"]
    assert len(workers) == 2, [a["ActorClassName"] for a in state.actors().values()]
    assert {a["Address"]["NodeID"] for a in workers} == {n["NodeID"] for n in nodes}


def test_two_nodes_share_nothing_but_the_bucket_and_a_killed_worker_resumes_from_it(
        s3, two_nodes, demo_data, tmp_path, monkeypatch):
    from mae_ray.cluster.checkpoints import checkpoint_folders, load_state

    train, val = (s3.upload(Path(demo_data[split]).parent, f"multinode/{split}") for split in ("train", "val"))
    runs = f"s3://{s3.bucket}/multinode/runs"
    monkeypatch.setenv("MAE_RAY_FAULTS", "kill:rank=1:mid_epoch=1")  # SIGKILL rank 1 half-way through epoch 1
    cfg = load_config(None, [
        "model.name=mae_vit_micro_patch4", "model.img_size=32", f"data.train_shards={train}/",
        f"data.val_shards={val}/", "data.num_workers=0", "data.samples_per_epoch=128", "data.shuffle_buffer=100",
        "train.batch_size=32", "train.epochs=2", "train.lr=2e-3", "train.warmup_epochs=1",
        "train.checkpoint_every=1", "train.visualize_every=0", "ray.num_workers=2", "ray.cpus_per_worker=1",
        f"ray.storage_path={runs}", "ray.failure_max_retries=1", f"storage.endpoint_url={s3.endpoint}",
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment=multinode-s3",
        f"output_dir={tmp_path}/run",
    ])
    summary = pretrain.run(cfg)
    assert (tmp_path / "run" / ".fault-kill-mid_epoch-1-1").exists()  # the kill really happened
    assert summary["checkpoint"] == f"{runs}/run/epoch_000001"
    assert checkpoint_folders(f"{runs}/run") == [f"{runs}/run/epoch_000000", f"{runs}/run/epoch_000001"]
    attempts = load_state(summary["checkpoint"])["attempts"]
    assert attempts == [{"start_epoch": 0, "start_update": 0, "resumed_from": "", "workers": 2},
                        # the restarted group read epoch 0
                        {"start_epoch": 1, "start_update": 0, "resumed_from": f"{runs}/run/epoch_000000",
                         "workers": 2}], attempts
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(summary["mlflow_run_id"], "train_loss")
    assert sorted(m.step for m in history) == [0, 1]  # nothing lost, nothing twice
    local = [p for p in tmp_path.rglob("*") if p.suffix in (".tar", ".pt", ".pth", ".safetensors")]
    assert not local, f"written to local disk: {local}"  # checkpoints (and the shards read): the bucket only


def _wait(what: str, done, timeout_s: float = 240.0) -> None:
    end = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > end:
            raise TimeoutError(f"waited {timeout_s:.0f} s for {what}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------- elastic groups (ray.min_workers)
# Why the loss is not the fixed group's bit for bit after a resize: each rank draws its own data stream (seeded
# by rank), so a group of another size trains on other samples from the resize on. The updates, their lr and
# their effective batch are the same; the final loss of these runs differed by 0.1 % (0.6029 vs 0.6034).
LOSS_TOLERANCE = 0.03
NOTICE_S = 6  # the reclaim notice's deadline (clouds give 30 s to 2 min); Ray's watcher polls every second here


def drain(node, seconds: int) -> None:
    """What a cloud's reclaim notice makes a Ray autoscaler do (and ``ray drain-node`` does): the node is drained
    with reason PREEMPTION and a deadline; nothing is stopped by it (the test removes the node afterwards)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    deadline_ms = time.time_ns() // 1_000_000 + seconds * 1000
    accepted, why = ray._raylet.GcsClient(address=ray.get_runtime_context().gcs_address).drain_node(
        node.node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim (test)",
        deadline_ms)
    assert accepted, why


def inside(store: Path, why: str) -> list[tuple[int, int]]:
    """(epoch, update) of the run's checkpoints taken inside an epoch for a reason starting with ``why``."""
    found = []
    for folder in store.glob("epoch_*_u*"):
        try:
            at = load_state(str(folder))["in_epoch"]
        except Exception:  # noqa: BLE001 - being written or pruned right now
            continue
        if at["why"].startswith(why):
            found.append((at["epoch"], at["updates"]))
    return found


def newest(store: Path) -> tuple[tuple[int, int], float, list[dict]] | None:
    """The newest whole checkpoint taken inside an epoch: its (epoch, update), its age in seconds, the attempts
    it records; None before there is one."""
    for folder in sorted(store.glob("epoch_*_u*"), key=lambda p: age(str(p)), reverse=True):
        try:
            state, written = load_state(str(folder)), (folder / "state.pt").stat().st_mtime
        except Exception:  # noqa: BLE001 - being pruned right now
            continue
        return (state["in_epoch"]["epoch"], state["in_epoch"]["updates"]), time.time() - written, state["attempts"]
    return None


EVERY_MIN = 0.05  # the elastic run's checkpoints: every 3 s, inside epochs (train.checkpoint_every=100: no others)


def test_a_reclaimed_node_shrinks_an_elastic_group_after_a_checkpoint_on_notice_and_a_new_one_grows_it_back(
        two_nodes, fixed_run, demo_data, tmp_path, monkeypatch):
    """Last in this module: it changes the cluster. A reclaim with notice (the second node drained with a
    deadline, then gone), a new node, then that node lost without notice: the group goes 2 -> 1 -> 2 -> 1
    workers, each time resuming inside an epoch (its checkpoints are taken every few seconds there). Rank 0
    waits at the end of epochs 4 and 5 until this test has changed the cluster (``pause`` faults): a slow
    machine's restarts do not outlast the run."""
    cluster = two_nodes
    fixed_tmp, fixed = fixed_run

    tmp = tmp_path / "elastic"
    store = tmp / "run" / "ray" / "run"
    result: dict = {}
    monkeypatch.setenv("MAE_RAY_FAULTS", "pause:rank=0:end_epoch=4,pause:rank=0:end_epoch=5")
    paused = {epoch: tmp / "run" / f".fault-pause-end_epoch-{epoch}-0" for epoch in (4, 5)}

    def run():  # the job in a thread: this (main) thread plays the cluster, which only it may change
        try:
            result["summary"] = pretrain.run(config(demo_data, tmp, "ray.min_workers=1", "ray.resize_check_s=1",
                                                    "ray.failure_max_retries=2", "train.checkpoint_every=100",
                                                    f"train.checkpoint_every_minutes={EVERY_MIN}"))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result["error"] = e

    def attempts_on(*workers):  # the newest checkpoint's attempts ran on these group sizes, in this order
        found = newest(store)
        return found is not None and [a["workers"] for a in found[2]] == list(workers)

    job = threading.Thread(target=run, daemon=True)
    job.start()
    # (a) what a spot reclaim with notice does: the second node drained with a deadline, gone at the deadline
    # (its processes stopped; its raylet signs off as a reclaimed VM's does when it shuts down)
    _wait("a first checkpoint", lambda: newest(store))
    node = next(iter(cluster.worker_nodes))
    drain(node, NOTICE_S)
    noticed = time.monotonic()
    _wait("a checkpoint on the notice", lambda: inside(store, "preemption notice"), timeout_s=NOTICE_S)
    (jit,) = inside(store, "preemption notice")
    time.sleep(max(0.0, NOTICE_S - (time.monotonic() - noticed)))
    cluster.remove_node(node)
    _wait("a checkpoint on one worker", lambda: attempts_on(2, 1))
    # a new node: the group grows back (rank 0 of the group of one waits at the end of epoch 4 meanwhile)
    cluster.add_node(num_cpus=1)
    _wait("a checkpoint on two workers again", lambda: attempts_on(2, 1, 2))
    Path(f"{paused[4]}.go").touch()
    # (b) that node lost without notice, while rank 0 waits at the end of epoch 5: what the run repeats is what
    # it did since its newest checkpoint
    _wait("the group of two at the end of epoch 5", paused[5].exists)
    point, age_s, _ = newest(store)
    cluster.remove_node(next(iter(cluster.worker_nodes)))
    Path(f"{paused[5]}.go").touch()
    job.join(timeout=600)
    assert "error" not in result, result
    elastic = result["summary"]

    run_id = elastic["mlflow_run_id"]
    workers = [v for _, v in history(tmp, run_id, "workers")]
    # 2 then 1 then 2 then 1 (the attempts below); epoch 0 may already end on one worker (the notice comes early)
    assert set(workers) == {1, 2} and workers[-1] == 1, workers
    accumulation = dict(zip(workers, (v for _, v in history(tmp, run_id, "accumulation")), strict=False))
    assert accumulation == {2: 2, 1: 4}  # recomputed from the effective batch at each size
    # every epoch logged once, with the fixed group's lr: the same updates with the same schedule
    assert [s for s, _ in history(tmp, run_id, "train_loss")] == list(range(EPOCHS))
    assert history(tmp, run_id, "lr") == history(fixed_tmp, fixed["mlflow_run_id"], "lr")
    final, reference = load_state(elastic["checkpoint"]), load_state(fixed["checkpoint"])
    assert final["step"] == reference["step"] and final["scheduler"] == reference["scheduler"]
    attempts = final["attempts"]
    assert [a["workers"] for a in attempts] == [2, 1, 2, 1], attempts
    assert all(a["start_update"] > 0 and "_u" in a["resumed_from"] for a in attempts[1:]), attempts  # inside epochs
    # (a) the group that went on after the reclaim started at the checkpoint on the notice or later: no update
    # done before the notice was trained again
    assert (attempts[1]["start_epoch"], attempts[1]["start_update"]) >= jit, (attempts, jit)
    # (b) after the loss without notice it resumed from the newest checkpoint there was (or one finished as the
    # node went), which was at most EVERY_MIN old: the updates it repeated are at most that long's
    assert (attempts[3]["start_epoch"], attempts[3]["start_update"]) >= point, (attempts, point)
    assert age_s <= EVERY_MIN * 60 + 6, age_s  # + one update, the checkpoint's own write, this test's polling
    # ...and counted in updates: rank 0 had done every update of the last epoch when the node went (it waited at
    # the epoch's end), the group after it resumed at its checkpoint's update; what lies between was trained
    # again: at most the updates of one checkpoint interval at the fastest rate of the group of two (+ 2)
    per_epoch = 4096 // 128
    repeated = EPOCHS * per_epoch - (attempts[3]["start_epoch"] * per_epoch + attempts[3]["start_update"])
    sizes, times = dict(history(tmp, run_id, "workers")), dict(history(tmp, run_id, "epoch_time_s"))
    fastest = max(per_epoch / t for epoch, t in times.items() if sizes.get(epoch) == 2)
    assert 0 <= repeated <= fastest * EVERY_MIN * 60 + 2, (repeated, fastest, attempts[3])
    tag = MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_run(run_id).data.tags["mae_ray.attempts"]
    assert "resized 2 -> 1 worker(s)" in tag and "resized 1 -> 2 worker(s)" in tag, tag
    loss, ref_loss = elastic["metrics"]["train_loss"], fixed["metrics"]["train_loss"]
    assert math.isfinite(loss) and abs(loss - ref_loss) <= LOSS_TOLERANCE * ref_loss, (loss, ref_loss)


def test_a_sweep_trial_starts_on_the_nodes_there_are_grows_and_shrinks_like_a_job(two_nodes, demo_data, tmp_path,
                                                                                   monkeypatch):
    """Issue 29 item 6, last in this module: a sweep submitted while the cluster has room for two workers of its
    trial's three (a spot cluster still scaling up). The trial starts with two, grows to three when a node
    arrives, and shrinks back to two when a node that holds a worker is lost without notice: the trial finishes
    (not failed, not restarted), in one MLflow run, with the recipe's updates. Three micro-batches per update
    (``effective_batch`` 96 = 3 x 32) do not divide over two ranks: they take two and one, the loss weighted
    per micro-batch (``engine.StepPlan``). The trial's function and Ray Train's controller ran on the head, the
    node a spot cluster keeps. Rank 0 waits at the end of epoch 1 (a ``pause`` fault) until the group has grown:
    a fast run would otherwise end before the new node is seen."""
    import ray
    import yaml
    from ray._private import state
    from ray.tune.execution import class_cache

    from mae_ray.jobs import sweep as sweeps
    from mae_ray.jobs.sweep_config import load_sweep

    cluster = two_nodes
    for node in list(cluster.worker_nodes):
        cluster.remove_node(node)
    first = cluster.add_node(num_cpus=1)  # the head and one node: room for two workers of three
    _wait("the cluster of two nodes", lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 60)
    epochs = 3
    base = config(demo_data, tmp_path, "ray.num_workers=3", "ray.min_workers=1", "ray.resize_check_s=1",
                  "ray.failure_max_retries=2",
                  "train.effective_batch=96", "train.checkpoint_every=100",
                  f"train.checkpoint_every_minutes={EVERY_MIN}", f"train.epochs={epochs}").to_dict()
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "base": "base.yaml", "name": "spot", "search": {"train.seed": {"grid": [0]}},
        "output_dir": str(tmp_path / "sweeps"), "linprobe": False, "finetune": False, "random_baseline": False,
        "scheduler": {"type": "none"}, "max_concurrent_trials": 1}))
    # the fault reaches the trial's process as Tune passes it Ray Train's settings (the trial, not this process,
    # starts the Train run that reads it)
    monkeypatch.setenv("MAE_RAY_FAULTS", "pause:rank=0:end_epoch=1")
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", {*class_cache.ENV_VARS_TO_PROPAGATE, "MAE_RAY_FAULTS"})
    trials = tmp_path / "sweeps" / "spot" / "trials"
    result: dict = {}

    def run():
        try:
            sweep, sweep_base = load_sweep(str(tmp_path / "sweep.yaml"), [])
            result["report"] = sweeps.run(sweep, sweep_base, str(tmp_path / "sweep.yaml"))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result["error"] = e

    def sizes():  # the group sizes the trial's newest checkpoint records, in order
        stores = list(trials.glob("*/ray/*"))
        found = newest(stores[0]) if stores else None
        return [a["workers"] for a in found[2]] if found else []

    job = threading.Thread(target=run, daemon=True)
    job.start()
    _wait("rank 0 at the end of epoch 1", lambda: any(trials.glob("*/.fault-pause-end_epoch-1-0")) or "error" in result)
    assert "error" not in result and sizes()[-1:] == [2], (result, sizes())
    cluster.add_node(num_cpus=1)
    _wait("a checkpoint on three workers", lambda: sizes()[-1:] == [3] or "error" in result)
    cluster.remove_node(first)  # it holds a worker (the head holds one, the new node the third)
    for marker in trials.glob("*/.fault-pause-end_epoch-1-0"):  # (the grown group went past it: it fires once)
        Path(f"{marker}.go").touch()
    job.join(timeout=600)
    assert "error" not in result, result

    (row,) = result["report"]["rows"]
    assert row["status"] == "finished", row
    summary = json.loads(next(trials.glob("*/result.json")).read_text())
    final = load_state(summary["checkpoint"])
    workers = [a["workers"] for a in final["attempts"]]
    assert workers[-2:] == [3, 2] and workers[:-2] in ([2], [1, 2]), final["attempts"]
    assert all("_u" in a["resumed_from"] for a in final["attempts"][-2:]), final["attempts"]  # inside epochs
    assert final["step"] == epochs * (4096 // 96)  # the recipe's updates, whatever the group did
    run_id = row["mlflow_run_id"]
    assert [s for s, _ in history(tmp_path, run_id, "train_loss")] == list(range(epochs))  # each epoch once
    assert all(math.isfinite(v) for _, v in history(tmp_path, run_id, "train_loss"))
    logged = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert logged.info.status == "FINISHED"
    resizes = logged.data.tags["mae_ray.attempts"]
    assert "resized 2 -> 3 worker(s)" in resizes and "resized 3 -> 2 worker(s)" in resizes, resizes
    # where the trial's lifecycle ran: its function (Tune's actor) and Ray Train's controller, on the head
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    lifecycle = [a for a in state.actors().values() if a["ActorClassName"] in ("ImplicitFunc", "TrainController")]
    assert {a["ActorClassName"] for a in lifecycle} == {"ImplicitFunc", "TrainController"}, lifecycle
    assert {a["Address"]["NodeID"] for a in lifecycle} == {head}
