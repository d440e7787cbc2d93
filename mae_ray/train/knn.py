"""Measures of frozen features: weighted kNN accuracy, the cheap online monitor of pre-training, and a
plain logistic regression, the yardstick the linear-probe job is held to (docs/results.md).

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
import torch.distributed as dist
import torch.nn.functional as F

from mae_ray.data.loader import make_eval_loader
from mae_ray.data.transforms import eval_transform


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


def plain_probe_top1(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                     num_classes: int, steps: int = 1000) -> float:
    """Val top-1 (%) of a plain logistic regression on (features, labels) pairs: features standardised with
    the training set's statistics, one linear layer trained full-batch with AdamW (lr 1e-2, weight decay
    1e-4, seed 0; its val accuracy settles by 300-1000 steps). No BatchNorm, LARS, schedule or batches:
    what the linear-probe job's recipe should reach on the same features (issue 14)."""
    (xtr, ytr), (xva, yva) = train, val
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xva = (xtr - mean) / std, (xva - mean) / std
    with torch.random.fork_rng(devices=[]):  # seed 0 without touching the caller's generator
        torch.manual_seed(0)
        head = torch.nn.Linear(xtr.shape[1], num_classes, device=xtr.device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(head(xtr), ytr).backward()
            opt.step()
    with torch.no_grad():
        return (head(xva).argmax(1) == yva).float().mean().item() * 100


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (ranks may hold different numbers of rows)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])


def sum_over_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


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
