"""The training math: the pre-training step and schedules (engine), classification epochs and exact evaluation
(classify), the kNN monitor, the effective-batch and lr recipe.

Knows nothing of Ray or MLflow; tested without either.
"""
