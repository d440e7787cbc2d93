"""The PCA target of the paper's Table 1d: a basis of patch pixels, and patches in and out of it.

The decoder predicts each patch's largest PCA coefficients instead of its pixels. The basis is fitted once,
before pre-training, on a sample of training patches (``jobs/pretrain.py`` draws it), and kept in the model
as buffers, so every checkpoint holds it and a resumed run predicts in the same basis.
Knows nothing of data or Ray: patches in, tensors out.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch


class PcaFit(NamedTuple):
    mean: torch.Tensor  # [P] float32: the mean patch
    basis: torch.Tensor  # [P, K] float32: orthonormal columns, by decreasing variance
    explained: float  # share of the patches' total variance the K components hold
    patches: int  # how many patches it was fitted on


def fit_pca(batches: Iterable[torch.Tensor], components: int) -> PcaFit:
    """PCA of patch vectors (batches [..., P]) with ``components`` leading directions.

    Streams: only the float64 sum and sum of outer products are kept (a [P, P] matrix), so the sample can
    be larger than memory; then the covariance's ``torch.linalg.eigh``. Each direction's sign, which eigh
    leaves arbitrary, is fixed (its largest entry positive): the same patches give the same basis anywhere.
    """
    count, total, outer = 0, None, None
    for batch in batches:
        x = batch.reshape(-1, batch.shape[-1]).to("cpu", torch.float64)  # [n, P]
        if total is None:
            total, outer = x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1], x.shape[1])
        count += x.shape[0]
        total += x.sum(dim=0)
        outer += x.T @ x
    if total is None or count <= components:
        raise ValueError(f"a PCA with {components} components needs more than {components} patches, got {count}")
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)  # [P, P]
    values, vectors = torch.linalg.eigh(cov)  # ascending
    values, basis = values.flip(0), vectors.flip(1)[:, :components]
    basis = basis * torch.sign(basis.gather(0, basis.abs().argmax(dim=0, keepdim=True)))
    explained = float(values[:components].sum() / values.clamp_min(0).sum())
    return PcaFit(mean.float(), basis.float().contiguous(), explained, count)


def project(patches: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """[..., P] patches -> [..., K] coefficients ``(patch - mean) @ basis``; in float32 under autocast too
    (a bf16 target would be 0.4 % off before the model predicts anything)."""
    with torch.autocast(patches.device.type, enabled=False):
        return (patches.float() - mean) @ basis


def unproject(coefficients: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """[..., K] coefficients -> [..., P] the patch they stand for (a picture of a prediction)."""
    return coefficients.float() @ basis.T + mean
