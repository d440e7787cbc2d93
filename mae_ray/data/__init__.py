"""Shards in, tensors out: the shard format and its strict reader (shards), the loader (equal batches per
rank, exact-once evaluation) and the transforms.

Knows nothing of the model or Ray.
"""
