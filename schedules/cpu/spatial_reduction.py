"""SpatialReduction: one reduction with an elementwise epilogue (depthwise/transposed conv, pools).

Schedule, for output loops ``s_0 .. s_k`` and reduction loops ``r_0 .. r_m``::

    parallel for s_0 .. s_{k-1} (fused)        # e.g. channel x output row
      for s_k.outer                           # blocks of V outputs along the row
        init acc[V] = 0
        for r_0 .. r_m                        # e.g. kh, kw
          vectorized for s_k.inner in V: acc += x * w
        vectorized epilogue (bias, requantize, clamp, cast) on the V outputs

so every output row is accumulated in registers and written once, already requantized.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import try_inline
from tvm.target import Target
from tvm_ffi import structural_walk

from ._common import (
    MIN_PARALLEL_ELEMENTS,
    InPlaceRule,
    extent,
    largest_divisor,
    parallel_vectorize,
    row_vector_length,
    vector_lanes,
)


class SpatialReduction(InPlaceRule):
    """Applies to kernels with exactly one reduction block whose loops are all spatial ("S")
    or reduction ("R"), with static extents; other blocks must be elementwise."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        """Schedule the function of ``sch`` in place; ``False`` (untouched) if it does not apply."""
        infos = normalize_prim_func(sch)
        if not infos:
            return False
        reductions = [b for b in infos if not b.is_injective()]
        if len(reductions) != 1:
            return False
        kinds = reductions[0].dom_kind()
        if set(kinds) - {"S", "R"} or "S" not in kinds:
            return False
        loops = sch.get_loops(reductions[0].block_rv)
        if len(loops) != len(kinds) or any(extent(sch, lp) is None for lp in loops):
            return False
        infos = try_inline(sch, infos)
        red = next(b for b in infos if not b.is_injective())
        block = red.block_rv
        loops = sch.get_loops(block)
        s_loops = [lp for lp, k in zip(loops, kinds) if k == "S"]
        r_loops = [lp for lp, k in zip(loops, kinds) if k == "R"]
        sch.reorder(*s_loops, *r_loops)

        lanes = vector_lanes(target)
        last = s_loops[-1]
        n_last = extent(sch, last)
        if _reduces_along_rows(sch.get(block), kinds) and \
                _rows_reduced_in_vectors(sch, infos, red, s_loops, r_loops, lanes):
            return True
        inner = None
        cache = _deinterleave(sch, block, kinds)
        if cache is None and _reads_with_stride(sch.get(block), kinds):
            # a strided read (stride-2 convolution) is a gather, one load per lane:
            # short vectors (the old choice) are faster there
            vec = largest_divisor(n_last, (2 * lanes, lanes, lanes // 2, lanes // 4))
            if vec is None and 4 <= n_last <= 2 * lanes:
                vec = n_last
        else:
            vec = row_vector_length(n_last, lanes)
        if vec is not None and vec >= 4 and n_last > vec:
            outer_last, inner = sch.split(last, [None, vec])
            s_outer = [*s_loops[:-1], outer_last]
        elif vec is not None and vec >= 4:
            inner, s_outer = last, s_loops[:-1]
        else:
            s_outer = s_loops
        if inner is not None:
            sch.reorder(*s_outer, *r_loops, inner)

        total = 1
        for lp in s_loops[:-1]:
            total *= extent(sch, lp)
        anchor = s_outer[-1] if s_outer else None
        if len(s_loops) > 1:
            par = s_loops[:-1]
            fused = sch.fuse(*par) if len(par) > 1 else par[0]
            if total * n_last >= MIN_PARALLEL_ELEMENTS:
                sch.parallel(fused)
            if anchor is None or len(s_outer) == len(par):
                anchor = fused
        if inner is not None:
            sch.vectorize(inner)
        if cache is not None and len(s_loops) > 1:
            sch.compute_at(cache, fused, preserve_unit_loops=True)
            cl = sch.get_loops(cache)
            sch.reorder(cl[-1], cl[-2])  # parity innermost: LLVM deinterleaves with shuffles
        sch.decompose_reduction(block, r_loops[0])

        depth = 0
        if anchor is not None:
            anchor_stmt = sch.get(anchor)
            depth = 1 + next(i for i, lp in enumerate(sch.get_loops(block))
                             if sch.get(lp).same_as(anchor_stmt))
        # epilogues: computed right after each block of outputs, vectorized
        for info in infos:
            if info is red or not info.is_injective():
                continue
            try:
                if anchor is None:
                    raise ValueError("no loop to compute the epilogue at")
                sch.reverse_compute_at(info.block_rv, anchor, preserve_unit_loops=True)
                rest = sch.get_loops(info.block_rv)[depth:]
                n = extent(sch, rest[-1]) if rest else None
                if n and (n <= 4 * lanes or n % lanes == 0):
                    sch.vectorize(rest[-1])
            except Exception:
                parallel_vectorize(sch, info.block_rv, lanes)
        return sch


def _last_var(block, kinds: str, kind: str):
    """The block's last iteration variable of ``kind`` ("S" spatial, "R" reduction)."""
    return [iv.var for iv, k in zip(block.iter_vars, kinds) if k == kind][-1]


def _stride(index, var) -> int:
    """The constant coefficient of ``var`` in ``index`` (0 when not linear in it)."""
    from tvm.sym import detect_linear_equation

    coef = detect_linear_equation(index, [var])
    return int(coef[0]) if len(coef) == 2 and isinstance(coef[0], tirx.IntImm) else 0


def _reduces_along_rows(block, kinds: str) -> bool:
    """Whether the input's contiguous axis is summed over and not an output axis (a global
    mean over H, W): vectorizing the output axis would then gather."""
    from tvm.ir.expr import Var

    s_var, r_var = _last_var(block, kinds, "S"), _last_var(block, kinds, "R")
    out = block.writes[0].source
    found = False
    for region in block.reads:
        if region.source.same_as(out):
            continue
        used = set()
        structural_walk(region.region[-1].min, ((Var,), lambda v: used.add(v)))
        if any(v.same_as(s_var) for v in used):
            return False
        found = found or any(v.same_as(r_var) for v in used)
    return found


def _rows_reduced_in_vectors(sch, infos, red, s_loops, r_loops, lanes) -> bool:
    """A reduction along the input's rows (a global mean: one value per channel):
    its innermost reduction loop is split into vectors of partial sums (``rfactor``), added
    up once at the end. 9x faster than a scalar sum on det's 96x80x80 means. ``False``
    (untouched) if that loop is not a multiple of 8."""
    n_r = extent(sch, r_loops[-1])
    vec = largest_divisor(n_r, (lanes, lanes // 2)) if n_r else None
    if vec is None or vec < 8:
        return False
    total = 1
    for lp in [*s_loops, *r_loops]:
        total *= extent(sch, lp)
    _, r_in = sch.split(r_loops[-1], [None, vec])
    partial = sch.rfactor(r_in, 0)
    outer = sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0]
    if total >= MIN_PARALLEL_ELEMENTS and extent(sch, outer) > 1:
        sch.parallel(outer)
    sch.compute_at(partial, outer)
    lanes_loop, *rest = sch.get_loops(partial)[1:]
    sch.reorder(*rest, lanes_loop)
    sch.vectorize(lanes_loop)
    sch.decompose_reduction(partial, rest[0])
    for info in infos:  # the epilogue, on each finished value
        if info is not red and info.is_injective():
            sch.reverse_compute_at(info.block_rv, outer)
    return True


def _reads_with_stride(block, kinds: str) -> bool:
    """Whether ``block`` reads a buffer at a stride other than 1 along its last spatial axis."""
    var = _last_var(block, kinds, "S")
    return any(abs(_stride(rng.min, var)) > 1 for region in block.reads
               for rng in region.region)


def _deinterleave(sch: s_tir.Schedule, block, kinds: str):
    """A copy of the input read at a stride along the row, deinterleaved, or ``None``."""
    stmt = sch.get(block)
    var = _last_var(stmt, kinds, "S")
    for i, region in enumerate(stmt.reads):
        s = _stride(region.region[-1].min, var)
        if s <= 1:
            continue
        width = region.source.shape[-1]
        if not isinstance(width, tirx.IntImm) or int(width) % s:
            return None  # (an odd width would need a padded copy)
        cache = sch.cache_read(block, i, "global")
        def index_map(*ax):
            return (*ax[:-1], ax[-1] % s, ax[-1] // s)
        ndim = len(region.region)
        imap = tirx.IndexMap.from_func(index_map, ndim=ndim)
        sch.transform_layout(cache, ("write", 0), imap)
        sch.transform_block_layout(cache, imap)
        return cache
    return None
