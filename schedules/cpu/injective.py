"""Injective: elementwise, broadcast, lookup-table gathers, layout changes, resize, concat."""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.target import Target

from ._common import InPlaceRule, parallel_vectorize, vector_lanes


class Injective(InPlaceRule):
    """Inline what inlines; each remaining block: outer loops parallel, inner vectorized.

    Applies to kernels whose blocks are all spatial (no reduction); returns ``None``
    otherwise, and for kernels with symbolic shapes.
    """

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        """Schedule the function of ``sch`` in place; ``False`` (untouched) if it does not apply."""
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return False
        infos = try_inline(sch, infos)
        lanes = vector_lanes(target)
        for info in infos:
            parallel_vectorize(sch, info.block_rv, lanes)
        return True
