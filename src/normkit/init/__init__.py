"""LSUV and orthogonal initialization (Mishkin & Matas, ICLR 2016; Saxe et al. 2014)."""

from normkit.init.lsuv import LayerStatus, LSUVError, LSUVLayerRecord, LSUVReport, lsuv_init
from normkit.init.orthogonal import orthogonal_init, orthogonal_matrix, orthogonal_weight

__all__ = [
    "LSUVError",
    "LSUVLayerRecord",
    "LSUVReport",
    "LayerStatus",
    "lsuv_init",
    "orthogonal_init",
    "orthogonal_matrix",
    "orthogonal_weight",
]
