"""Sequence operators: the selective scan of the Mamba blocks (METHOD §6)."""

from semi_llie.ops.chunked import selective_scan_chunked
from semi_llie.ops.reference import selective_scan_reference
from semi_llie.ops.selective_scan import BACKENDS, kernel_available, selective_scan

__all__ = [
    "BACKENDS",
    "kernel_available",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_reference",
]
