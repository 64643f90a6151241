"""Batch Renormalization layers, their functional form, schedules and converters."""

from normkit.nn.batchrenorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, SyncBatchRenorm
from normkit.nn.convert import convert_batchnorm, register_converter
from normkit.nn.functional import BatchRenormState, BRNSchedule, batch_renorm, functional_batch_renorm

__all__ = [
    "BRNSchedule",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "BatchRenormState",
    "SyncBatchRenorm",
    "batch_renorm",
    "convert_batchnorm",
    "functional_batch_renorm",
    "register_converter",
]
