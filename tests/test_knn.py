"""Weighted kNN: known neighbours give the known answer."""

from __future__ import annotations

import torch

from mae_ray.knn import knn_scores, topk_correct


def test_nearest_neighbours_vote_with_exp_similarity_weights():
    # bank: class 0 along +x, class 1 along +y, class 2 along -x
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.1]])
    scores = knn_scores(bank, labels, queries, num_classes=3, k=2, temperature=0.07)
    assert scores.argmax(dim=1).tolist() == [0, 1, 2]
    # exact weights for the first query: its two neighbours are bank rows 0 and 1 (both class 0)
    q = torch.nn.functional.normalize(queries[:1], dim=1)
    b = torch.nn.functional.normalize(bank[:2], dim=1)
    expected = (q @ b.T / 0.07).exp().sum()
    assert torch.allclose(scores[0, 0], expected) and scores[0, 1] == 0 and scores[0, 2] == 0


def test_k_limits_the_vote_and_temperature_sharpens_it():
    bank = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6], [0.8, 0.6]])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert knn_scores(bank, labels, query, 2, k=1).argmax().item() == 0  # only the closest votes
    assert knn_scores(bank, labels, query, 2, k=4, temperature=1.0).argmax().item() == 1  # three mild votes win
    assert knn_scores(bank, labels, query, 2, k=4, temperature=0.01).argmax().item() == 0  # a sharp vote wins


def test_topk_correct_counts():
    scores = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]])
    labels = torch.tensor([0, 1, 2])
    assert topk_correct(scores, labels, ks=(1, 2)) == {1: 1, 2: 3}
