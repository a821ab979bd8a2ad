"""Injective: elementwise, broadcast, lookup-table gathers, layout changes, resize, concat."""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

from ._common import (
    InPlaceRule,
    inline_except_expanding,
    parallel_interleaved,
    parallel_vectorize,
    upsampling_factor,
    vector_lanes,
)


class Injective(InPlaceRule):
    """Inline what inlines; each remaining block: outer loops parallel, inner vectorized.

    A non-trivial block read through an upsampling (index divisions) is not inlined into it:
    it is computed at its own resolution, once (:func:`._common.inline_except_expanding`);
    the block that reads it runs its rows in steps of the upsampling factor and leaves the
    vectorization to LLVM (:func:`._common.parallel_interleaved`).

    Applies to kernels whose blocks are all spatial (no reduction); returns ``None``
    otherwise, and for kernels with symbolic shapes.
    """

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        """Schedule the function of ``sch`` in place; ``False`` (untouched) if it does not apply."""
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return False
        infos = inline_except_expanding(sch, infos)
        lanes = vector_lanes(target)
        for info in infos:
            factor = upsampling_factor(sch, info.block_rv)
            if factor is None or not parallel_interleaved(sch, info.block_rv, factor):
                parallel_vectorize(sch, info.block_rv, lanes)
        return True
