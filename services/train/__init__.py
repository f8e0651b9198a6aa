"""Offline boomerang distillation: `boomerang train` / `python -m services.train`."""
