"""Batch Renormalization layers and converters."""

from normkit.nn.batchrenorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SyncBatchRenorm
from normkit.nn.convert import convert_batchnorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "SyncBatchRenorm", "convert_batchnorm"]
