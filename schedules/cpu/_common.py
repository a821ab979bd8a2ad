"""Shared helpers of the CPU rules: loop extents, vector width, parallel thresholds."""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.ir.expr import Call, Expr, TensorLoad
from tvm.ir.prim.expr import BinaryOpExpr, Select
from tvm.s_tir.dlight.base import try_inline
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target import Target
from tvm.target.codegen import llvm_get_vector_width
from tvm_ffi import structural_walk
from tvm_ffi.structural import WalkResult

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


def row_vector_length(n: int, lanes: int) -> int | None:
    """Length of the vectors that a row of ``n`` outputs is computed in, ``None`` if scalar.

    The largest of ``2 * lanes``, ``lanes`` and ``lanes / 2`` that divides ``n`` (whole
    registers or halves); otherwise, a row of at most ``2 * lanes`` is one vector (20 lanes
    of int32 are one register and a quarter; 5 vectors of 4 lanes were 2x slower).
    """
    vec = largest_divisor(n, (2 * lanes, lanes, lanes // 2))
    if vec is None and 4 <= n <= 2 * lanes:
        vec = n
    return vec


def parallel_vectorize(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Fuse the outer loops of ``block`` into one parallel loop; vectorize the innermost.

    A row that no multiple of the lane count divides (a padded row of 87) is vectorized up to
    its last multiple of ``lanes``, the tail partitioned off and left serial (left whole to
    LLVM, the pads' conditional loads stayed scalar: 9.6 against 6.2 us on rec's pads).
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
    if vec is None and extents[-1] > lanes:
        main = extents[-1] - extents[-1] % lanes
        body = sch.loop_partition(inner, [main, None])[0]
        sch.vectorize(sch.split(body, [None, lanes])[1])


# A value this small (cast, offset) is cheaper to recompute than to store and load again.
_CHEAP_OPERATIONS = 2


def _operations(stmt) -> int:
    """Arithmetic operations in the value a block stores (index arithmetic not counted)."""
    count = 0

    def visit(node):
        nonlocal count
        if isinstance(node, TensorLoad):
            return WalkResult.SKIP
        if isinstance(node, (BinaryOpExpr, tirx.Cast, Select, Call)):
            count += 1
        return WalkResult.ADVANCE

    structural_walk(getattr(stmt, "value", stmt), ((Expr,), visit), order="pre")
    return count


def _read_expanding(sch: s_tir.Schedule, block) -> bool:
    """Whether a consumer of ``block`` reads its output the way a resize does: through a
    truncating division or a float computation of its indices.

    Nearest-neighbour resizes read each element of their input several times; inlining an
    expensive producer there recomputes it for every read. (Reshapes, transposes, concats,
    pads and slices index with affine maps or floor division and modulo, one read per
    element, and are not matched.)
    """
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    buf = stmt.writes[0].source
    found = False

    def expanding(_node):  # a truncating division or a cast from float
        nonlocal found
        found = True

    def load(node):
        if node.source.same_as(buf):
            for idx in node.indices:
                structural_walk(idx, ((tirx.Div, tirx.Cast), expanding))

    for consumer in sch.get_consumers(block):
        structural_walk(sch.get(consumer).body, ((TensorLoad,), load))
    return found


def upsampling_factor(sch: s_tir.Schedule, block) -> int | None:
    """The row's repetition factor of a block that reads an input upsampled along its last
    axis (an index ``x // k`` of its last loop variable, ``k`` constant): the least common
    multiple of those ``k``, or ``None``."""
    import math

    stmt = sch.get(block)
    if not stmt.iter_vars:
        return None
    last = stmt.iter_vars[-1].var
    factors = []

    def div(node):
        if node.a.same_as(last) and isinstance(node.b, tirx.IntImm) and int(node.b) > 1:
            factors.append(int(node.b))

    def load(node):
        if node.indices:
            structural_walk(node.indices[-1], ((tirx.Div, tirx.FloorDiv), div))

    structural_walk(stmt.body, ((TensorLoad,), load))
    return math.lcm(*factors) if factors else None


def parallel_interleaved(sch: s_tir.Schedule, block, factor: int) -> bool:
    """Outer loops parallel; the row in steps of ``factor`` (unrolled inside), vectorized by
    LLVM rather than by TVM: the upsampled input is then read contiguously and the outputs
    stored as an interleaved group (shuffles). TVM's own vectorization reads the upsampled
    input with one scalar load per lane (2x slower on det's FPN adds). ``False`` (untouched)
    if the row is not a multiple of ``factor``."""
    loops = sch.get_loops(block)
    extents = [extent(sch, lp) for lp in loops]
    if not loops or any(e is None for e in extents) or extents[-1] % factor or factor > 16:
        return False
    total = 1
    for e in extents:
        total *= e
    if len(loops) > 1 and total >= MIN_PARALLEL_ELEMENTS:
        sch.parallel(sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0])
    _, inner = sch.split(loops[-1], [None, factor])
    sch.unroll(inner)
    return True


def inline_except_expanding(sch: s_tir.Schedule, infos: list) -> list:
    """DLight's ``try_inline``, except that a block whose output an upsampling reads (see
    :func:`_read_expanding`) stays materialized when its value is not trivial, so that it is
    computed once per element instead of once per read; returns the remaining blocks."""
    kept, rest = [], []
    for info in infos:
        (kept if _read_expanding(sch, info.block_rv) else rest).append(info)
    if not kept:
        return try_inline(sch, infos)
    rest = try_inline(sch, rest)
    # producers were inlined into the kept blocks: now the cheap ones may go too
    remaining = []
    for info in kept:
        value = sch.get(info.block_rv).body
        if _operations(value) <= _CHEAP_OPERATIONS:
            try:
                sch.compute_inline(info.block_rv)
                continue
            except Exception:
                pass
        remaining.append(info)
    order = {id(i): n for n, i in enumerate(infos)}
    return sorted(remaining + rest, key=lambda i: order[id(i)])


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
