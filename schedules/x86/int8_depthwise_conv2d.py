"""u8 x s8 -> s32 depthwise conv2d for x86: 4 kernel columns per AVX-512 VNNI ``vpdpbusd``.

``out[n, c, oh, ow] = epilogue(sum_{kh, kw} x[n, c, oh*sh + kh, ow*sw + kw] * w[c, 0, kh, kw])``

``vpdpbusd`` adds, in each int32 lane, the products of 4 unsigned by 4 signed bytes. A
depthwise convolution has no input-channel sum to feed it, so here the 4 bytes are 4 *kernel
columns*: lane ``i`` holds ``x[row, (ow0 + i)*sw + 4g .. + 3]``, the input under kernel
columns ``4g .. 4g+3`` of output pixel ``ow0 + i``. Those 16 windows overlap within 64
bytes of the input row, so one load and one byte shuffle (``vpermb``) make them
(:func:`.vnni_intrin.window_intrin`), and one ``vpdpbusd`` with the 4 weights broadcast
adds them up. A 5x5 kernel is 5 rows x 2 groups = 10 instructions per 16 outputs (25
multiplies and 25 adds of 16 int32 lanes before); stride 2 along the row is only another
shuffle.

Layouts
-------
- Input ``x``: uint8 ``NCHW``, padded by the caller to :func:`depthwise_input_size`: the
  convolution's own padding (the input zero point), then a few more columns (whole vectors
  of 16 pixels, whole groups of 4 kernel columns) and rows (the last 64-byte load stays in
  the buffer). Those extra values meet zero weights or make discarded outputs.
- Weight: int8 ``[C, 1, KH, KW]`` packed by :func:`pack_depthwise_weight` into
  ``[C, KH, ceil(KW/4), 4]``: ``packed[c, kh, g, j] = w[c, 0, kh, 4g + j]``, zero past KW.
- Output: ``[N, C, OH, OW]`` int32, or uint8/int8/int16 with the fused requantization
  epilogue (per channel; the arithmetic of :mod:`.int8_dense`, lookup table included).

Schedule: one task per (image, channel, block of output rows), spread over the cores; a
register tile of up to 4 output rows x up to 24 vectors; with the kernel rows and the tile's
rows unrolled, LLVM loads and shuffles each input row's windows once for every output row
that uses them. The epilogue runs on the finished rows, vectorized.

Measured on PP-OCR (Zen 4, 2 threads, in the whole model, outputs identical): det 320
7.20 -> 7.00 ms, rec 6.42 -> 6.00 ms against the default depthwise schedule plus separate
lookup-table kernels (see ``benchmarks/NOTES.md``).

AVX2 (``isa="avx2"``, strides 1 and 2 along the row): the same 4-column groups on
:data:`.vnni_intrin.AVX2_WINDOW_INTRIN`, 8 outputs 2 input columns apart per call: a
stride-2 row as it is, a stride-1 row as its even and its odd outputs (accumulated apart,
interleaved by the epilogue). Per 8 outputs and 4 kernel columns: two widening loads, two
``vpmaddwd`` with int16 weight pairs (packed widened) and two adds.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from ..cpu._common import row_vector_length
from .int8_dense import (
    KBLOCK,
    LANES,
    Requant,
    _ceil_to,
    _epilogue_expr,
    _epilogue_params,
    default_target,
)
from .vnni_intrin import AVX2_WINDOW_INTRIN, window_intrin

#: Accumulators (ymm) of one AVX2 register tile.
AVX2_TILE = 12


def depthwise_output_size(h: int, w: int, kh: int, kw: int, sh: int, sw: int,
                          pad=(0, 0, 0, 0)) -> tuple[int, int]:
    """Output height and width; ``pad`` is ``(top, left, bottom, right)``."""
    top, left, bottom, right = pad
    return (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1


def pack_depthwise_weight(w: np.ndarray, isa: str = "avx512_vnni") -> np.ndarray:
    """``[C, 1, KH, KW]`` int8 -> ``[C, KH, ceil(KW/4), 4]`` (see the module docstring);
    int16 for ``isa="avx2"``."""
    _check_isa(isa)
    w = np.asarray(w)
    if w.ndim != 4 or w.shape[1] != 1 or w.dtype != np.int8:
        raise ValueError(f"pack_depthwise_weight wants an int8 [C, 1, KH, KW] weight, got "
                         f"{w.dtype} {w.shape}")
    c, _, kh, kw = w.shape
    kwp = _ceil_to(kw, KBLOCK)
    wp = np.zeros((c, kh, kwp), np.int8)
    wp[:, :, :kw] = w[:, 0]
    wp = wp.reshape(c, kh, kwp // KBLOCK, KBLOCK)
    return np.ascontiguousarray(wp.astype(np.int16) if isa == "avx2" else wp)


def _check_isa(isa: str) -> None:
    if isa not in ("avx512_vnni", "avx2"):
        raise ValueError(f"isa must be 'avx512_vnni' or 'avx2', got {isa!r}")


def depthwise_reference(x: np.ndarray, w: np.ndarray, stride=(1, 1), pad=(0, 0, 0, 0),
                        pad_value: int = 0) -> np.ndarray:
    """Exact int64 NumPy depthwise conv (``x`` NCHW, ``w`` ``[C, 1, KH, KW]``)."""
    sh, sw = stride
    top, left, bottom, right = pad
    xp = np.pad(np.asarray(x).astype(np.int64), ((0, 0), (0, 0), (top, bottom), (left, right)),
                constant_values=pad_value)
    c, _, kh, kw = w.shape
    oh, ow = depthwise_output_size(x.shape[2], x.shape[3], kh, kw, sh, sw, pad)
    out = np.zeros((x.shape[0], c, oh, ow), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            out += patch * w[None, :, 0, i, j, None, None].astype(np.int64)
    return out


def register_tile(oh: int, ow: int, isa: str = "avx512_vnni") -> tuple[int, int]:
    """``(rows, chunk)``: output rows (a divisor of ``oh``, at most 4) x vectors of 16
    pixels (a divisor of the row's vectors) accumulated in registers at a time, at most 24
    (AVX2: at most 2 rows and 12 ymm accumulators, two per 16 pixels)."""
    _check_isa(isa)
    nvec = _ceil_to(ow, LANES) // LANES
    most_rows, most = (2, AVX2_TILE // 2) if isa == "avx2" else (4, 24)
    rows = max(d for d in range(1, min(oh, most_rows) + 1) if oh % d == 0)
    chunk = max(d for d in range(1, min(nvec, most // rows) + 1) if nvec % d == 0)
    return rows, chunk


def depthwise_input_size(oh: int, ow: int, kh: int, kw: int, sh: int, sw: int,
                         at_least: tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Height and width of the (padded) input that the kernel reads for an ``oh x ow``
    output, and at least ``at_least`` (the convolution's padded input). Past the
    convolution's own padding: whole 16-pixel vectors and groups of 4 kernel columns to the
    right, and below, enough rows for the last 64-byte load to stay inside the buffer. Those
    values meet zero weights or make discarded outputs: pad with anything."""
    groups = _ceil_to(kw, KBLOCK) // KBLOCK
    owp = _ceil_to(ow, LANES)
    w = max((owp - 1) * sw + KBLOCK * groups, (ow - 1) * sw + kw, at_least[1])
    h = max((oh - 1) * sh + kh, at_least[0])
    last_load = ((oh - 1) * sh + kh - 1) * w + (owp - LANES) * sw + KBLOCK * (groups - 1)
    return h + -(-max(0, last_load + 64 - h * w) // w), w


def int8_depthwise_conv2d_compute(
    n: int,
    c: int,
    oh: int,
    ow: int,
    kh: int,
    kw: int,
    stride: tuple[int, int] = (1, 1),
    *,
    bias: bool = False,
    requant: Requant | None = None,
    input_at_least: tuple[int, int] = (0, 0),
    isa: str = "avx512_vnni",
) -> tirx.PrimFunc:
    """The unscheduled PrimFunc: blocks ``acc``, ``out``; the input is
    ``[n, c, *depthwise_input_size(..., input_at_least)]``, already padded."""
    _check_isa(isa)
    sh, sw = (int(s) for s in stride)
    if min(oh, ow, kh, kw, sh, sw) < 1 or sw > (2 if isa == "avx2" else 3):
        raise ValueError(f"bad sizes: output {oh}x{ow}, kernel {kh}x{kw}, stride {stride}"
                         f" ({isa})")
    h, w = depthwise_input_size(oh, ow, kh, kw, sh, sw, input_at_least)
    groups = _ceil_to(kw, KBLOCK) // KBLOCK
    owp = _ceil_to(ow, LANES)

    x = te.placeholder((n, c, h, w), "uint8", name="x")
    wt = te.placeholder((c, kh, groups, KBLOCK), "int16" if isa == "avx2" else "int8", name="W")
    rr = te.reduce_axis((0, kh), name="rr")
    rg = te.reduce_axis((0, groups), name="rg")
    rj = te.reduce_axis((0, KBLOCK), name="rj")
    if isa == "avx2":
        return _avx2_compute(x, wt, (rr, rg, rj), oh, ow, owp, (sh, sw), bias, requant)
    acc = te.compute(
        (n, c, oh, owp),
        lambda b, ch, y, xx: te.sum(
            x[b, ch, y * sh + rr, xx * sw + rg * KBLOCK + rj].astype("int32")
            * wt[ch, rr, rg, rj].astype("int32"),
            axis=[rr, rg, rj],
        ),
        name="acc",
    )
    params = [x, wt]
    b_t, m0_t, sh_t, lut_t = _epilogue_params(c, bias, requant, params)

    def epilogue(b, ch, y, xx):
        return _epilogue_expr(acc[b, ch, y, xx], ch, b_t, m0_t, sh_t, requant, lut_t)

    out = te.compute((n, c, oh, ow), epilogue, name="out")
    return te.create_prim_func([*params, out])


def _avx2_compute(x, wt, axes, oh, ow, owp, stride, bias, requant) -> tirx.PrimFunc:
    """The AVX2 form of :func:`int8_depthwise_conv2d_compute`: block ``acc`` is
    ``[n, c, oh, owp / 16, 2, 8]`` (a stride-1 row: each 16 pixels as their even and odd
    outputs) or ``[n, c, oh, owp / 8, 1, 8]`` (stride 2), so that 8 outputs of an
    intrinsic call read their input 2 columns apart."""
    n, c = (int(d) for d in x.shape[:2])
    rr, rg, rj = axes
    sh, sw = stride
    half = 8
    if sw == 1:
        shape = (n, c, oh, owp // LANES, 2, half)

        def col(xo, par, j):
            return xo * LANES + 2 * j + par

        def at(b, ch, y, xx):
            return acc[b, ch, y, xx // LANES, xx % 2, xx % LANES // 2]
    else:
        shape = (n, c, oh, owp // half, 1, half)

        def col(xo, par, j):
            return xo * half + j

        def at(b, ch, y, xx):
            return acc[b, ch, y, xx // half, 0, xx % half]
    acc = te.compute(
        shape,
        lambda b, ch, y, xo, par, j: te.sum(
            x[b, ch, y * sh + rr, col(xo, par, j) * sw + rg * KBLOCK + rj].astype("int32")
            * wt[ch, rr, rg, rj].astype("int32"),
            axis=[rr, rg, rj],
        ),
        name="acc",
    )
    params = [x, wt]
    b_t, m0_t, sh_t, lut_t = _epilogue_params(c, bias, requant, params)
    out = te.compute(
        (n, c, oh, ow),
        lambda b, ch, y, xx: _epilogue_expr(at(b, ch, y, xx), ch, b_t, m0_t, sh_t, requant,
                                            lut_t),
        name="out",
    )
    return te.create_prim_func([*params, out])


def schedule_int8_depthwise_conv2d(func: tirx.PrimFunc, *, chunk: int, rows: int,
                                   stride: int, isa: str = "avx512_vnni") -> tvm.IRModule:
    """Parallelise and tensorize a PrimFunc made by :func:`int8_depthwise_conv2d_compute`:
    ``rows`` output rows x ``chunk`` vectors of 16 pixels per register tile (``stride``:
    along the row)."""
    _check_isa(isa)
    sch = Schedule(func)
    acc = sch.get_sblock("acc")
    if isa == "avx2":  # vectors of 8 outputs: (even, odd) per 16 pixels, or 2 at stride 2
        b, ch, y, xx, par, xi, rr, rg, rj = sch.get_loops(acc)
        xo, xc = sch.split(xx, [None, chunk * 2 if stride == 2 else chunk])
        inner = [par]
    else:
        b, ch, y, xx, rr, rg, rj = sch.get_loops(acc)
        xo, xc, xi = sch.split(xx, [None, chunk, LANES])
        inner = []
    yo, yi = sch.split(y, [None, rows])
    sch.reorder(b, ch, yo, xo, rg, rr, yi, xc, *inner, xi, rj)
    task = sch.fuse(b, ch, yo)
    sch.parallel(task)
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, task, preserve_unit_loops=True)
    init = sch.decompose_reduction(acc, rg)
    sch.tensorize(xi, AVX2_WINDOW_INTRIN if isa == "avx2" else window_intrin(stride))
    # unrolled, the kernel rows x output rows of a tile read each input row's windows once
    # (LLVM merges the equal loads and byte shuffles of output row y + kernel row r)
    for loop in (rr, yi, xc, *inner):
        sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])
    ol = sch.get_loops(out)[-1]
    extent = int(sch.get(ol).extent)
    vec = row_vector_length(extent, LANES)
    if vec is not None:
        if vec < extent:
            ol = sch.split(ol, [None, vec])[1]
        sch.vectorize(ol)
    return sch.mod


def int8_depthwise_conv2d(
    n: int,
    c: int,
    oh: int,
    ow: int,
    kh: int,
    kw: int,
    stride: tuple[int, int] = (1, 1),
    *,
    bias: bool = False,
    requant: Requant | None = None,
    input_at_least: tuple[int, int] = (0, 0),
    isa: str = "avx512_vnni",
) -> tvm.IRModule:
    """Scheduled, tensorized IRModule (PrimFunc ``"main"``) of the depthwise kernel.

    PrimFunc parameters: ``x`` (``[n, c, *depthwise_input_size(..., input_at_least)]``,
    padded), ``W`` (packed for ``isa``), ``[bias], [m0, shift], [lut], out``.
    """
    func = int8_depthwise_conv2d_compute(n, c, oh, ow, kh, kw, stride, bias=bias,
                                         requant=requant, input_at_least=input_at_least,
                                         isa=isa)
    rows, chunk = register_tile(oh, ow, isa)
    return schedule_int8_depthwise_conv2d(func, chunk=chunk, rows=rows, stride=stride[1],
                                          isa=isa)


def build_int8_depthwise_conv2d(*args, target: tvm.target.Target | None = None, **kwargs):
    """Compile :func:`int8_depthwise_conv2d`; ``tvm.compile``'s executable (``"main"``)."""
    isa = kwargs.get("isa", "avx512_vnni")
    return tvm.compile(int8_depthwise_conv2d(*args, **kwargs), target or default_target(isa))
