"""u8 x s8 -> s32 dense (matmul) kernels for x86, tensorized with AVX-512 VNNI ``vpdpbusd``.

Computes ``C[M, N] = epilogue(A[M, K] @ W^T)`` with

- ``A``: uint8 activations, row-major ``[M, K]`` (any ``M``, ``K``);
- ``W``: int8 weights **pre-packed** by :func:`pack_weight` into
  ``[ceil(N/16), ceil(K/4), 16, 4]``: ``packed[n // 16, k // 4, n % 16, k % 4] = w[n, k]``,
  zero padded, so that each 16 (outputs) x 4 (reduction) block that one ``vpdpbusd`` consumes
  is 64 contiguous bytes;
- the optional fused epilogue (per output column ``n``), the same arithmetic as
  :func:`tvmquant.numerics.requantize` and ``LowerToIntegerOnly``::

      acc = acc + bias[n]                                   (int32, wrapping)
      y   = (int64(acc) * m0[n] + (shift[n] > 0 ? 1 << (shift[n] - 1) : 0)) >> shift[n]
      out = cast(clip(y + zero_point, lo, hi), out_dtype)   (uint8, int8 or int16)
      out = lut[clip(out + lut_offset, 0, lut_size - 1)]    (optional: a lookup table)
      out = integer_gate(out, gate)                         (or optional: an integer gate)

PrimFunc parameters, in order: ``A, W, [bias], [m0, shift], [lut | gate], C`` (``bias``,
``m0`` and ``shift`` are int32 ``[N]``; ``zero_point``, ``lo``, ``hi`` are compile-time
constants; the lookup table, when :class:`Requant` has one, is a 1-D input of ``lut_size``
values: the 16-bit lookup tables of sigmoid, ... that ``LowerToIntegerOnly`` makes, applied
in the epilogue instead of as a separate gather over an int16 tensor. An integer gate
(:class:`Gate`, hard-swish in integers: :func:`tvmquant.numerics.integer_gate`) takes its
parameters as an int32 input of :data:`GATE_SIZE` values, in the order of
:data:`tvmquant.numerics.GATE_PARAMS`, so that layers of one shape share a kernel.)

Schedule: output tiles of ``mb`` rows x ``nb * 16`` columns, accumulated in registers
(``mb * nb`` zmm accumulators), tiles spread over the cores with a parallel outer loop, full
reduction over ``K`` inside the tile (``k`` outer, then ``mb`` x ``nb`` unrolled
``vpdpbusd``: ``nb`` 64-byte weight loads and ``mb`` 4-byte broadcasts per step), then the
epilogue on the tile while it is still in L1 (with ``isa="avx2"``: after all tiles, rows in
parallel; see :func:`schedule_int8_dense`). Tails never put a predicate in the hot loop:
the accumulator covers ``ceil(M/mb)*mb`` rows and ``ceil(N/(16 nb))*16 nb`` columns, the extra
ones re-reading row ``M-1`` / the last weight block (clamped indices), and ``C`` keeps the
``M x N`` part. Optional ``kc`` blocks the reduction (see :func:`schedule_int8_dense`).

Threads: TVM's CPU runtime uses half the logical CPUs by default on x86 (it assumes SMT), i.e.
ONE thread on a 2-vCPU machine; set ``TVM_NUM_THREADS`` (before the runtime starts) to use all.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from tvmquant.numerics import GATE_PARAMS, Dyadic, integer_gate, requantize

from .vnni_intrin import (
    AVX2_INTRIN,
    AVX2_LANES,
    AVX2_WIDE_INTRIN,
    DOT_K,
    VNNI_INTRIN,
    VNNI_LANES,
)

LANES = VNNI_LANES  # 16 output columns per vpdpbusd
KBLOCK = DOT_K  # 4 reduction elements per lane


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def packed_weight_shape(n: int, k: int) -> tuple[int, int, int, int]:
    """Shape of :func:`pack_weight`'s result for an ``N x K`` weight."""
    return (_ceil_to(n, LANES) // LANES, _ceil_to(k, KBLOCK) // KBLOCK, LANES, KBLOCK)


def pack_weight(w: np.ndarray, layout: str, isa: str = "avx512_vnni") -> np.ndarray:
    """Pack an int8 weight into ``[ceil(N/16), ceil(K/4), 16, 4]`` (zero padded); with
    ``isa="avx2"`` widened to int16 in reduction pairs, ``[.., 2, 16, 2]``
    (:data:`.vnni_intrin.AVX2_INTRIN`).

    ``layout`` says how ``w`` is laid out: ``"NK"`` (out, in: ``nn.Linear``/dense) or
    ``"KN"`` (in, out: the ``B`` of ``matmul(A, B)``). It is required, because a square
    weight cannot tell.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"pack_weight wants a 2-D weight, got shape {w.shape}")
    if w.dtype != np.int8:
        raise TypeError(f"pack_weight wants int8 weights, got {w.dtype}")
    if layout == "KN":
        w = w.T
    elif layout != "NK":
        raise ValueError(f"layout must be 'NK' or 'KN', got {layout!r}")
    n, k = w.shape
    np_, kp = _ceil_to(n, LANES), _ceil_to(k, KBLOCK)
    padded = np.zeros((np_, kp), dtype=np.int8)
    padded[:n, :k] = w
    packed = padded.reshape(np_ // LANES, LANES, kp // KBLOCK, KBLOCK).transpose(0, 2, 1, 3)
    if isa == "avx2":  # [.., 16, (2, 2)] -> [.., 2 pairs, 16, 2], int16
        packed = packed.reshape(*packed.shape[:2], LANES, 2, 2).transpose(0, 1, 3, 2, 4) \
            .astype(np.int16)
    return np.ascontiguousarray(packed)


def unpack_weight(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of ``pack_weight(w, "NK")``: the ``[N, K]`` weight."""
    nb, kb, lanes, kblk = packed.shape
    return packed.transpose(0, 2, 1, 3).reshape(nb * lanes, kb * kblk)[:n, :k]


GATE_SIZE = len(GATE_PARAMS)


@dataclass(frozen=True)
class Gate:
    """Compile-time part of an integer gate after the requantization: the output's dtype
    and clamp (its other parameters are an input, see the module docstring)."""

    out_dtype: str = "uint8"
    lo: int = 0
    hi: int = 255

    def __post_init__(self):
        if self.out_dtype not in ("uint8", "int8"):
            raise ValueError(f"a gate writes uint8 or int8, got {self.out_dtype}")
        info = np.iinfo(self.out_dtype)
        if not (info.min <= self.lo <= self.hi <= info.max):
            raise ValueError(f"gate clamp [{self.lo}, {self.hi}] outside {self.out_dtype}")


@dataclass(frozen=True)
class Requant:
    """Compile-time part of the fused dyadic requantization (``m0``, ``shift`` are inputs)."""

    zero_point: int
    lo: int
    hi: int
    out_dtype: str = "uint8"  # "uint8", "int8", or "int16" (the input of a 16-bit lookup table)
    lut_size: int = 0
    """Entries of a lookup table applied after the clamp (0: none); the table is an input."""
    lut_offset: int = 0
    """Added to the clamped value to index the table (indices are then clipped to it)."""
    lut_dtype: str = "uint8"
    gate: Gate | None = None
    """An integer gate applied after the clamp (None: none)."""
    high_word: bool = False
    """Every channel's shift is in 33..62 (the caller checked the constants): the product's
    high word alone gives the same result, ``(hi32(x * m0) + 2^(s - 33)) >> (s - 32)``, in
    int32 (the rounding constant ``2^(s - 1)`` is a multiple of ``2^32``, so the low word
    cannot carry into it). AVX2 has no 64-bit arithmetic shift: there the int64 form costs
    about twice as many instructions."""
    scaled: bool = False
    """With ``high_word``: shifts from 3 up (the layers before an integer gate have shifts
    below 33 on some channels, 33 or more on others). A channel with a shift ``s`` below 33
    first clips its sum to ``+-(2^31 - 1) >> p`` and multiplies it by ``2^p``, ``p = 33 - s``,
    which makes its shift 33 with the same quotient; the clip is exact where the caller
    checked that it only cuts sums whose output clamps anyway
    (:func:`scaled_high_word_is_exact`)."""

    def __post_init__(self):
        if self.out_dtype not in ("uint8", "int8", "int16"):
            raise ValueError(f"out_dtype must be uint8, int8 or int16, got {self.out_dtype}")
        info = np.iinfo(self.out_dtype)
        if not (info.min <= self.lo <= self.hi <= info.max):
            raise ValueError(f"clamp [{self.lo}, {self.hi}] outside {self.out_dtype}")
        if self.lut_size < 0 or (self.lut_size and self.lut_dtype not in ("uint8", "int8")):
            raise ValueError(f"lookup table of {self.lut_size} {self.lut_dtype} values: "
                             "need a positive size and uint8 or int8 values")
        if self.lut_size and self.gate is not None:
            raise ValueError("a lookup table or a gate, not both")
        if self.scaled and not self.high_word:
            raise ValueError("scaled is a form of the high-word requantization: set high_word")

    @property
    def result_dtype(self) -> str:
        """The kernel's output dtype: the table's with a lookup table, the gate's with a
        gate, else ``out_dtype``."""
        if self.gate is not None:
            return self.gate.out_dtype
        return self.lut_dtype if self.lut_size else self.out_dtype

    @property
    def has_activation(self) -> bool:
        """Whether a lookup table or a gate follows the requantization."""
        return bool(self.lut_size) or self.gate is not None


def epilogue_reference(
    acc: np.ndarray,
    bias: np.ndarray | None = None,
    m0: np.ndarray | None = None,
    shift: np.ndarray | None = None,
    requant: Requant | None = None,
    axis: int = -1,
    lut: np.ndarray | None = None,
) -> np.ndarray:
    """NumPy reference of the fused epilogue on int32 accumulators (channels on ``axis``);
    ``lut`` is the lookup table, or the gate's parameters, when ``requant`` has one."""
    acc = np.asarray(acc, dtype=np.int32)
    shape = [1] * acc.ndim
    shape[axis] = -1
    if bias is not None:
        b = np.asarray(bias, np.int64).reshape(shape)
        acc = (acc.astype(np.int64) + b).astype(np.int32)  # int32 wrap-around
    if requant is None:
        return acc
    d = Dyadic(m0=np.asarray(m0, np.int64), shift=np.asarray(shift, np.int64))
    y = requantize(acc, d, requant.zero_point, requant.lo, requant.hi, axis=axis % acc.ndim)
    y = y.astype(requant.out_dtype)
    if requant.lut_size:
        if lut is None or lut.shape != (requant.lut_size,):
            raise ValueError(f"need a lookup table of {requant.lut_size} values")
        idx = np.clip(y.astype(np.int64) + requant.lut_offset, 0, requant.lut_size - 1)
        y = np.asarray(lut)[idx].astype(requant.lut_dtype)
    elif requant.gate is not None:
        if lut is None or np.shape(lut) != (GATE_SIZE,):
            raise ValueError(f"need the gate's {GATE_SIZE} parameters")
        g = requant.gate
        y = integer_gate(y, lut, g.lo, g.hi).astype(g.out_dtype)
    return y


def _epilogue_params(n: int, bias: bool, requant: Requant | None, params: list):
    """The epilogue's inputs (int32 ``[n]`` ``bias``, ``m0``, ``shift`` and the lookup table
    or the gate's parameters; ``None`` when not used), appended to ``params`` in the kernels'
    parameter order."""
    b_t = m0_t = sh_t = lut_t = None
    if bias:
        b_t = te.placeholder((n,), "int32", name="bias")
        params.append(b_t)
    if requant is not None:
        m0_t = te.placeholder((n,), "int32", name="m0")
        sh_t = te.placeholder((n,), "int32", name="shift")
        params += [m0_t, sh_t]
        if requant.lut_size:
            lut_t = te.placeholder((requant.lut_size,), requant.lut_dtype, name="lut")
            params.append(lut_t)
        elif requant.gate is not None:
            lut_t = te.placeholder((GATE_SIZE,), "int32", name="gate")
            params.append(lut_t)
    return b_t, m0_t, sh_t, lut_t


def split_activation(requant: Requant | None, act):
    """``(now, later)``: a kernel that transposes its output looks a table up after the
    transpose (``later``), in channel-plane order, but computes a gate on the accumulator's
    vectors (``now``)."""
    if requant is not None and requant.gate is not None:
        return act, None
    return None, act


def scaled_high_word_is_exact(m0: np.ndarray, shift: np.ndarray, requant: Requant) -> bool:
    """Whether ``Requant.scaled`` gives the int64 form's result on every channel and every
    int32 sum: shifts in 3..62, and each clip (``+-(2^31 - 1) >> p``) only cuts sums whose
    output the clamp holds at the value it has at the clip (the requantization rises with
    the sum, so all sums beyond the clip clamp alike when the clip and the int32 end do)."""
    m0, shift = np.asarray(m0), np.asarray(shift)
    if not len(shift) or int(shift.min()) < 3 or int(shift.max()) > 62 or int(m0.min()) < 0:
        return False

    def out(x: int, m: int, s: int) -> int:  # Python integers: no overflow
        y = (x * m + (1 << (s - 1))) >> s
        return min(max(y + requant.zero_point, requant.lo), requant.hi)

    for m, s in zip(m0.tolist(), shift.tolist()):
        c = (2**31 - 1) >> max(33 - s, 0)
        if out(c, m, s) != out(2**31 - 1, m, s) or out(-c, m, s) != out(-(2**31), m, s):
            return False
    return True


def _epilogue_expr(x, n, bias, m0, shift, requant: Requant | None, lut=None):
    if bias is not None:
        # int32 wrap-around, as the graph's int32 add: summed in int64 and truncated, since
        # LLVM takes a plain int32 add as never overflowing and may widen it before the
        # int64 multiply (a dead channel of PP-OCR rec has a bias of -2**31 + 1523)
        x = (x.astype("int64") + bias[n].astype("int64")).astype("int32")
    if requant is None:
        return x
    if requant.high_word:
        one = tirx.const(1, "int32")
        if requant.scaled:  # shift s < 33: clip, then x * 2^(33 - s) with shift 33
            p = tirx.max(tirx.min(tirx.const(33, "int32") - shift[n],
                                  tirx.const(30, "int32")), tirx.const(0, "int32"))
            c = tirx.shift_right(tirx.const(2**31 - 1, "int32"), p)
            x = tirx.shift_left(tirx.max(tirx.min(x, c), tirx.const(0, "int32") - c), p)
        hi = tirx.shift_right(x.astype("int64") * m0[n].astype("int64"),
                              tirx.const(32, "int64")).astype("int32")
        # (bounded although every shift is in 33..62: with a run-time shift amount that the
        # simplifier cannot bound, it dropped the clamp after it, and bytes wrapped)
        sh = tirx.max(tirx.min(shift[n] - 32, tirx.const(30, "int32")), one)
        y = tirx.shift_right(hi + tirx.shift_left(one, sh - one), sh)
        y = y + tirx.const(requant.zero_point, "int32")
        y = tirx.max(tirx.min(y, tirx.const(requant.hi, "int32")),
                     tirx.const(requant.lo, "int32"))
    else:
        sh = shift[n].astype("int64")
        one = tirx.const(1, "int64")
        half = tirx.if_then_else(sh > 0, tirx.shift_left(one, sh - one),
                                 tirx.const(0, "int64"))
        y = tirx.shift_right(x.astype("int64") * m0[n].astype("int64") + half, sh)
        y = y + tirx.const(requant.zero_point, "int64")
        y = tirx.max(tirx.min(y, tirx.const(requant.hi, "int64")),
                     tirx.const(requant.lo, "int64"))
    if lut is None:  # (a conv looks its table up later, in channel-plane order)
        return y.astype(requant.out_dtype)
    return _activation(y, requant, lut)


def _integer_gate(y, gate: Gate, params):
    """The gate (:func:`tvmquant.numerics.integer_gate`) on a clamped value ``y``, in int32
    (its ``shift`` is at least 1, as ``LowerToIntegerOnly`` and the dispatcher make sure)."""
    y = y.astype("int32")
    prod = (y + params[0]) * tirx.max(tirx.min(y + params[1], params[3]), params[2]) + params[4]
    one = tirx.const(1, "int32")
    r = tirx.shift_right(tirx.shift_right(prod, params[5]) * params[6]
                         + tirx.shift_left(one, params[7] - one), params[7]) + params[8]
    r = tirx.max(tirx.min(r, tirx.const(gate.hi, "int32")), tirx.const(gate.lo, "int32"))
    return r.astype(gate.out_dtype)


def _activation(y, requant: Requant, lut):
    """The activation after the clamp: ``lut[clip(y + offset)]`` for a clamped value ``y`` of
    ``requant``'s range, or the integer gate of ``y`` when ``requant`` has one (``lut`` then
    holds its parameters)."""
    if requant.gate is not None:
        return _integer_gate(y, requant.gate, lut)
    # the table's index in int32; clipped only where the clamp range can leave the table
    idx = y.astype("int32") + tirx.const(requant.lut_offset, "int32")
    if requant.lo + requant.lut_offset < 0:
        idx = tirx.max(idx, tirx.const(0, "int32"))
    if requant.hi + requant.lut_offset > requant.lut_size - 1:
        idx = tirx.min(idx, tirx.const(requant.lut_size - 1, "int32"))
    return lut[idx]


def _isa_intrin(isa: str) -> tuple[str, int]:
    if isa == "avx512_vnni":
        return VNNI_INTRIN, VNNI_LANES
    if isa == "avx2":
        return AVX2_INTRIN, AVX2_LANES
    raise ValueError(f"isa must be 'avx512_vnni' or 'avx2', got {isa!r}")


def default_tiles(m: int, n: int, isa: str = "avx512_vnni") -> tuple[int, int]:
    """Register tile ``(mb, nb)`` for an ``M x N`` output: ``mb`` rows x ``nb`` 16-col blocks.

    ``mb * nb`` zmm accumulators stay in registers (AVX-512 has 32). Tails are handled by
    computing a few redundant rows/blocks (see :func:`int8_dense_compute`), so the choice
    minimises that waste.
    """
    nblk = _ceil_to(n, LANES) // LANES
    if isa == "avx2":  # 16 ymm registers: 2 rows x 2 blocks x 2 halves
        mb, nbs = min(m, 2), (2, 1)
    else:
        mb, nbs = min(m, 4), (4, 3, 2, 1)
    nb = min(nbs, key=lambda b: (_ceil_to(nblk, b) - nblk, -b)) if nblk > 1 else 1
    return mb, nb


def int8_dense_compute(
    m: int,
    n: int,
    k: int,
    *,
    bias: bool = False,
    requant: Requant | None = None,
    mb: int = 1,
    nb: int = 1,
    isa: str = "avx512_vnni",
) -> tirx.PrimFunc:
    """The unscheduled PrimFunc: blocks ``A_pad`` (only if ``K % 4``), ``acc`` and ``C``
    (``isa="avx2"``: the int16 weights of ``pack_weight(w, layout, "avx2")``, and ``A_pad``
    always: ``A`` widened to int16 for :data:`.vnni_intrin.AVX2_WIDE_INTRIN`).

    ``acc`` covers ``ceil(M/mb)*mb`` rows and ``ceil(N/(16 nb))*16 nb`` columns so that every
    register tile is full: the extra rows re-read row ``M-1`` of ``A`` and the extra column
    blocks re-read the last weight block (clamped indices, no predicate in the inner loop);
    ``C`` keeps only the first ``M x N``.
    """
    nblk, kblk, _, _ = packed_weight_shape(n, k)
    kp = kblk * KBLOCK
    mp = _ceil_to(m, mb)
    npp = _ceil_to(nblk, nb) * LANES
    a = te.placeholder((m, k), "uint8", name="A")
    if isa == "avx2":  # the int16 weights of pack_weight(w, ..., "avx2")
        w = te.placeholder((nblk, kblk, 2, LANES, 2), "int16", name="W")

        def weight(jb, kb, lane, q):
            return w[jb, kb, q // 2, lane, q % 2]
    else:
        w = te.placeholder((nblk, kblk, LANES, KBLOCK), "int8", name="W")

        def weight(jb, kb, lane, q):
            return w[jb, kb, lane, q]
    if isa == "avx2":  # widened once, so that each pair is one broadcast from memory
        a_in = te.compute(
            (m, kp),
            lambda i, j: (tirx.if_then_else(j < k, a[i, j], tirx.const(0, "uint8"))
                          if kp != k else a[i, j]).astype("int16"),
            name="A_pad",
        )
    elif kp != k:
        a_in = te.compute(
            (m, kp),
            lambda i, j: tirx.if_then_else(j < k, a[i, j], tirx.const(0, "uint8")),
            name="A_pad",
        )
    else:
        a_in = a

    def row(i):
        return tirx.min(i, m - 1) if mp != m else i

    def blk(j):
        return tirx.min(j // LANES, nblk - 1) if npp != nblk * LANES else j // LANES

    r = te.reduce_axis((0, kp), name="k")
    acc = te.compute(
        (mp, npp),
        lambda i, j: te.sum(
            a_in[row(i), r].astype("int32")
            * weight(blk(j), r // KBLOCK, j % LANES, r % KBLOCK).astype("int32"),
            axis=r,
        ),
        name="acc",
    )
    params = [a, w]
    b_t, m0_t, sh_t, lut_t = _epilogue_params(n, bias, requant, params)
    c = te.compute(
        (m, n), lambda i, j: _epilogue_expr(acc[i, j], j, b_t, m0_t, sh_t, requant, lut_t),
        name="C",
    )
    return te.create_prim_func([*params, c])


def schedule_int8_dense(
    func: tirx.PrimFunc,
    *,
    mb: int,
    nb: int,
    kc: int | None = None,
    isa: str = "avx512_vnni",
) -> tvm.IRModule:
    """Tile, parallelise and tensorize a PrimFunc made by :func:`int8_dense_compute`.

    ``mb``/``nb`` must be the values the PrimFunc was made with. ``kc`` (a multiple of 4
    dividing the padded K, or None for all of K) blocks the reduction for the caches: the
    ``nb*16 x kc`` weight slice is reused by every row tile of a column panel before moving
    on, and the accumulators of the whole panel then live in a per-thread buffer.
    ``isa="avx2"`` tensorizes each 16x4 block as two exact 8x4 AVX2 blocks (on the int16
    weights of ``pack_weight(w, layout, "avx2")``; build it for an AVX2 target, e.g.
    ``mcpu="haswell"``).
    """
    intrin, lanes = _isa_intrin(isa)
    if isa == "avx2":
        intrin = AVX2_WIDE_INTRIN
    sch = Schedule(func)
    acc = sch.get_sblock("acc")
    loop_m, loop_n, loop_k = sch.get_loops(acc)
    kp = int(sch.get(loop_k).extent)
    if kc is not None and (kc <= 0 or kc % KBLOCK or kp % kc):
        raise ValueError(f"kc={kc} must be a positive multiple of 4 dividing K padded ({kp})")
    if kc is not None and kc >= kp:
        kc = None
    mo, mi = sch.split(loop_m, [None, mb])
    no, n1, ni = sch.split(loop_n, [None, nb, LANES])
    c_blk = sch.get_sblock("C")
    # On AVX2 the epilogue runs after the tiles, row by row over the accumulators in
    # memory. In the tiles it cost a workspace allocation per tile (the accumulators of a
    # small AVX2 tile) and, where tiles overhang M x N, a predicated store per output (AVX2
    # has no masked byte store: a byte extract and a branch each). rec's 40x120x6625 head:
    # 860-1140 -> 390 us; aligned 40x6624: 510-600 -> 375 us (Zen 3, 2 threads).
    after_tiles = isa == "avx2"
    if kc is None:
        ko, ki = sch.split(loop_k, [None, KBLOCK])
        sch.reorder(no, mo, ko, mi, n1, ni, ki)
        outer = sch.fuse(no, mo)
        sch.parallel(outer)
        if not after_tiles:
            sch.reverse_compute_at(c_blk, outer)
        init = sch.decompose_reduction(acc, ko)
    else:
        kco, ko, ki = sch.split(loop_k, [None, kc // KBLOCK, KBLOCK])
        sch.reorder(no, kco, mo, ko, mi, n1, ni, ki)
        outer = no
        sch.parallel(outer)
        if not after_tiles:
            sch.reverse_compute_at(c_blk, outer)
        init = sch.decompose_reduction(acc, kco)
    if lanes != LANES:
        nh, ni = sch.split(ni, [None, lanes])
    sch.tensorize(ni, intrin)
    if lanes != LANES:
        sch.unroll(nh)
    # After tensorize: the intrinsic's description declares global-scope buffers.
    if kc is None and not after_tiles:
        sch.set_scope(init, 0, "local")
    sch.unroll(mi)
    sch.unroll(n1)
    sch.vectorize(sch.get_loops(init)[-1])
    cl = sch.get_loops(c_blk)
    if after_tiles:  # rows in parallel; LLVM vectorizes each row, with a scalar tail
        sch.parallel(cl[0])
    else:  # epilogue on the tile, vectorised over 16 lanes
        sch.vectorize(sch.split(cl[-1], [None, LANES])[1])
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    if "A_pad" in names:
        pad = sch.get_sblock("A_pad")
        pl = sch.get_loops(pad)
        sch.parallel(pl[0])
    return sch.mod


def int8_dense(
    m: int,
    n: int,
    k: int,
    *,
    bias: bool = False,
    requant: Requant | None = None,
    mb: int | None = None,
    nb: int | None = None,
    kc: int | None = None,
    isa: str = "avx512_vnni",
) -> tvm.IRModule:
    """Scheduled, tensorized IRModule (PrimFunc ``"main"``) of the dense kernel.

    ``A`` is ``[m, k]`` uint8, ``W`` is ``pack_weight(w, ...)`` of an ``n x k`` int8 weight.
    """
    dmb, dnb = default_tiles(m, n, isa)
    mb, nb = mb or dmb, nb or dnb
    func = int8_dense_compute(m, n, k, bias=bias, requant=requant, mb=mb, nb=nb, isa=isa)
    return schedule_int8_dense(func, mb=mb, nb=nb, kc=kc, isa=isa)


def default_target(isa: str = "avx512_vnni", num_cores: int = 2) -> tvm.target.Target:
    """LLVM target for the kernels: ``cascadelake`` (AVX-512 VNNI), ``haswell`` (AVX2) or
    ``sapphirerapids`` (``"amx"``: AVX-512 VNNI and AMX-INT8)."""
    mcpu = {"avx512_vnni": "cascadelake", "avx2": "haswell", "amx": "sapphirerapids"}[isa]
    return tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": num_cores})


def build_int8_dense(
    m: int,
    n: int,
    k: int,
    *,
    bias: bool = False,
    requant: Requant | None = None,
    target: tvm.target.Target | None = None,
    mb: int | None = None,
    nb: int | None = None,
    kc: int | None = None,
    isa: str = "avx512_vnni",
):
    """Compile :func:`int8_dense`; returns ``tvm.compile``'s executable (function ``"main"``)."""
    mod = int8_dense(m, n, k, bias=bias, requant=requant, mb=mb, nb=nb, kc=kc, isa=isa)
    return tvm.compile(mod, target or default_target(isa))


def kernel_for_relax(mod: tvm.IRModule, name: str) -> tirx.PrimFunc:
    """The scheduled PrimFunc of ``mod`` renamed ``name``, ready for ``BlockBuilder.add_func``.

    The builders return modules whose PrimFunc is ``"main"`` (what ``tvm.compile`` of a lone
    kernel wants); inside a Relax module that symbol clashes with the Relax ``main``. Call it
    with ``relax.call_tir(gv, [x, relax.const(packed_weight), ...], out_ty)``: the kernel
    keeps its schedule (and its ``vpdpbusd``) through ``tvm.compile`` of the Relax module.
    """
    # op_pattern 8 (opaque): FuseOps must not fuse neighbours into a tensorized kernel;
    # tirx.is_scheduled: default-schedule passes leave it alone.
    return mod["main"].with_attrs({"global_symbol": name, "op_pattern": 8,
                                   "tirx.is_scheduled": True})
