"""The PCA target of Table 1d (``model.target: pca``): the basis, the loss, the pictures, the checkpoint.

The basis is checked on data whose principal directions are known, and on the demo shards as pre-training
draws it (seeded); one real in-process pre-training run shows the loss falling well below what predicting
the mean patch gives, and its resume keeping the checkpoint's basis without fitting again.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import tiny_config
from mlflow import MlflowClient

from mae_ray.cluster.checkpoints import load_state
from mae_ray.config import load_config
from mae_ray.data.loader import make_eval_loader
from mae_ray.data.transforms import build_transform
from mae_ray.errors import CheckpointError, ConfigError
from mae_ray.jobs import pretrain
from mae_ray.model.mae import MaskedAutoencoderViT, build_model
from mae_ray.model.pca import fit_pca, project, unproject
from mae_ray.model.visualize import IMAGENET_MEAN, IMAGENET_STD, fixed_noise, reconstruct
from mae_ray.model.weights import encoder_state_dict, load_mae_weights, read_state_dict

MICRO = "mae_vit_micro_patch4"  # 4x4x3 patches: 48 values, 6 components by default


def assert_orthonormal(basis: torch.Tensor) -> None:
    eye = torch.eye(basis.shape[1])
    assert torch.allclose(basis.T @ basis, eye, atol=1e-5), (basis.T @ basis - eye).abs().max()


def fitted(model: MaskedAutoencoderViT, imgs: torch.Tensor) -> MaskedAutoencoderViT:
    fit = fit_pca([model.patchify(imgs)], model.pca_basis.shape[1])
    model.pca_mean.copy_(fit.mean)
    model.pca_basis.copy_(fit.basis)
    return model


def test_fit_pca_finds_the_leading_directions_of_known_data():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))  # the true directions
    std = torch.tensor([8.0, 7, 6, 5, 4, 3] + [0.5] * 42, dtype=torch.float64)  # q[:, 0] the largest, ...
    x = (torch.randn(20000, 48, generator=gen, dtype=torch.float64) * std) @ q.T + 3.0
    fit = fit_pca(x.float().split(1000), 6)  # streamed in batches
    assert_orthonormal(fit.basis)
    # each column is the true direction of its rank (sign fixed by the rule: largest entry positive)
    assert (fit.basis.double().T @ q[:, :6]).diagonal().abs().min() > 0.99
    assert fit.basis.abs().argmax(0).tolist() == [int(fit.basis[:, j].argmax()) for j in range(6)]
    assert fit.explained == pytest.approx(float((std[:6] ** 2).sum() / (std**2).sum()), rel=0.02)
    assert torch.allclose(fit.mean, torch.full((48,), 3.0), atol=0.1) and fit.patches == 20000


def test_the_basis_pretraining_fits_is_orthonormal_and_the_seeds_own(demo_data, tmp_path):
    def basis(seed: int):
        cfg = tiny_config(demo_data, tmp_path, "model.target=pca", "model.pca_fit_images=200", f"train.seed={seed}")
        return pretrain.fit_pca_basis(cfg, MaskedAutoencoderViT(**cfg.model.kwargs()))

    first, again, other = basis(0), basis(0), basis(1)
    assert first.basis.shape == (48, 6) and first.patches == 200 * 64
    assert torch.equal(first.basis, again.basis) and torch.equal(first.mean, again.mean)  # the seed's bits
    assert not torch.equal(first.basis, other.basis)  # another seed: other shards first, other crops
    assert_orthonormal(first.basis)
    assert_orthonormal(other.basis)


def test_pca_targets_and_pictures_go_through_the_basis():
    torch.manual_seed(0)
    imgs = torch.randn(4, 3, 32, 32)
    full = fitted(build_model(MICRO, target="pca", pca_components=48), imgs)  # every component: lossless
    patches = full.patchify(imgs)
    assert torch.allclose(unproject(full.patch_targets(imgs), full.pca_mean, full.pca_basis), patches, atol=1e-4)
    model = build_model(MICRO, target="pca")
    assert model.decoder_pred.out_features == 6 and torch.isnan(model(imgs)[0])  # unfitted: fails at once
    fitted(model, imgs)
    assert model.patch_targets(imgs).shape == (4, 64, 6) and torch.isfinite(model(imgs)[0])
    exact = model.patch_targets(imgs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # AMP: the targets stay float32, not bf16-rounded
        assert torch.equal(model.patch_targets(imgs), exact)
    pics = reconstruct(model, imgs, 0.75, fixed_noise(4, 64))  # coefficients back to pixels
    assert all(p.shape == (4, 3, 32, 32) and torch.isfinite(p).all() for p in pics.values())
    # the picture's masked patches are the prediction's projection: mean + basis @ coefficients
    _, pred, mask = model(imgs, mask_ratio=0.75, noise=fixed_noise(4, 64))
    expected = model.unpatchify(unproject(pred, model.pca_mean, model.pca_basis)) * IMAGENET_STD + IMAGENET_MEAN
    assert torch.allclose(pics["reconstruction"], expected.clamp(0, 1), atol=1e-6)
    assert torch.allclose(project(patches, full.pca_mean, full.pca_basis), full.patch_targets(imgs))


def test_the_basis_stays_out_of_the_encoder_and_official_layouts(tmp_path):
    pixel, pca = build_model(MICRO), build_model(MICRO, target="pca")
    assert not [k for k in pixel.state_dict() if k.startswith("pca_")]  # the release's keys, unchanged
    assert set(encoder_state_dict(pca)) == set(encoder_state_dict(pixel))  # the exported encoder: no basis
    load_mae_weights(pca, encoder_state_dict(pixel))  # an encoder-only file: the decoder side stays at init
    with pytest.raises(CheckpointError, match=r"decoder_pred.weight \(48, 32\) vs \(6, 32\)"):
        load_mae_weights(pca, pixel.state_dict())  # a full pixel-target file does not fit a PCA decoder
    torch.save({"model": pca.state_dict()}, tmp_path / "full.pth")
    assert {"pca_mean", "pca_basis"} <= set(read_state_dict(tmp_path / "full.pth"))


@pytest.mark.parametrize("settings, message", [
    (["model.target=tokens"], "model.target must be one of pixel, pca, got 'tokens'"),
    (["model.target=pca", "model.norm_pix_loss=true"], "normalises pixel targets only: set model.norm_pix_loss=false"),
    (["model.target=pca", "model.pca_components=0"], r"model.pca_components must be in \[1, 48\]"),
    (["model.target=pca", "model.pca_components=49"], r"model.pca_components must be in \[1, 48\]"),
    (["model.name=mae_vit_base_patch16", "model.pca_components=769"], r"must be in \[1, 768\]"),
    (["model.target=pca", "model.pca_fit_images=0"], "model.pca_fit_images must be >= 1"),
])
def test_bad_pca_settings_are_one_clear_error(settings, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"model.name={MICRO}", *settings])


def test_defaults_keep_the_papers_share_of_a_patch():
    kwargs = load_config(None, ["model.name=mae_vit_large_patch16", "model.target=pca"]).model.kwargs()
    assert (kwargs["patch_size"], kwargs["pca_components"]) == (16, None)  # None: the model's share
    assert build_model(MICRO, target="pca", patch_size=16).pca_basis.shape == (768, 96)  # the paper's 96 of 768
    assert build_model(MICRO, target="pca").pca_basis.shape == (48, 6)


@pytest.mark.ray
def test_the_pca_loss_falls_in_pre_training_and_a_resume_keeps_the_basis(local_ray, demo_data, tmp_path,
                                                                         monkeypatch):
    cfg = tiny_config(demo_data, tmp_path, "ray.num_workers=0", "data.num_workers=0", "train.epochs=4",
                      "model.target=pca", "model.pca_fit_images=300")
    result = pretrain.run(cfg)
    state = load_state(result["checkpoint"])
    basis, mean = state["model"]["pca_basis"], state["model"]["pca_mean"]
    assert torch.equal(basis, pretrain.fit_pca_basis(cfg, build_model(MICRO, target="pca")).basis)  # seeded
    assert_orthonormal(basis)
    losses = [h["train_loss"] for h in state["history"]]
    # predicting the mean patch (zero coefficients) scores the coefficients' mean square; training goes well below
    model = build_model(MICRO, target="pca")
    model.pca_mean.copy_(mean)
    model.pca_basis.copy_(basis)
    imgs = next(iter(make_eval_loader(demo_data["train"], batch_size=256, img_size=32, num_workers=0,
                                      transform=build_transform("pretrain", 32))))[0]
    trivial = float(model.patch_targets(imgs).pow(2).mean())
    assert losses[-1] < 0.7 * losses[0] and losses[-1] < 0.7 * trivial, (losses, trivial)
    assert (tmp_path / "run" / "reconstructions" / "epoch_0004.png").is_file()  # pictures of coefficients
    tags = MlflowClient(cfg.mlflow.tracking_uri).get_run(result["mlflow_run_id"]).data.tags
    assert tags["mae_ray.pca_target"].startswith("6 of 48 components")
    assert not [k for k in read_state_dict(result["encoder"]) if k.startswith("pca_")]

    def refit(*_):
        raise AssertionError("a resumed run fitted its PCA basis again")

    monkeypatch.setattr(pretrain, "fit_pca_basis", refit)
    first = result["checkpoint"].replace("epoch_000003", "epoch_000002")
    cfg.output_dir = str(tmp_path / "resumed")
    resumed = load_state(pretrain.run(cfg, resume_from=first)["checkpoint"])
    assert [a["start_epoch"] for a in resumed["attempts"]] == [0, 3]
    assert torch.equal(resumed["model"]["pca_basis"], basis) and torch.equal(resumed["model"]["pca_mean"], mean)
