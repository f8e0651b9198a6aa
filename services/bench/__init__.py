"""`boomerang bench`: what serving a family buys, measured against baselines in the same run."""
