"""u8 x s8 -> s32 conv2d for x86 with *pixels* on the AVX-512 VNNI lanes (few output channels).

``out[n, o, oh, ow] = epilogue(sum_{c, kh, kw} x[n, c, oh + kh, ow + kw] * w[o, c, kh, kw])``
(stride 1).

:mod:`.int8_conv2d` puts 16 output channels on the lanes of each ``vpdpbusd``: a layer with
24 output channels computes 32 (25% waste), one with 12 computes 16, one with 18 computes
32. PP-OCRv4 det spends a fifth of its time in such layers (its FPN's 96 -> 24 3x3
convolutions at 80x80 and 40x40). Here the lanes are 16 neighbouring *pixels* of an output
row instead: in the ``NCHW4c`` input, 16 pixels x 4 channels are 64 contiguous bytes, which
one ``vpdpbusd`` multiplies with one output channel's 4 weights broadcast
(:data:`.vnni_intrin.PIXELS_INTRIN`; LLVM broadcasts each weight once per tile, or folds it
into the instruction as a ``{1to16}`` memory operand).
No channel is wasted, and the output comes out in ``NCHW`` without a transpose: each finished
row of a channel is stored as it is.

On CPUs with AVX2 only (``isa="avx2"``) the same kernel runs on
:data:`.vnni_intrin.AVX2_PIXELS_INTRIN`: the input re-layout widens it to int16 in channel
pairs, the weights are widened at packing time, and each 16 pixels x 4 channels block is
four exact ``vpmaddwd`` with a broadcast weight pair (no per-pixel byte shuffling, which is
what the channel-lane kernel's AVX2 form spends its time on).

Layouts
-------
- Input ``x``: uint8 ``NCHW`` ``[N, C, H, W]``, re-laid out by the kernel (a parallel copy)
  as ``NCHW4c`` with the spatial padding (``pad``, filled with ``pad_value``) and a few
  columns more on the right so that every 16-pixel vector of the last tile reads inside it
  (those columns make discarded outputs).
  With ``isa="avx2"``: int16 ``[N, H', ceil(C/4), 2, W', 2]`` (rows outermost, channel
  pairs).
- Weight: int8 ``OIHW`` packed by :func:`pack_conv_weight_pixels` into
  ``[O, ceil(C/4) * KH * KW, 4]``: ``packed[o, (c // 4 * KH + kh) * KW + kw, c % 4] =
  w[o, c, kh, kw]`` (zero padded in C); int16 with ``isa="avx2"``.
- Output ``[N, O, OH, OW]``: int32, or uint8/int8/int16 with the fused requantization
  epilogue of :mod:`.int8_dense` (lookup table included). PrimFunc parameters: ``x, W,
  [bias], [m0, shift], [lut], out``.

Schedule: register tiles of ``mb`` vectors of 16 pixels along an output row x ``nb`` output
channels (``mb * nb`` zmm accumulators, at most 28; with AVX2 ``2 * mb * nb`` ymm, at most
12); the (channel group, image, output row) triples are spread over the cores (with AVX2
(image, output row, channel group): a row's channel groups one after the other, its input
rows still in cache); the reduction over (channel block, kh, kw) runs inside the tile, so
each 64-byte input load serves ``nb`` instructions. The epilogue runs on the finished row,
vectorized along it.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from ..cpu._common import row_vector_length
from .int8_conv2d import check_pad, conv_output_size, relayout_nchw4c, schedule_relayout
from .int8_dense import (
    KBLOCK,
    LANES,
    Requant,
    _activation,
    _ceil_to,
    _epilogue_expr,
    _epilogue_params,
    default_target,
    split_activation,
)
from .vnni_intrin import AVX2_PIXELS_INTRIN, PIXELS_INTRIN

#: Accumulators (16-pixel vectors) of one register tile: zmm registers with AVX-512, pairs
#: of ymm with AVX2 (16 registers: 12 accumulators, the broadcast weights and a product).
MAX_TILE = 28
MAX_TILE_AVX2 = 6


def _check_isa(isa: str) -> None:
    if isa not in ("avx512_vnni", "avx2"):
        raise ValueError(f"isa must be 'avx512_vnni' or 'avx2', got {isa!r}")


def pack_conv_weight_pixels(w: np.ndarray, isa: str = "avx512_vnni") -> np.ndarray:
    """``OIHW`` int8 -> ``[O, ceil(C/4)*KH*KW, 4]`` (see the module docstring); int16 for
    ``isa="avx2"``."""
    _check_isa(isa)
    w = np.asarray(w)
    if w.ndim != 4 or w.dtype != np.int8:
        raise ValueError(f"pack_conv_weight_pixels wants an int8 OIHW weight, got {w.dtype} "
                         f"{w.shape}")
    o, c, kh, kw = w.shape
    cp = _ceil_to(c, KBLOCK)
    wp = np.zeros((o, cp, kh, kw), dtype=np.int8)
    wp[:, :c] = w
    # [o, c4, ci, kh, kw] -> [o, c4, kh, kw, ci]
    t = wp.reshape(o, cp // KBLOCK, KBLOCK, kh, kw).transpose(0, 1, 3, 4, 2)
    t = t.reshape(o, cp // KBLOCK * kh * kw, KBLOCK)
    return np.ascontiguousarray(t.astype(np.int16) if isa == "avx2" else t)


def prefer_pixels(ow: int, o: int) -> bool:
    """Whether a stride-1 conv with ``ow``-wide output rows and ``o`` output channels runs
    faster here than on :mod:`.int8_conv2d` (channels on the lanes).

    Each kernel wastes the lanes past the last multiple of 16: of the row's pixels here, of
    the output channels there. Measured alone on PP-OCR shapes (Zen 4, 2 threads), this
    kernel is faster even when it wastes up to a fifth more (no transpose before the
    stores): 96 -> 24 3x3 on 80x80 722 against 946 us, 240 -> 240 1x1 on 12x80 344 against
    394, 96 -> 96 1x1 on 40x40 (17% of the lanes wasted) 156 against 157; and slower on rows
    of 20 (37% wasted): 192 -> 192 1x1 on 20x20 154 against 115.
    """
    pixels = ow / _ceil_to(ow, LANES)
    channels = o / _ceil_to(o, LANES)
    return pixels >= 0.8 * channels


def pixel_tiles(ow: int, o: int, isa: str = "avx512_vnni") -> tuple[int, int]:
    """Register tile ``(mb, nb)``: ``mb`` vectors of 16 pixels (a divisor of the row's
    vectors, so no tile is partial) x ``nb`` output channels, ``mb * nb <= 28`` (6 with
    AVX2), trading channels computed in vain (``O % nb``) against the per-tile overhead
    (about ``1/2nb``)."""
    _check_isa(isa)
    limit = MAX_TILE_AVX2 if isa == "avx2" else MAX_TILE
    nvec = _ceil_to(ow, LANES) // LANES
    # AVX2: one vector of pixels (its 4 input registers serve nb channels; 5 x 1 and
    # 1 x 4 on 240 -> 240 1x1, 12x80: 1351 against 801 us)
    mb = 1 if isa == "avx2" else max(d for d in range(1, min(nvec, 7) + 1) if nvec % d == 0)
    cap = max(1, min(o, limit // mb))
    nb = min(range(1, cap + 1), key=lambda b: (_ceil_to(o, b) * (1 + 0.5 / b), -b))
    return mb, nb


def int8_conv2d_pixels_compute(
    n: int,
    c: int,
    h: int,
    w: int,
    o: int,
    kh: int,
    kw: int,
    *,
    bias: bool = False,
    requant: Requant | None = None,
    mb: int = 1,
    nb: int = 1,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    pad_value: int = 0,
    isa: str = "avx512_vnni",
) -> tirx.PrimFunc:
    """The unscheduled PrimFunc: blocks ``x4c``, ``acc``, ``epi``, ``out``."""
    _check_isa(isa)
    top, left, bottom, right = check_pad(pad, pad_value)
    oh, ow = conv_output_size(h + top + bottom, w + left + right, kh, kw, 1)
    if oh < 1 or ow < 1:
        raise ValueError("kernel larger than the (padded) input")
    c4 = _ceil_to(c, KBLOCK) // KBLOCK
    owp = _ceil_to(ow, LANES * mb)
    wr = owp + kw - 1  # the width the tiles read (at least the padded input's)
    op = _ceil_to(o, nb)
    x = te.placeholder((n, c, h, w), "uint8", name="x")
    pairs = isa == "avx2"
    x4 = relayout_nchw4c(x, pad, pad_value, width=wr, pairs=pairs)
    wt = te.placeholder((o, c4 * kh * kw, KBLOCK), "int16" if pairs else "int8", name="W")

    def inp(b, cb, y, xx, ci):
        return x4[b, y, cb, ci // 2, xx, ci % 2] if pairs else x4[b, cb, y, xx, ci]

    def chan(j):
        return tirx.min(j, o - 1) if op != o else j

    rc = te.reduce_axis((0, c4), name="rc")
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    ri = te.reduce_axis((0, KBLOCK), name="ri")
    acc = te.compute(
        (n, op, oh, owp),
        lambda b, oc, y, xx: te.sum(
            inp(b, rc, y + rh, xx + rw, ri).astype("int32")
            * wt[chan(oc), (rc * kh + rh) * kw + rw, ri].astype("int32"),
            axis=[rc, rh, rw, ri],
        ),
        name="acc",
    )
    params = [x, wt]
    out = row_epilogue(lambda b, oc, y, xx: acc[b, oc, y, xx], (n, op, oh, owp), o, ow,
                       params, bias=bias, requant=requant)
    return te.create_prim_func([*params, out])


def row_epilogue(acc_at, shape, o: int, ow: int, params: list, *, bias: bool,
                 requant: Requant | None) -> te.Tensor:
    """Blocks ``epi`` (the requantization of ``acc_at(b, oc, y, xx)`` over the padded
    ``shape = (n, o', oh, ow')``, the padded channels reading channel ``o - 1``'s parameters,
    and the integer gate if there is one) and ``out`` (``[n, o, oh, ow]``, through the lookup
    table if there is one) of a kernel
    that finishes an ``NCHW`` output row at a time; appends the epilogue's parameters to
    ``params``."""
    n, op, oh, _ = shape
    b_t, m0_t, sh_t, lut_t = _epilogue_params(o, bias, requant, params)
    now, later = split_activation(requant, lut_t)  # (a gate runs on the row's vectors)

    def chan(j):
        return tirx.min(j, o - 1) if op != o else j

    epi = te.compute(
        shape,
        lambda b, oc, y, xx: _epilogue_expr(acc_at(b, oc, y, xx), chan(oc), b_t, m0_t, sh_t,
                                            requant, now),
        name="epi",
    )

    def finish(v):
        return _activation(v, requant, later) if later is not None else v

    return te.compute((n, o, oh, ow), lambda b, oc, y, xx: finish(epi[b, oc, y, xx]),
                      name="out")


def schedule_int8_conv2d_pixels(func: tirx.PrimFunc, *, mb: int, nb: int,
                                isa: str = "avx512_vnni",
                                columns: tuple[int, int] | None = None) -> tvm.IRModule:
    """Tile, parallelise and tensorize a PrimFunc made by :func:`int8_conv2d_pixels_compute`
    (with the same ``isa``); ``columns = (left padding, input width)`` lets the AVX2 input
    re-layout copy the inside of each row without a padding test."""
    _check_isa(isa)
    sch = Schedule(func)
    acc = sch.get_sblock("acc")
    b, oc, y, xx, rc, rh, rw, ri = sch.get_loops(acc)
    oo, oi = sch.split(oc, [None, nb])
    xo, xm, xi = sch.split(xx, [None, mb, LANES])
    if isa == "avx2":  # a row's channel groups one after another, its inputs in cache
        sch.reorder(b, y, oo, xo, rc, rh, rw, oi, xm, xi, ri)
        row = sch.fuse(b, y, oo)
    else:
        sch.reorder(oo, b, y, xo, rc, rh, rw, oi, xm, xi, ri)
        row = sch.fuse(oo, b, y)
    sch.parallel(row)
    # the register tile (nb channels x mb vectors) is written back into a row buffer, and
    # the epilogue runs once per row, vectorized along it
    tile_wb = sch.cache_write(acc, 0, "global")
    sch.reverse_compute_at(tile_wb, xo)
    epi, out = sch.get_sblock("epi"), sch.get_sblock("out")
    sch.reverse_compute_at(epi, row, preserve_unit_loops=True)
    sch.reverse_compute_at(out, row, preserve_unit_loops=True)
    init = sch.decompose_reduction(acc, rc)
    sch.tensorize(xi, AVX2_PIXELS_INTRIN if isa == "avx2" else PIXELS_INTRIN)
    sch.set_scope(init, 0, "local")
    sch.unroll(oi)
    sch.unroll(xm)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(tile_wb)[-1])
    vectorize_row_epilogue(sch)
    schedule_relayout(sch, columns=(columns if isa == "avx2" else None))
    return sch.mod


def vectorize_row_epilogue(sch: Schedule) -> None:
    """Blocks ``epi`` and ``out`` of a kernel that finishes one output row at a time: the
    requantization on whole vectors of the padded row; a lookup table after it runs scalar
    (a 16-lane gather from a 64 KiB table is slower than 16 loads), else the row is stored
    vectorized."""
    epi, out = sch.get_sblock("epi"), sch.get_sblock("out")
    sch.vectorize(sch.split(sch.get_loops(epi)[-1], [None, LANES])[1])
    if len(sch.get(out).reads) > 1:
        # the table lookups of 16 pixels unrolled: left as a loop, LLVM vectorizes it into a
        # gather emulated with 16 extracts and inserts per vector (2x slower than scalar)
        ol = sch.get_loops(out)[-1]
        if int(sch.get(ol).extent) > LANES:
            ol = sch.split(ol, [None, LANES])[1]
        sch.unroll(ol)
    else:
        sch.compute_inline(epi)
        ol = sch.get_loops(out)[-1]
        extent = int(sch.get(ol).extent)
        vec = row_vector_length(extent, LANES)
        if vec is not None:
            if vec < extent:
                ol = sch.split(ol, [None, vec])[1]
            sch.vectorize(ol)


def int8_conv2d_pixels(
    n: int,
    c: int,
    h: int,
    w: int,
    o: int,
    kh: int,
    kw: int,
    *,
    bias: bool = False,
    requant: Requant | None = None,
    mb: int | None = None,
    nb: int | None = None,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    pad_value: int = 0,
    isa: str = "avx512_vnni",
) -> tvm.IRModule:
    """Scheduled, tensorized IRModule (PrimFunc ``"main"``) of the pixel-lane conv kernel
    (stride 1; ``pad`` is ``(top, left, bottom, right)``, filled with ``pad_value``;
    ``isa``: ``"avx512_vnni"`` or ``"avx2"``)."""
    _, ow = conv_output_size(h + pad[0] + pad[2], w + pad[1] + pad[3], kh, kw, 1)
    dmb, dnb = pixel_tiles(ow, o, isa)
    mb, nb = mb or dmb, nb or dnb
    func = int8_conv2d_pixels_compute(n, c, h, w, o, kh, kw, bias=bias, requant=requant,
                                      mb=mb, nb=nb, pad=pad, pad_value=pad_value, isa=isa)
    return schedule_int8_conv2d_pixels(func, mb=mb, nb=nb, isa=isa, columns=(pad[1], w))


def build_int8_conv2d_pixels(*args, target: tvm.target.Target | None = None, **kwargs):
    """Compile :func:`int8_conv2d_pixels`; ``tvm.compile``'s executable (``"main"``)."""
    isa = kwargs.get("isa", "avx512_vnni")
    return tvm.compile(int8_conv2d_pixels(*args, **kwargs), target or default_target(isa))
