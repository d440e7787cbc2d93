"""The MAE model (masking, loss), its presets, weights I/O and timm export, FLOPs, reconstruction pictures.

Knows nothing of Ray, MLflow or the data pipeline.
"""
