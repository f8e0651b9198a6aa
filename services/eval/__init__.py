"""Evaluation: the interpolation curve of a family against naive pruning."""
