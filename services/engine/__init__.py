"""Inference: batching scheduler, decode loop, scoring, behind the `Engine` interface."""
