"""How long training waits for one checkpoint written to an S3 server, with the copy in Ray Train's background
upload thread (``storage.upload_in_background: true``, the default) and without it, measured in the same run.

Pre-training on one Ray Train worker, the run's storage a bucket of a local S3-compatible server (moto's, as
in the tests, in this process; 127.0.0.1 only), a ViT-Small-wide MAE on 32-pixel images so that the checkpoint
is a few hundred MB (model + AdamW state: ~12 bytes per parameter) while a step stays cheap on a CPU. (moto's
server failed to complete the multipart upload of a 1.2 GB ViT-Base-wide checkpoint: it times out and the
client's retry finds the upload gone.) Each epoch ends with a checkpoint; the job
logs ``checkpoint_s`` per epoch, the time its training loop spent in the checkpoint (serialising it to local
disk, plus the copy when it is not in the background). The last epoch's checkpoint is always copied before the
run ends (its result names it), so the figure is the median over the other epochs. The modes alternate
A B B A ... so that drift in the machine's load hits both.

    python experiments/benchmarks/checkpoint_stall.py               # ~10 min on 2 cores
    python experiments/benchmarks/checkpoint_stall.py --rounds 1 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.pop("RAY_ADDRESS", None)  # never join someone else's cluster

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = ["model.name=mae_vit_base_patch16", "model.img_size=32", "model.patch_size=4", "model.embed_dim=384",
         "model.num_heads=6", "model.decoder_embed_dim=256", "model.decoder_depth=4", "model.decoder_num_heads=8"]


def one_run(shards: dict, tmp: str, bucket: str, background: bool, epochs: int, tag: str) -> dict[str, float]:
    from mlflow import MlflowClient

    from mae_ray.config import load_config
    from mae_ray.jobs import pretrain

    uri = f"sqlite:///{tmp}/mlflow.db"
    cfg = load_config(None, [
        *MODEL, f"data.train_shards={shards['train']}", f"data.val_shards={shards['val']}", "data.num_workers=1",
        "data.samples_per_epoch=64", "train.batch_size=16", f"train.epochs={epochs}", "train.lr=1e-4",
        "train.warmup_epochs=0", "train.checkpoint_every=1", "train.visualize_every=0",
        "train.checkpoint_every_minutes=null", "ray.num_workers=1", "ray.cpus_per_worker=2",
        f"ray.storage_path=s3://{bucket}/stall", f"mlflow.run_name={tag}", f"storage.upload_in_background={background}",
        f"mlflow.tracking_uri={uri}", "mlflow.experiment=bench", f"output_dir={tmp}/{tag}",
    ])
    start = time.perf_counter()
    result = pretrain.run(cfg)
    wall = time.perf_counter() - start
    history = MlflowClient(uri).get_metric_history(result["mlflow_run_id"], "checkpoint_s")
    stalls = [m.value for m in sorted(history, key=lambda m: m.step)][:-1]  # the last one is always waited for
    epoch_s = [m.value for m in MlflowClient(uri).get_metric_history(result["mlflow_run_id"], "epoch_time_s")]
    return {"stall_s": statistics.median(stalls), "epoch_s": statistics.median(epoch_s), "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="A B pairs (each mode runs this many times)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per run (each ends with a checkpoint)")
    args = p.parse_args()

    import ray

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from _helpers import S3Server

    from data_tools.demo_data import build_demo_dataset
    from mae_ray.cluster.launch import init_ray
    from mae_ray.config import load_config
    from mae_ray.model.mae import MaskedAutoencoderViT

    params = sum(p.numel() for p in MaskedAutoencoderViT(**load_config(None, MODEL).model.kwargs()).parameters())
    print(f"model: {params / 1e6:.0f} M parameters; checkpoint ~{params * 12 / 2**30:.2f} GiB (weights + AdamW)")
    with tempfile.TemporaryDirectory(prefix="mae_ray_stall_") as tmp, S3Server("mae-ray-stall") as s3:
        shards = build_demo_dataset(os.path.join(tmp, "demo"), num_train=256, num_val=32, size=32, seed=0,
                                    maxcount=128)
        init_ray(num_cpus=2, temp_dir=os.path.join(tmp, "ray"))  # after the S3 server: Ray inherits its endpoint
        try:
            got: dict[bool, list[dict[str, float]]] = {True: [], False: []}
            order = [True, False, False, True] * args.rounds
            for i, background in enumerate(order[: 2 * args.rounds]):
                tag = f"{'background' if background else 'waited'}-{i}"
                got[background].append(one_run(shards, tmp, s3.bucket, background, args.epochs, tag))
                print(tag, {k: round(v, 2) for k, v in got[background][-1].items()}, flush=True)
        finally:
            ray.shutdown()
    for background in (False, True):
        rows = got[background]
        print(f"{'in the background' if background else 'training waits  '}: stall per checkpoint "
              f"{statistics.median(r['stall_s'] for r in rows):.2f} s (median of {len(rows)} runs), epoch "
              f"{statistics.median(r['epoch_s'] for r in rows):.2f} s")
    ratio = statistics.median(r["stall_s"] for r in got[False]) / statistics.median(r["stall_s"] for r in got[True])
    print(f"stall waited / in the background: {ratio:.1f}x")


if __name__ == "__main__":
    main()
