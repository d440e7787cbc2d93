"""Reconstruction pictures like the paper's Figure 2: original | masked | reconstruction | visible pasted."""

from __future__ import annotations

import os

import torch

from mae_ray.model.pca import unproject

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def fixed_noise(n: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """The same mask every time for the same images: pictures of different epochs compare."""
    return torch.rand(n, num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor) -> dict[str, torch.Tensor]:
    """Images (normalised, [N, 3, H, W]) -> dict of pictures in [0, 1] for display.

    With ``norm_pix_loss`` the decoder predicts each patch normalised by its own mean and std, which the
    picture needs back; a removed patch's are the model's to guess, not the input's to give (with them its
    average colour and contrast would leak in, and an untrained model would look good), so ``_patch_stats``
    takes them from the visible patches only. With the PCA target it predicts coefficients: the picture is
    the patch they stand for (mean + basis @ coefficients).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    imgs, noise = imgs.to(device), noise.to(device)
    _, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)  # pred [N, L, p*p*3], mask [N, L]
    if model.target == "pca":
        pred = unproject(pred, model.pca_mean, model.pca_basis)  # [N, L, K] -> [N, L, p*p*3]
    elif model.norm_pix_loss:
        mean, std = _patch_stats(model, imgs, mask)  # [N, L, 1] each
        pred = pred * std + mean
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


def _patch_stats(model, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std as norm_pix_loss takes them: a visible patch's own; a removed patch's, those
    of the visible patches averaged with weights 1 / distance^2 on the patch grid (its neighbours count most)."""
    target = model.patchify(imgs)  # [N, L, p*p*3]
    stats = torch.stack([target.mean(dim=-1), (target.var(dim=-1) + 1.0e-6) ** 0.5], dim=-1)  # [N, L, 2]
    rows, cols = model.patch_embed.grid_size
    where = torch.cartesian_prod(torch.arange(rows), torch.arange(cols)).float().to(imgs.device)  # [L, 2]
    weight = torch.cdist(where, where).clamp(min=1) ** -2 * (1 - mask).unsqueeze(1)  # [N, L, L]: from visible
    guessed = weight @ stats / weight.sum(dim=-1, keepdim=True)  # [N, L, 2]
    stats = torch.where(mask.unsqueeze(-1).bool(), guessed, stats)
    return stats[..., :1], stats[..., 1:]


PAD, LINE = 4, 14  # px: between pictures; per line of text above them
MIN_SIDE = 160  # px: a picture's least side in the grid, room for its column's name


def grid_place(row: int, col: int, size: tuple[int, int], titled: bool) -> tuple[int, int, int]:
    """Where picture (``row``, ``col``) of a grid of ``size`` (height, width) pictures is: (top, left, scale),
    each of its pixels a ``scale`` x ``scale`` block there."""
    h, w = size
    scale = max(1, -(-MIN_SIDE // max(h, w)))  # small pictures enlarged by a whole factor: no resampling
    return (PAD + LINE * (2 if titled else 1) + row * (h * scale + PAD), PAD + col * (w * scale + PAD), scale)


def save_reconstruction_grid(pictures: dict[str, torch.Tensor], path: str, title: str | None = None) -> str:
    """One row per image, one column per kind of picture (its name above), ``title`` above all; written
    atomically as PNG. Every picture's pixels are there as they are, 8-bit (``grid_place`` says where)."""
    from PIL import Image, ImageDraw

    cols = list(pictures)
    n, _, h, w = pictures[cols[0]].shape
    bottom, right, scale = grid_place(n, len(cols), (h, w), title is not None)
    canvas = torch.full((3, bottom, right), 255, dtype=torch.uint8)  # white
    for c, name in enumerate(cols):
        big = pictures[name].repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # [N, 3, h*s, w*s]
        pixels = (big * 255).round().clamp(0, 255).to(torch.uint8)
        for r in range(n):
            top, left, _ = grid_place(r, c, (h, w), title is not None)
            canvas[:, top : top + h * scale, left : left + w * scale] = pixels[r]
    image = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((PAD, PAD), title, fill="black")
    for c, name in enumerate(cols):
        _, left, _ = grid_place(0, c, (h, w), title is not None)
        draw.text((left, PAD + LINE * (1 if title else 0)), name, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    image.save(tmp)
    os.replace(tmp, path)
    return path


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return (x * IMAGENET_STD + IMAGENET_MEAN).clamp(0, 1)
