"""normkit: scale control for deep-network training in PyTorch.

The five techniques, each in its module (import from there or from here):

- Batch Renormalization — :mod:`normkit.nn`: ``BatchRenorm2d`` (1d, 3d, Sync), ``convert_batchnorm``
- LSUV initialization — :mod:`normkit.init`: ``lsuv_init``, ``orthogonal_init``
- Equi-normalization — :mod:`normkit.enorm`: ``ENorm``
- SGD-G / Adam-G — :mod:`normkit.optim`: ``SGDG``, ``AdamG``, ``grassmann_param_groups``
- normalized / clipped gradients — :mod:`normkit.optim`: ``NormalizedOptimizer``, ``ClippedOptimizer``
- AdamP / SGDP, sphere projection, LARS / LAMB — :mod:`normkit.optim`: ``AdamP``, ``SGDP``,
  ``scale_invariant_param_groups``, ``SphereProjection``, ``LARS``, ``LAMB``

The training harness (:mod:`normkit.train`, the ``normkit`` command) is not imported here.
"""

from normkit.enorm import ENorm
from normkit.graph import trace
from normkit.init import lsuv_init, orthogonal_init
from normkit.nn import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    BRNSchedule,
    SyncBatchRenorm,
    convert_batchnorm,
    functional_batch_renorm,
)
from normkit.optim import (
    LAMB,
    LARS,
    SGDG,
    SGDP,
    AdamG,
    AdamP,
    ClippedOptimizer,
    NormalizedOptimizer,
    SphereProjection,
    grassmann_param_groups,
    register_norm,
    scale_invariant_param_groups,
)

__version__ = "0.1.0"

__all__ = [
    "LAMB",
    "LARS",
    "SGDG",
    "SGDP",
    "AdamG",
    "AdamP",
    "BRNSchedule",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "ClippedOptimizer",
    "ENorm",
    "NormalizedOptimizer",
    "SphereProjection",
    "SyncBatchRenorm",
    "__version__",
    "convert_batchnorm",
    "functional_batch_renorm",
    "grassmann_param_groups",
    "lsuv_init",
    "orthogonal_init",
    "register_norm",
    "scale_invariant_param_groups",
    "trace",
]
