"""Offline data tools: write, verify and generate WebDataset shards (see docs/data_tools.md)."""

__version__ = "0.1.0"
