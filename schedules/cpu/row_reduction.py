"""RowReduction: reductions over the last axis with elementwise steps between (softmax).

A float softmax legalizes into ``max`` (a reduction over the row), ``exp(x - max)``, ``sum``
(a reduction), ``exp / sum`` and whatever elementwise epilogue fused after it (the model's
output quantize/dequantize). DLight's generic CPU reduction rule keeps every step a loop over
the whole tensor and vectorizes the row with a predicate, which LLVM then scalarizes. Here::

    parallel for row (fused leading axes)
      for k: max = max(max, x[row, k])                       # serial reduction
      vectorized for k (the multiple of 16; tail serial): e[k] = exp(x[row, k] - max)
      for k: sum += e[k]                                     # serial reduction
      vectorized for k (same split): out[row, k] = epilogue(e[k] / sum)

every step of a row stays in L1/L2 while the row is processed. Steps read by a reduction
are kept (the exponential is computed once per element); the others are inlined.

A row of at least ``4 * lanes`` elements (rec's output softmax: 40 rows of 6625 classes)
makes the serial ``max`` and ``sum`` latency-bound: each element waits for the previous
one. There each reduction keeps ``lanes`` partial results instead (``rfactor``: a vector
of maxima or sums over the row, its lanes combined at the end), and every step is a
parallel loop over the rows of its own::

    parallel for row: vectorized partial[lane] = max(partial[lane], x[row, 16 k + lane])
    parallel for row: max = max over the 16 lanes
    parallel for row: e = exp(x - max), vectorized      (and the sum likewise)
    parallel for row: out = epilogue(e / sum), vectorized

rec's 40 x 6625 softmax: 227 -> 124 us. The sum's order changes (16 interleaved partial
sums): about 1e-6 relative.

Vectorized ``exp`` needs :class:`tvm.relax.transform.FastMathTransform` (a polynomial
``fast_exp``): LLVM's ``exp`` on vectors is a call of ``expf`` per lane.
"""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target import Target

from ._common import MIN_PARALLEL_ELEMENTS, InPlaceRule, extent, vector_lanes


class RowReduction(InPlaceRule):
    """Applies to kernels whose blocks all iterate ``rows x L`` (the same leading spatial
    extents; the last axis spatial, or a reduction in at least one block), static shapes."""

    def schedule(self, sch: s_tir.Schedule, target: Target) -> bool:
        """Schedule the function of ``sch`` in place; ``False`` (untouched) if it does not apply."""
        infos = normalize_prim_func(sch)
        if not infos or all(b.is_injective() for b in infos):
            return False
        rows = None
        for info in infos:
            kinds = info.dom_kind()
            loops = sch.get_loops(info.block_rv)
            extents = [extent(sch, lp) for lp in loops]
            if len(kinds) < 2 or len(loops) != len(kinds) or None in extents or \
                    set(kinds[:-1]) != {"S"} or kinds[-1] not in "SR":
                return False
            if rows is None:
                rows = extents[:-1]
            elif extents[:-1] != rows:
                return False
        if infos[-1].dom_kind()[-1] != "S":
            return False

        blocks = self._inline(sch, infos)
        lanes = vector_lanes(target)
        last = blocks[-1]
        loops = sch.get_loops(last.block_rv)
        if (extent(sch, loops[-1]) or 0) >= 4 * lanes:
            self._reduce_in_partials(sch, blocks, lanes)
            return True
        row = sch.fuse(*loops[:-1]) if len(loops) > 2 else loops[0]
        n_rows = 1
        for e in rows:
            n_rows *= e
        length = extent(sch, loops[-1])
        if n_rows > 1 and n_rows * length >= MIN_PARALLEL_ELEMENTS:
            sch.parallel(row)
        for info in reversed(blocks[:-1]):
            sch.compute_at(info.block_rv, row, preserve_unit_loops=True)
        for info in blocks:
            if info.dom_kind()[-1] == "S":
                self._vectorize_row(sch, info.block_rv, lanes)
        return True

    @staticmethod
    def _inline(sch: s_tir.Schedule, infos: list) -> list:
        """Inline the elementwise steps that no reduction reads; return the rest in order."""
        def reads_into_reduction(info) -> bool:
            consumers = sch.get_consumers(info.block_rv)
            return any(sch.get(c).name_hint in reductions for c in consumers)

        reductions = {sch.get(b.block_rv).name_hint for b in infos if not b.is_injective()}
        remaining = list(infos)
        changed = True
        while changed:
            changed = False
            for info in remaining[:-1]:
                if not info.is_injective() or reads_into_reduction(info):
                    continue
                try:
                    sch.compute_inline(info.block_rv)
                except Exception:
                    continue
                remaining.remove(info)
                changed = True
                break
        # the epilogue after the last step folds into it
        while len(remaining) > 1 and remaining[-1].is_injective():
            try:
                sch.reverse_compute_inline(remaining[-1].block_rv)
            except Exception:
                break
            remaining.pop()
        return remaining

    @staticmethod
    def _reduce_in_partials(sch: s_tir.Schedule, blocks: list, lanes: int) -> None:
        """Long rows: each reduction in ``lanes`` partial results (``rfactor``), each step a
        parallel loop over the rows (see the module docstring)."""
        def rows_parallel(block):
            loops = sch.get_loops(block)
            rows = loops[:-1] if len(loops) > 1 else loops
            row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
            if (extent(sch, row) or 1) > 1:
                sch.parallel(row)

        for info in blocks:
            if info.is_injective():
                rows_parallel(info.block_rv)
                RowReduction._vectorize_row(sch, info.block_rv, lanes)
                continue
            # (the row's last partial vector reads past its end under a predicate: the
            # split's, which rfactor keeps; the vectorized loop honours it)
            _, k_in = sch.split(sch.get_loops(info.block_rv)[-1], [None, lanes])
            partial = sch.rfactor(k_in, 0)
            *rows, k_out, k_lane = sch.get_loops(partial)
            row = sch.fuse(*rows) if len(rows) > 1 else rows[0]
            if (extent(sch, row) or 1) > 1:
                sch.parallel(row)
            sch.vectorize(k_lane)
            sch.decompose_reduction(partial, k_out)
            rows_parallel(info.block_rv)

    @staticmethod
    def _vectorize_row(sch: s_tir.Schedule, block, lanes: int) -> None:
        """Vectorize the row loop of a spatial step: its multiple of ``lanes``, tail serial."""
        inner = sch.get_loops(block)[-1]
        length = extent(sch, inner)
        if length is None or length < lanes:
            return
        main = length - length % lanes
        if main != length:
            inner = sch.loop_partition(inner, [main, None])[0]
        _, vec = sch.split(inner, [None, lanes])
        sch.vectorize(vec)
