"""Shards in, tensors out: the tar shard loader (equal batches per rank, exact-once evaluation) and the transforms.

Knows nothing of the model or Ray.
"""
