"""Masked Autoencoder ViT, as in He et al. 2021 and the authors' PyTorch release (models_mae.py).

The encoder sees only the visible patches (+ cls); a light decoder appends the shared mask token,
unshuffles, and predicts the pixels of every patch (or, ``target="pca"``, its leading PCA coefficients:
Table 1d); the loss counts masked patches only.
Parameter names are the release's, so official ``.pth`` files load as they are (see weights.py).
Blocks, patch embedding and fused SDPA attention come from timm.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn as nn
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block

from mae_ray.model.pca import project
from mae_ray.model.presets import MASK_SAMPLINGS, TARGETS, default_pca_components, resolve_model_kwargs


# --------------------------------------------------------------------------- position embeddings
def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim]: sin of all frequencies, then cos (the release's order)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = pos.reshape(-1).double()[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Fixed 2-D sin-cos table [(1 +) G*G, D] in the release's channel layout.

    The first half of the channels encodes the column index, the second half the row index
    (the release builds ``np.meshgrid(grid_w, grid_h)`` and embeds ``grid[0]`` first); released
    weights were trained against that layout, so it must not change.
    """
    assert embed_dim % 4 == 0, "sin-cos position embedding needs embed_dim divisible by 4"
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


# --------------------------------------------------------------------------- the model
class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT encoder and a narrow ViT decoder (constructor keywords as in the release)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        mask_token_in_encoder: bool = False,
        mask_sampling: str = "random",
        target: str = "pixel",
        pca_components: int | None = None,
    ):
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        # Table 1c's slow baseline: the encoder runs on all L tokens, a mask token (of encoder
        # width) standing in for each removed patch. Off by default: that is MAE's whole point.
        self.mask_token_in_encoder = mask_token_in_encoder
        # Fig. 6 / Table 1f: which patches go. random (MAE), block (BEiT-style), grid (keep 1 of 4).
        if mask_sampling not in MASK_SAMPLINGS:
            raise ValueError(f"mask_sampling must be one of {MASK_SAMPLINGS}, got {mask_sampling!r}")
        self.mask_sampling = mask_sampling
        # Table 1d: each patch's pixels (per-patch normalised with norm_pix_loss), or its K leading PCA
        # coefficients (pca) in a basis fitted once on training patches (model/pca.py, jobs/pretrain.py)
        if target not in TARGETS or (target == "pca" and norm_pix_loss):
            raise ValueError(f"target must be one of {TARGETS} (pca without norm_pix_loss), got {target!r}")
        self.target = target
        pred_dim = patch_size**2 * in_chans
        if target == "pca":
            k = default_pca_components(patch_size, in_chans) if pca_components is None else pca_components
            if not 1 <= k <= pred_dim:
                raise ValueError(f"pca_components must be in [1, {pred_dim}], got {k}")
            # buffers: in every checkpoint (a resume keeps them), never in the exported encoder (is_decoder_key);
            # NaN until fitted, so that a forgotten fit fails at the first step instead of regressing zeros
            self.register_buffer("pca_mean", torch.full((pred_dim,), float("nan")))  # [P]
            self.register_buffer("pca_basis", torch.full((pred_dim, k), float("nan")))  # [P, K], orthonormal
            pred_dim = k

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim if mask_token_in_encoder else decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, pred_dim, bias=True)  # p*p*C, or K for pca

        self.initialize_weights()

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> int:
        return self.patch_embed.grid_size[0]

    def initialize_weights(self) -> None:
        """The release's init: fixed sin-cos tables, xavier_uniform everywhere, tokens ~ N(0, 0.02)."""
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid_size, cls_token=True)[None])
        self.decoder_pos_embed.data.copy_(
            sincos_2d(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)[None]
        )
        w = self.patch_embed.proj.weight.data  # init the conv like a Linear: [D, C*p*p]
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)  # fused qkv is initialised as one matrix, as released
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    # ----------------------------------------------------------------------- patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], each patch laid out (row, col, channel), channel fastest."""
        p, c = self.patch_size, self.in_chans
        n, h, w = imgs.shape[0], imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(n, c, h, p, w, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, h * w, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W] (square grid)."""
        p, c = self.patch_size, self.in_chans
        h = w = int(x.shape[1] ** 0.5)
        assert h * w == x.shape[1], "unpatchify expects a square grid of patches"
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # ----------------------------------------------------------------------- masking
    def mask_noise(self, n: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
        """Per-sample noise [N, L] whose ``int(L*(1-r))`` smallest entries are the patches kept.

        Every sampling strategy is expressed as noise, so :meth:`random_masking` keeps one code path:
        random draws U(0, 1); block and grid put the patches they remove above every kept one.
        """
        length = self.grid_size**2
        if self.mask_sampling == "random":
            return torch.rand(n, length, device=device)
        if self.mask_sampling == "grid":
            removed = grid_mask(self.grid_size).flatten()  # [L]: keep one of every 2x2 patches
            if int(length * (1 - mask_ratio)) != length - int(removed.sum()):
                raise ValueError(f"grid masking removes 3 of 4 patches: mask_ratio must be 0.75, got {mask_ratio}")
            return removed.float().expand(n, -1).to(device).clone()
        n_mask = length - int(length * (1 - mask_ratio))
        seeds = torch.randint(2**31 - 1, (n,)).tolist()  # from torch's RNG, so seeding it fixes the blocks
        blocks = torch.stack([block_mask(self.grid_size, n_mask, np.random.default_rng(s)) for s in seeds])
        # removed by a block: [1, 1.5); else [0, 0.5); ties are broken at random when blocks fall short
        return (blocks.flatten(1).float() + 0.5 * torch.rand(n, length)).to(device)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep the ``int(L*(1-r))`` patches with the smallest noise, per sample.

        Returns x_masked [N, len_keep, D], mask [N, L] (1 = removed, in patch order), ids_restore [N, L].
        """
        n, length, d = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)  # [N, L] in [0, 1]
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # unshuffle to patch order
        return x_masked, mask, ids_restore

    # ----------------------------------------------------------------------- encoder / decoder
    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(imgs)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        if noise is None:
            noise = self.mask_noise(x.shape[0], mask_ratio, x.device)  # [N, L]
        if self.mask_token_in_encoder:
            _, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
            tokens = self.mask_token + self.pos_embed[:, 1:, :]  # [1, L, D]
            x = torch.where(mask.unsqueeze(-1).bool(), tokens.to(x.dtype), x)  # [N, L, D]
        else:
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)  # [N, len_keep, D]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [N, 1 + len_keep, Dd]
        if not self.mask_token_in_encoder:  # append mask tokens, then unshuffle to patch order
            n_mask = ids_restore.shape[1] + 1 - x.shape[1]
            x_ = torch.cat([x[:, 1:, :], self.mask_token.repeat(x.shape[0], n_mask, 1)], dim=1)  # [N, L, Dd]
            x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
            x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1 + L, Dd]
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1 + L, p*p*C] (pca: [N, 1 + L, K])
        return x[:, 1:, :]

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Per-patch regression targets; with norm_pix_loss each patch is normalised by its own stats."""
        target = self.patchify(imgs)  # [N, L, p*p*C]
        if self.target == "pca":
            return project(target, self.pca_mean, self.pca_basis)  # [N, L, K]
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as released
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE per patch, averaged over removed patches only."""
        loss = ((pred - self.patch_targets(imgs)) ** 2).mean(dim=-1)  # [N, L]
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C] (pca: [N, L, K])
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    # ----------------------------------------------------------------------- downstream use
    @torch.no_grad()
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """All tokens, unmasked and in patch order: [N, 1 + L, D] (what timm's ViT.forward_features gives)."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------- mask shapes (Fig. 6)
def grid_mask(grid_size: int) -> torch.Tensor:
    """[G, G] bool, True = removed: one patch of every 2x2 cell is kept (its top-left), 75 % removed."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    return (rows % 2 == 1) | (cols % 2 == 1)


def block_mask(grid_size: int, n_mask: int, rng: np.random.Generator, min_block: int = 16,
               min_aspect: float = 0.3) -> torch.Tensor:
    """[G, G] bool, True = removed: BEiT's blockwise masking (Bao et al. 2021, its MaskingGenerator).

    Rectangles of random area (``min_block`` .. patches still to remove) and aspect ratio (0.3 .. 1/0.3,
    log-uniform) are placed at random until ``n_mask`` patches are covered; a rectangle may overlap earlier
    ones but is only taken if it adds patches without overshooting. It can stop a few short (ten failed
    tries); :meth:`MaskedAutoencoderViT.mask_noise` then removes the rest at random.
    """
    mask = np.zeros((grid_size, grid_size), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    while (left_to_mask := n_mask - int(mask.sum())) > 0:
        added = 0
        for _ in range(10):
            area = min_block + (left_to_mask - min_block) * rng.random()  # as BEiT: < min_block near the end
            aspect = math.exp(rng.uniform(*log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (0 < h < grid_size and 0 < w < grid_size):
                continue
            top, left = rng.integers(0, grid_size - h + 1), rng.integers(0, grid_size - w + 1)
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= left_to_mask:
                mask[top:top + h, left:left + w] = True
                added = new
                break
        if not added:
            break
    return torch.from_numpy(mask)


def build_model(name: str, **overrides) -> MaskedAutoencoderViT:
    """A preset by its name (``mae_vit_base_patch16``, ...), any constructor keyword overridden."""
    return MaskedAutoencoderViT(**resolve_model_kwargs(name, overrides))


def encoder_param_count(model: MaskedAutoencoderViT) -> int:
    """Parameters of the encoder (patch embedding, cls, position table, blocks, final norm)."""
    return sum(p.numel() for n, p in model.named_parameters() if not is_decoder_key(n))


def is_decoder_key(name: str) -> bool:
    """Decoder side: the decoder, the mask token and what the decoder predicts against (the PCA basis)."""
    return name.startswith(("decoder_", "pca_")) or name == "mask_token"
