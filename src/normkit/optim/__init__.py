"""Optimizers: SGD-G / Adam-G on the Grassmann manifold, normalized and clipped gradient wrappers."""

from normkit.optim._nonfinite import NonFiniteGradientError as NonFiniteGradientError
from normkit.optim.grassmann import SGDG as SGDG
from normkit.optim.grassmann import AdamG as AdamG
from normkit.optim.grassmann import grassmann_param_groups as grassmann_param_groups
from normkit.optim.grassmann import orthogonality_penalty as orthogonality_penalty
from normkit.optim.normalized import ClippedOptimizer as ClippedOptimizer
from normkit.optim.normalized import NormalizedOptimizer as NormalizedOptimizer
from normkit.optim.norms import available_norms as available_norms
from normkit.optim.norms import get_norm as get_norm
from normkit.optim.norms import register_norm as register_norm
from normkit.optim.norms import unregister_norm as unregister_norm
