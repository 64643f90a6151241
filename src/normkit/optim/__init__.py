"""Optimizers: SGD-G / Adam-G on the Grassmann manifold, normalized and clipped gradient wrappers."""

from normkit.optim.grassmann import SGDG as SGDG
from normkit.optim.grassmann import AdamG as AdamG
from normkit.optim.grassmann import grassmann_param_groups as grassmann_param_groups
from normkit.optim.grassmann import orthogonality_penalty as orthogonality_penalty
