"""Config: YAML + dotted overrides, type checks, and one clear line for each user mistake."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mae_ray.config import Config, load_config
from mae_ray.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "model:\n  name: mae_vit_base_patch16\n  mask_ratio: 0.5\ntrain:\n  epochs: 3\n")
    cfg = load_config(path, ["model.mask_ratio=0.6", "train.epochs=10", "train.blr=1e-4", "ray.use_gpu=true",
                             "mlflow.tracking_uri=http://127.0.0.1:5000", "model.decoder_depth=4"])
    assert cfg.model.mask_ratio == 0.6 and cfg.train.epochs == 10
    assert cfg.train.blr == pytest.approx(1e-4) and isinstance(cfg.train.blr, float)
    assert cfg.ray.use_gpu is True and cfg.mlflow.tracking_uri == "http://127.0.0.1:5000"
    k = cfg.model.kwargs()
    assert (k["embed_dim"], k["depth"], k["decoder_depth"], k["patch_size"]) == (768, 12, 4, 16)


def test_required_names_exist():
    flat = Config().flatten()
    for key in ["model.name", "model.mask_ratio", "model.decoder_embed_dim", "model.decoder_depth",
                "model.norm_pix_loss", "model.img_size", "model.patch_size", "model.embed_dim", "model.depth",
                "model.num_heads", "model.decoder_num_heads", "model.mlp_ratio", "model.in_chans",
                "model.mask_token_in_encoder", "train.epochs", "train.batch_size", "train.blr",
                "train.accum_iter", "train.warmup_epochs", "ray.num_workers", "ray.use_gpu",
                "mlflow.tracking_uri", "mlflow.experiment", "data.train_shards", "data.val_shards", "output_dir"]:
        assert key in flat, key


def test_int_is_accepted_for_float_but_not_text():
    cfg = load_config(None, ["train.warmup_epochs=5"])
    assert cfg.train.warmup_epochs == 5.0 and isinstance(cfg.train.warmup_epochs, float)
    with pytest.raises(ConfigError, match="train.blr: expected float, got 'fast'"):
        load_config(None, ["train.blr=fast"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mask_ratoi=0.5", "unknown key 'model.mask_ratoi'; valid keys in 'model': name, mask_ratio"),
        ("modle.name=x", "unknown key 'modle'; valid keys in the top level: model, data, train"),
        ("train.epochs=ten", "train.epochs: expected int, got 'ten' (str)"),
        ("train.epochs=2.5", "train.epochs: expected int, got 2.5 (float)"),
        ("ray.use_gpu=maybe", "ray.use_gpu: expected bool, got 'maybe' (str)"),
        ("model.mask_ratio=1.0", "model.mask_ratio must be in (0, 1), got 1.0"),
        ("model.mask_ratio=0", "model.mask_ratio must be in (0, 1)"),
        ("model.img_size=30", "model.img_size 30 is not divisible by model.patch_size 4"),
        ("model.decoder_num_heads=3", "model.decoder_embed_dim 128 is not divisible by model.decoder_num_heads 3"),
        ("model.name=vit_gigantic", "model.name: unknown preset 'vit_gigantic'; choose one of: mae_vit_base"),
        ("train.amp=fp8", "train.amp must be one of bf16, fp16, none"),
        ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
        ("finetune.head_norm=group", "finetune.head_norm must be layer or batch, got 'group'"),
        ("linprobe.pool=max", "linprobe.pool must be cls or mean, got 'max'"),
        ("train.checkpoint_every_minutes=0", "train.checkpoint_every_minutes must be > 0 (null: checkpoints at epoch"),
        ("train.checkpoint_every_minutes=-5", "train.checkpoint_every_minutes must be > 0"),
        ("cost.per_gpu_hour=-2", "cost.per_gpu_hour must be >= 0, got -2"),
        ("mlflow.system_metrics_interval_s=0", "mlflow.system_metrics_interval_s must be > 0 seconds, got 0"),
        ("epochs", "--set expects key=value"),
        ("model=3", "model: expected a mapping of keys, got 3"),
    ],
)
def test_bad_overrides_get_a_clear_message(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


@pytest.mark.parametrize(("overrides", "message"), [
    (["ray.num_workers=0", "ray.min_workers=1"], "ray.min_workers needs Ray workers: ray.num_workers 0 runs in"),
    (["ray.num_workers=4", "ray.min_workers=5"], "ray.min_workers must be in [1, ray.num_workers = 4], got 5"),
    (["ray.num_workers=4", "ray.min_workers=2", "ray.resize_check_s=0"], "ray.resize_check_s must be > 0"),
    (["ray.num_workers=4", "ray.min_workers=3", "ray.cpus_per_worker=0.6"],
     "an elastic group (ray.min_workers) needs whole CPUs and GPUs per worker, not ray.cpus_per_worker 0.6"),
])
def test_an_elastic_group_outside_its_bounds_is_refused(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_an_elastic_group_is_one_whose_smallest_size_is_below_its_largest():
    assert not load_config(None, ["ray.num_workers=4"]).ray.elastic  # min_workers unset: fixed
    assert not load_config(None, ["ray.num_workers=4", "ray.min_workers=4"]).ray.elastic
    assert load_config(None, ["ray.num_workers=4", "ray.min_workers=1"]).ray.elastic


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="run config not found: .*nope.yaml .*shipped run config of that name: "
                                          "demo_cpu, "):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d"):
        load_config(write(tmp_path, "model:\n  name: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_yaml_round_trip(tmp_path):
    cfg = load_config(None, ["model.mask_ratio=0.6", "data.train_shards=/x/train-{000000..000003}.tar"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_cli_prints_one_line_and_exits_nonzero_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mae_ray", "pretrain", "--set", "model.mask_ratio=1.5"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == ["error: model.mask_ratio must be in (0, 1), got 1.5"]
    assert not any(tmp_path.iterdir())  # nothing written


def test_each_evaluation_job_has_its_own_seed_precision_and_checkpoint_cadence():
    cfg = load_config(None, ["train.seed=3", "train.amp=fp16", "train.checkpoint_every=5",
                             "linprobe.seed=7", "finetune.amp=none", "finetune.checkpoint_every=2"])
    assert cfg.run_settings("pretrain") == (3, "fp16", 5)
    assert cfg.run_settings("linprobe") == (7, "fp16", 5)  # unset keys: pre-training's
    assert cfg.run_settings("finetune") == (3, "none", 2)
    for bad, message in (("linprobe.amp=fp32", "linprobe.amp must be one of bf16, fp16, none"),
                         ("finetune.checkpoint_every=0", "finetune.checkpoint_every must be >= 1")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


@pytest.mark.parametrize("argv, message", [
    (["bogus"], "error: mae-ray: argument COMMAND: invalid choice: 'bogus'"),
    (["pretrain", "--no-such-flag"], "error: mae-ray: unrecognized arguments: --no-such-flag"),
    (["evaluate"], "error: mae-ray evaluate: the following arguments are required: --run"),
])
def test_a_usage_mistake_is_one_error_line_and_exit_2(argv, message, capsys):
    from mae_ray import cli

    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith(message), err


def test_a_config_derived_with_overrides_is_the_one_loading_would_give_and_leaves_its_source_alone():
    """``Config.override``: how a trial's config comes from the sweep's base, an evaluation's from a trial's -
    typed, with no dict in between, checked as ``--set`` is, and validated as a whole."""
    base = load_config(None, ["model.mask_ratio=0.6", "ray.num_workers=2"])
    items = ["model.mask_ratio=0.5", "train.epochs=3", "ray.min_workers=1", "finetune={epochs: 7}"]
    derived = base.override(*items)
    assert derived == load_config(None, ["model.mask_ratio=0.6", "ray.num_workers=2", *items])
    assert base.model.mask_ratio == 0.6 and base.ray.min_workers is None and base.finetune.epochs != 7
    for bad, message in (("model.nope=1", "unknown key 'model.nope'; valid keys in 'model': name,"),
                         ("train.epochs=abc", "train.epochs: expected int, got 'abc' (str)"),
                         ("model.mask_ratio.x=1", "'model.mask_ratio' is a value, not a section"),
                         ("ray.min_workers=3", "ray.min_workers must be in [1, ray.num_workers = 2], got 3")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            base.override(bad)
