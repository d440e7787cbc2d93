"""Weighted kNN: known neighbours give the known answer."""

from __future__ import annotations

import torch

from mae_ray.train.knn import knn_scores, topk_correct


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



def test_online_monitor_over_the_demo_shards_finds_each_image_itself(demo_data):
    """KnnMonitor end to end (loaders, features, labels, vote) on the demo shards: with the validation
    images as the bank and k=1, every query's nearest neighbour is itself, so top-1 is exactly 100 %.
    Features and labels that drifted apart anywhere on the way would score near chance (10 %)."""
    from mae_ray.config import load_config
    from mae_ray.model.mae import build_model
    from mae_ray.train.knn import KnnMonitor

    cfg = load_config(None, [f"data.train_shards={demo_data['val']}", f"data.val_shards={demo_data['val']}",
                             "data.num_workers=0", "eval.knn_k=1", "eval.knn_train_samples=300",
                             "eval.knn_val_samples=300", "train.knn_every=1"])
    torch.manual_seed(0)
    model = build_model("mae_vit_micro_patch4")  # random init: distinct images give distinct features
    assert KnnMonitor(cfg, rank=0, world_size=1, device=torch.device("cpu"), img_size=32).run(model) == 100.0
