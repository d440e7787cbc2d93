"""Reconstruction pictures like the paper's Figure 2: original | masked | reconstruction | visible pasted."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only: workers and CI have no display

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def fixed_noise(n: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """The same mask every time for the same images: pictures of different epochs compare."""
    return torch.rand(n, num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images (normalised, [N, 3, H, W]) -> dict of pictures in [0, 1] for display.

    With ``norm_pix_loss`` the decoder predicts per-patch normalised pixels; the prediction is mapped
    back with each original patch's own mean and std so the picture looks like an image.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    imgs, noise = imgs.to(device), noise.to(device)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # pred [N, L, p*p*3], mask [N, L]
    if model.norm_pix_loss:
        target = model.patchify(imgs)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred)
    pixel_mask = model.unpatchify(mask.unsqueeze(-1).repeat(1, 1, pred.shape[-1]))  # 1 = removed
    model.train(was_training)
    out = {
        "original": imgs,
        "masked": imgs * (1 - pixel_mask),
        "reconstruction": recon,
        "reconstruction + visible": imgs * (1 - pixel_mask) + recon * pixel_mask,
    }
    return {k: _to_unit(v.float().cpu()) for k, v in out.items()}


def save_reconstruction_grid(pictures: dict[str, torch.Tensor], path: str, title: str | None = None) -> str:
    """One row per image, one column per kind of picture; written atomically as PNG."""
    cols = list(pictures)
    n = pictures[cols[0]].shape[0]
    fig, axes = plt.subplots(n, len(cols), figsize=(2.2 * len(cols), 2.2 * n), squeeze=False)
    for r in range(n):
        for c, name in enumerate(cols):
            ax = axes[r][c]
            ax.imshow(pictures[name][r].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98 if title else 1))  # keep the title clear of the column names
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)
