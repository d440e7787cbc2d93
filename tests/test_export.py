"""``mae-ray export``: an encoder pre-trained here, loaded by timm, by Hugging Face transformers (ViTMAEModel and
ViTModel) and as the MAE release's checkpoint, giving the features ours gives; its model card says what it is."""

from __future__ import annotations

import sys

import pytest
import torch
from _helpers import tiny_config

from mae_ray import cli
from mae_ray.cluster.checkpoints import load_state
from mae_ray.jobs import export, pretrain
from mae_ray.model.mae import MaskedAutoencoderViT
from mae_ray.model.weights import load_mae_weights
from mae_ray.tracking import log_values

ATOL = 1e-5


@pytest.fixture(scope="module")
def pretrained(demo_data, tmp_path_factory):
    """A tiny pre-training in this process (ray.num_workers=0), and our encoder built from its checkpoint."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(demo_data, tmp, "train.epochs=1", "ray.num_workers=0")
    summary = pretrain.run(cfg)
    uri = f"sqlite:///{tmp}/mlflow.db"
    log_values(uri, summary["mlflow_run_id"], {"linprobe_top1": 12.345})  # as an evaluation of it would
    ours = MaskedAutoencoderViT(**cfg.model.kwargs())
    ours.load_state_dict(load_state(summary["checkpoint"])["model"])
    return {"summary": summary, "uri": uri, "ours": ours.eval(), "kwargs": cfg.model.kwargs()}


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def exported(pretrained, fmt: str, monkeypatch, where) -> str:
    out = where / f"out-{fmt}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pretrained["uri"])
    assert cli.main(["export", pretrained["summary"]["mlflow_run_id"], "--format", fmt, "--out", str(out)]) == 0
    return str(out)


def test_hf_loads_as_vitmae_and_as_vit_and_gives_our_features(pretrained, monkeypatch, tmp_path):
    from transformers import ViTMAEModel, ViTModel

    out = exported(pretrained, "hf", monkeypatch, tmp_path)
    ours, imgs = pretrained["ours"], images()
    vit = ViTModel.from_pretrained(out, add_pooling_layer=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(vit(pixel_values=imgs).last_hidden_state, ours.forward_features(imgs),
                                   atol=ATOL, rtol=0)
    mae = ViTMAEModel.from_pretrained(out).eval()  # the MAE encoder: masks as pre-training did (its mask ratio)
    assert mae.config.mask_ratio == 0.75
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        latent, _, ids_restore = ours.forward_encoder(imgs, 0.75, noise)
        got = mae(pixel_values=imgs, noise=noise)
    assert torch.equal(got.ids_restore, ids_restore)
    torch.testing.assert_close(got.last_hidden_state, latent, atol=ATOL, rtol=0)


def test_timm_and_release_formats_give_our_features(pretrained, monkeypatch, tmp_path):
    import timm

    ours, imgs = pretrained["ours"], images()
    vit = timm.create_model(f"local-dir:{exported(pretrained, 'timm', monkeypatch, tmp_path)}", pretrained=True)
    with torch.no_grad():
        torch.testing.assert_close(vit.eval().forward_features(imgs), ours.forward_features(imgs), atol=ATOL, rtol=0)
    model = MaskedAutoencoderViT(**pretrained["kwargs"])  # the release's loader path: {"model": ...}, its names
    load_mae_weights(model, f"{exported(pretrained, 'release', monkeypatch, tmp_path)}/checkpoint.pth")
    with torch.no_grad():
        assert torch.equal(model.eval().forward_features(imgs), ours.forward_features(imgs))


@pytest.mark.parametrize("fmt", export.FORMATS)
def test_every_format_comes_with_a_card_that_says_what_the_encoder_is(pretrained, monkeypatch, tmp_path, fmt):
    card = open(f"{exported(pretrained, fmt, monkeypatch, tmp_path)}/README.md").read()
    assert f"MLflow run: `{pretrained['summary']['mlflow_run_id']}`" in card
    assert "`model.name`: mae_vit_micro_patch4" in card and "`model.mask_ratio`: 0.75" in card
    assert "`train.epochs`: 1" in card and "`data.samples_per_epoch`: 256" in card
    assert "- `linprobe_top1`: 12.35" in card  # what an evaluation of it recorded
    # the run's dataset lineage (its name, digest and counts), and a preset's value the config left to it
    assert "- data (training): shards/train (digest " in card and '"num_samples": 1200' in card
    assert "`model.norm_pix_loss`: False" in card
    kw = pretrained["kwargs"]
    assert f"patch {kw['patch_size']}, image 32 px, width {kw['embed_dim']}, depth {kw['depth']}" in card
    assert {"timm": "local-dir", "hf": "ViTModel.from_pretrained", "release": "checkpoint.pth"}[fmt] in card


def test_bad_exports_are_one_line_before_anything_is_written(pretrained, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pretrained["uri"])
    run_id = pretrained["summary"]["mlflow_run_id"]
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert cli.main(["export", run_id, "--format", "timm", "--out", str(full)]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert cli.main(["export", "random", "--format", "release", "--out", str(tmp_path / "r")]) == 2
    assert "no pre-trained encoder to export" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "transformers", None)  # the [hf] extra not installed
    assert cli.main(["export", run_id, "--format", "hf", "--out", str(tmp_path / "h")]) == 2
    assert capsys.readouterr().err.strip() == "error: --format hf needs transformers: pip install 'mae-ray[hf]'"
    assert not (tmp_path / "r").exists() and not (tmp_path / "h").exists()
