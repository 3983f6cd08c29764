"""Checkpoint file formats: readers that turn files into (transformers name, tensor) pairs; no model code."""
