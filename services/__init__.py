"""Boomerang core: layer plans, variant assembly, engine, training and evaluation."""
