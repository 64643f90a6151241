"""Optimizers: SGD-G / Adam-G on the Grassmann manifold, normalized and clipped gradient wrappers."""
