"""Shared helpers of the CPU rules: loop extents, vector width, parallel thresholds."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width

# Below this many output elements a kernel runs on one thread: waking the pool costs more.
MIN_PARALLEL_ELEMENTS = 4096


def extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def vector_lanes(target: Target, dtype_bits: int = 32) -> int:
    """Lanes of ``dtype_bits``-wide elements in one vector register of ``target``."""
    try:
        width = int(llvm_get_vector_width(target))
    except Exception:
        width = 128
    return max(1, max(width, 128) // dtype_bits)


def largest_divisor(n: int, candidates) -> int | None:
    for c in candidates:
        if n % c == 0:
            return c
    return None


def parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse the outer loops of ``block`` into one parallel loop; vectorize the innermost.

    The innermost loop is vectorized only when a multiple of the lane count divides it
    (otherwise LLVM's own loop vectorizer sees a plain serial loop).
    """
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [extent(sch, lp) for lp in loops]
    if any(e is None for e in extents):
        return
    total = 1
    for e in extents:
        total *= e
    inner = loops[-1]
    vec = largest_divisor(extents[-1], (4 * lanes, 2 * lanes, lanes))
    if vec is not None and extents[-1] > vec:
        _, inner = sch.split(inner, [None, vec])
        loops = sch.get_loops(block)
    if vec is not None:
        sch.vectorize(inner)
        outer = loops[:-1]
    else:
        outer = loops[:-1]
    if total >= MIN_PARALLEL_ELEMENTS and outer:
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])


class InPlaceRule(CPUScheduleRule):
    """A DLight CPU rule written as ``schedule(sch, target) -> bool`` on a given schedule.

    ``apply`` (DLight's contract: a new schedule or ``None``) wraps it; the in-place form lets
    the same rule work on a schedule someone else owns (a tuning space, a test).
    """

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        return sch if self.schedule(sch, target) else None

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        """Schedule the function of ``sch`` in place; ``False`` (untouched) if it does not apply."""
        raise NotImplementedError
