"""Optimizers: SGD-G / Adam-G on the Grassmann manifold, normalized and clipped gradient wrappers,
AdamP / SGDP, sphere projection, LARS / LAMB."""

from normkit.optim._nonfinite import NonFiniteGradientError as NonFiniteGradientError
from normkit.optim.adamp import SGDP as SGDP
from normkit.optim.adamp import AdamP as AdamP
from normkit.optim.adamp import scale_invariant_param_groups as scale_invariant_param_groups
from normkit.optim.adamp import scale_invariant_weights as scale_invariant_weights
from normkit.optim.grassmann import SGDG as SGDG
from normkit.optim.grassmann import AdamG as AdamG
from normkit.optim.grassmann import grassmann_param_groups as grassmann_param_groups
from normkit.optim.grassmann import orthogonality_penalty as orthogonality_penalty
from normkit.optim.lars import LAMB as LAMB
from normkit.optim.lars import LARS as LARS
from normkit.optim.lars import trust_ratio_param_groups as trust_ratio_param_groups
from normkit.optim.normalized import ClippedOptimizer as ClippedOptimizer
from normkit.optim.normalized import NormalizedOptimizer as NormalizedOptimizer
from normkit.optim.norms import available_norms as available_norms
from normkit.optim.norms import get_norm as get_norm
from normkit.optim.norms import register_norm as register_norm
from normkit.optim.norms import unregister_norm as unregister_norm
from normkit.optim.sphere import SphereProjection as SphereProjection
