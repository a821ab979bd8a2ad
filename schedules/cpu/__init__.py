"""Default schedules for any LLVM CPU target, applied at build time (DLight-style, no tuning).

TVM 0.27 builds Relax modules for CPUs with unscheduled kernels: one thread, reduction loops
innermost, nothing vectorized on purpose. These rules give every fused kernel that no
tensorized rule claimed a sane schedule, so that an integer model is fast on a fresh machine
before anyone tunes it:

- :class:`.SpatialReduction`: one reduction block with an elementwise epilogue (depthwise and
  transposed convolutions, pooling, mean): outer spatial loops in parallel, the reduction
  loops outside a vectorized row of outputs, the epilogue computed row by row.
- :class:`.RowReduction`: softmax-like kernels (reductions over the last axis with
  elementwise steps between): rows in parallel, each row's steps one after the other,
  the elementwise steps vectorized.
- :class:`.Injective`: elementwise, broadcast, gather (lookup tables), layout and resize
  kernels: outer loops in parallel, inner loop vectorized.

Each rule follows DLight's contract (``apply(func, target, tunable)`` returns a schedule or
``None``) and is used through ``tvm.s_tir.dlight.ApplyDefaultSchedule`` by
:func:`tvmquant.schedules.build_pipeline`.
"""

from .injective import Injective
from .row_reduction import RowReduction
from .spatial_reduction import SpatialReduction

__all__ = ["Injective", "RowReduction", "SpatialReduction", "default_rules"]


def default_rules() -> list:
    """The CPU rules in the order they are tried (the first that applies wins)."""
    from tvm.s_tir import dlight

    return [SpatialReduction(), RowReduction(), dlight.cpu.Reduction(), Injective()]
