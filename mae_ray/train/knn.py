"""Weighted kNN accuracy of frozen features: the cheap online monitor of pre-training.

As in InstDisc/DINO: cosine similarity, the k nearest bank samples vote with weight exp(sim / T)
(k = 20, T = 0.07). During pre-training every ``train.knn_every`` epochs each rank embeds its share
of a bounded labelled bank (``eval.knn_train_samples`` from the training shards) and of a bounded
validation subset (``eval.knn_val_samples``); the bank is all-gathered, each rank classifies its
own validation share, and the correct counts are summed. Cost: one no-grad forward over
bank + val samples per check (about 6,000 images with the defaults), no backward, no optimiser.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mae_ray.data.loader import make_eval_loader
from mae_ray.data.transforms import eval_transform
from mae_ray.train.ranks import all_gather_rows, sum_over_ranks


@torch.no_grad()
def extract_features(model, loader, device, pool: str = "cls", limit: int | None = None):
    """Encoder features of up to ``limit`` samples of ``loader``: ([n, D] float32, [n] int64) on ``device``.

    ``model`` is a ``MaskedAutoencoderViT`` (or anything with ``forward_features`` -> [N, 1 + L, D]).
    """
    was_training = model.training
    model.eval()
    feats, labels, seen = [], [], 0
    for imgs, y in loader:
        if limit is not None and seen >= limit:
            break
        tokens = model.forward_features(imgs.to(device, non_blocking=True))  # [N, 1 + L, D]
        f = tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)  # [N, D]
        feats.append(f.float())
        labels.append(y.to(device))
        seen += f.shape[0]
    model.train(was_training)
    if not feats:
        return torch.zeros(0, 0, device=device), torch.zeros(0, dtype=torch.long, device=device)
    f, y = torch.cat(feats), torch.cat(labels)
    return (f[:limit], y[:limit]) if limit is not None else (f, y)


@torch.no_grad()
def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 512) -> torch.Tensor:
    """Class scores [n_queries, num_classes]: the k most cosine-similar bank samples vote exp(sim / T)."""
    bank = F.normalize(bank, dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start : start + chunk], dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [n, k]
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=bank.device)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the top-k scores, for each k."""
    if scores.shape[0] == 0:
        return {k: 0 for k in ks}
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # [n, kmax]
    hit = top == labels.unsqueeze(1)
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


class KnnMonitor:
    """kNN top-1 of the encoder every ``every`` epochs, over bounded bank and validation subsets."""

    def __init__(self, cfg, rank: int, world_size: int, device, img_size: int):
        self.cfg, self.rank, self.world_size, self.device = cfg, rank, world_size, device
        self.every = cfg.train.knn_every
        self.img_size = img_size
        self.loaders = None

    def due(self, epoch: int) -> bool:
        return bool(self.every) and (epoch + 1) % self.every == 0

    def _build(self):
        val = self.cfg.data.val_shards or self.cfg.data.train_shards
        kw = dict(batch_size=256, transform=eval_transform(self.cfg.data, self.img_size), img_size=self.img_size,
                  rank=self.rank, world_size=self.world_size, num_workers=self.cfg.data.num_workers)
        self.loaders = (make_eval_loader(self.cfg.data.train_shards, **kw), make_eval_loader(val, **kw))

    def run(self, model) -> float:
        """Every rank calls this (it has collectives); returns the global kNN top-1 in percent."""
        if self.loaders is None:
            self._build()
        share = lambda n: math.ceil(n / self.world_size)  # noqa: E731 - bounded share per rank
        e = self.cfg.eval
        bank, bank_y = extract_features(model, self.loaders[0], self.device, limit=share(e.knn_train_samples))
        val, val_y = extract_features(model, self.loaders[1], self.device, limit=share(e.knn_val_samples))
        bank, bank_y = all_gather_rows(bank), all_gather_rows(bank_y)
        num_classes = self.cfg.data.num_classes or int(bank_y.max().item()) + 1
        scores = knn_scores(bank, bank_y, val, num_classes, k=e.knn_k, temperature=e.knn_temperature)
        correct, total = sum_over_ranks([topk_correct(scores, val_y, ks=(1,))[1], val.shape[0]], self.device)
        return 100.0 * correct / max(total, 1)
