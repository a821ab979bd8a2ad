"""u8 x s8 -> s32 direct conv2d kernels for x86, tensorized with AVX-512 VNNI ``vpdpbusd``
(or, on CPUs with AVX2 only, ``isa="avx2"``: the exact ``vpmaddwd`` 8x4 blocks of
:mod:`.vnni_intrin`, two per 16 channels, same layouts and packed weights).

``out[n, o, oh, ow] = epilogue(sum_{c, kh, kw} x[n, c, oh*s + kh, ow*s + kw] * w[o, c, kh, kw])``

Layouts
-------
- Input ``x``: uint8, padded spatially by the caller (with the input zero point), or, in
  ``NCHW`` only, by the kernel (``pad``, ``pad_value``), in one of
  - ``NCHW`` ``[N, C, H, W]``: the kernel first re-lays it out as ``NCHW4c`` (a parallel copy
    of the input, channels zero padded to a multiple of 4, spatially padded with
    ``pad_value`` if asked: the padding costs nothing there, and the producer of ``x`` then
    writes rows of the unpadded width, which vectorize);
  - ``NCHW4c`` ``[N, ceil(C/4), H, W, 4]`` (:func:`pack_input`), used as is;
  - ``NCHW16c`` ``[N, ceil(C/16), H, W, 16]`` (``pack_input(x, 16)``; padded channels must
    be zero or meet zero weights), used as is: the output layout ``NCHW16c`` of the previous
    conv, so a chain of convs never transposes.
  In all three the 4 channels of one pixel that ``vpdpbusd`` broadcasts are 4 contiguous
  bytes.
- Weight: int8 ``OIHW`` pre-packed by :func:`pack_conv_weight` into
  ``[ceil(O/16), ceil(C/4) * KH * KW, 16, 4]``::

      packed[o // 16, (c // 4 * KH + kh) * KW + kw, o % 16, c % 4] = w[o, c, kh, kw]

  i.e. the reduction index is (channel block of 4, kh, kw, channel in block); each 16 (output
  channels) x 4 (input channels) block is 64 contiguous bytes, as the intrinsic needs. Zero
  padded in O and C.
- Output ``OH = (H + top + bottom - KH) // s + 1``, ``OW = (W + left + right - KW) // s + 1``;
  int32, or uint8/int8 with the fused requantization epilogue (per output channel ``o``; the
  arithmetic of :mod:`.int8_dense`), in ``out_layout``
  - ``NCHW`` ``[N, O, OH, OW]``: needs a transpose of every register tile (channels are the
    vector lanes), done per output row so that each channel row is stored whole;
  - ``NCHW16c`` ``[N, ceil(O/16), OH, OW, 16]``: the tile is stored as is (16-lane vectors);
    padded channels are 0. 1.3-1.6x faster than ``NCHW`` on PP-OCR-like layers.

Any stride (1 and 2 tested), any kernel size (1x1 and 3x3 tested); groups = 1 (depthwise is
out of scope). PrimFunc parameters: ``x, W, [bias], [m0, shift], [lut], out`` (the epilogue of
:mod:`.int8_dense`, lookup table included).

Schedule: register tiles of ``mb`` output pixels along a row x ``nb * 16`` output channels
(``mb * nb`` zmm accumulators), reduction over (channel block, kh, kw) inside the tile; the
(channel block, image, output row) triples are spread over the cores; each finished tile is
written to a row buffer, and the epilogue runs on the row (vectorised over 16 channels).
Row tails (``OW % mb``) re-read the last column (clamped index) instead of a predicate in the
hot loop; channel tails (``O % (16 nb)``) likewise re-read the last weight block.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from .int8_dense import (
    KBLOCK,
    LANES,
    Requant,
    _activation,
    _ceil_to,
    _epilogue_expr,
    _epilogue_params,
    _isa_intrin,
    default_target,
    split_activation,
)
from .vnni_intrin import AVX2_WIDE_INTRIN


def conv_output_size(h: int, w: int, kh: int, kw: int, stride: int) -> tuple[int, int]:
    """Output height and width of a conv over an already padded ``h x w`` input."""
    return (h - kh) // stride + 1, (w - kw) // stride + 1


def pack_input(x: np.ndarray, block: int = KBLOCK) -> np.ndarray:
    """``NCHW`` -> ``NCHW{block}c`` ``[N, ceil(C/block), H, W, block]`` (channels zero padded).

    ``block=4`` gives the ``NCHW4c`` input layout, ``block=16`` the ``NCHW16c`` one.
    """
    x = np.asarray(x)
    n, c, h, w = x.shape
    cp = _ceil_to(c, block)
    xp = np.zeros((n, cp, h, w), dtype=x.dtype)
    xp[:, :c] = x
    return np.ascontiguousarray(xp.reshape(n, cp // block, block, h, w).transpose(0, 1, 3, 4, 2))


def unpack_output(y: np.ndarray, c: int) -> np.ndarray:
    """``NCHW{b}c`` ``[N, C/b, H, W, b]`` -> ``NCHW`` ``[N, c, H, W]`` (drops channel padding)."""
    n, cb, h, w, b = y.shape
    return np.ascontiguousarray(y.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w)[:, :c])


def packed_conv_weight_shape(o: int, c: int, kh: int, kw: int) -> tuple[int, int, int, int]:
    return (_ceil_to(o, LANES) // LANES, _ceil_to(c, KBLOCK) // KBLOCK * kh * kw, LANES, KBLOCK)


def pack_conv_weight(w: np.ndarray, isa: str = "avx512_vnni") -> np.ndarray:
    """``OIHW`` int8 -> ``[ceil(O/16), ceil(C/4)*KH*KW, 16, 4]`` (see the module docstring);
    with ``isa="avx2"`` widened to int16 in reduction pairs, ``[.., 2, 16, 2]``
    (:data:`.vnni_intrin.AVX2_INTRIN`)."""
    w = np.asarray(w)
    if w.ndim != 4 or w.dtype != np.int8:
        raise ValueError(f"pack_conv_weight wants an int8 OIHW weight, got {w.dtype} {w.shape}")
    o, c, kh, kw = w.shape
    op, cp = _ceil_to(o, LANES), _ceil_to(c, KBLOCK)
    wp = np.zeros((op, cp, kh, kw), dtype=np.int8)
    wp[:o, :c] = w
    # [ob, o16, c4, ci, kh, kw] -> [ob, c4, kh, kw, o16, ci]
    t = wp.reshape(op // LANES, LANES, cp // KBLOCK, KBLOCK, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    t = t.reshape(op // LANES, cp // KBLOCK * kh * kw, LANES, KBLOCK)
    if isa == "avx2":  # [.., 16, (2, 2)] -> [.., 2 pairs, 16, 2], int16
        t = t.reshape(*t.shape[:2], LANES, 2, 2).transpose(0, 1, 3, 2, 4).astype(np.int16)
    return np.ascontiguousarray(t)


def conv2d_reference(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """Exact int64 NumPy conv (NCHW x OIHW, input already padded); returns int64."""
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    oh, ow = conv_output_size(h, wd, kh, kw, stride)
    x64, w64 = x.astype(np.int64), w.astype(np.int64)
    out = np.zeros((n, o, oh, ow), dtype=np.int64)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i, i + stride * (oh - 1) + 1, stride)
            cols = slice(j, j + stride * (ow - 1) + 1, stride)
            patch = x64[:, :, rows, cols]
            out += np.einsum("nchw,oc->nohw", patch, w64[:, :, i, j])
    return out


def check_pad(pad, pad_value: int) -> tuple[int, int, int, int]:
    """``(top, left, bottom, right)`` as ints; a negative side or a non-uint8 fill is an
    error."""
    top, left, bottom, right = (int(p) for p in pad)
    if min(top, left, bottom, right) < 0:
        raise ValueError(f"negative padding {pad}")
    if not 0 <= pad_value <= 255:
        raise ValueError(f"pad_value {pad_value} is not a uint8")
    return top, left, bottom, right


def relayout_nchw4c(x: te.Tensor, pad=(0, 0, 0, 0), pad_value: int = 0,
                    width: int | None = None, channels: int | None = None,
                    pairs: bool = False, widen: bool = False) -> te.Tensor:
    """The kernels' input re-layout (block ``x4c``): ``NCHW`` ``x`` -> ``NCHW4c``
    ``[N, channels/4, top + H + bottom, width, 4]``, padded spatially with ``pad_value``
    (``pad`` is ``(top, left, bottom, right)``; ``width`` at least the padded width, the
    columns past it also ``pad_value``) and in channels with zeros (``channels`` a multiple
    of 4, at least C; by default C rounded up to 4).

    ``pairs=True`` (the AVX2 pixel-lane kernel's): widened to int16, rows outermost, and
    each row of a block of 4 channels split into its 2 channel pairs, ``[N, top + H +
    bottom, channels/4, 2, width, 2]``: 8 pixels of one pair are one 32-byte ``vpmaddwd``
    operand, and all the channels of a row are one contiguous run. ``widen=True`` (the AVX2
    channel-lane kernel's): the ``NCHW4c`` layout in int16."""
    n, c, h, w = (int(d) for d in x.shape)
    top, left, bottom, right = (int(p) for p in pad)
    width = width if width is not None else left + w + right
    channels = channels if channels is not None else _ceil_to(c, KBLOCK)
    if channels % KBLOCK or channels < c:
        raise ValueError(f"{channels} channels: not a multiple of {KBLOCK} at least {c}")
    c4 = channels // KBLOCK
    check = any((top, left, bottom)) or width > left + w

    def relayout(b, cb, y, xx, ci):
        ch = cb * KBLOCK + ci
        v = x[b, tirx.min(ch, c - 1), y - top, xx - left] if channels > c else \
            x[b, ch, y - top, xx - left]
        if check:
            inside = tirx.all(top <= y, y < top + h, left <= xx, xx < left + w)
            v = tirx.if_then_else(inside, v, tirx.const(pad_value, "uint8"))
        if channels > c:  # padded channels meet zero weights, but must not be garbage
            v = tirx.if_then_else(ch < c, v, tirx.const(0, "uint8"))
        return v

    if pairs:
        return te.compute((n, top + h + bottom, c4, 2, width, 2),
                          lambda b, y, cb, p, xx, ci: relayout(b, cb, y, xx, p * 2 + ci)
                          .astype("int16"), name="x4c")
    if widen:
        return te.compute((n, c4, top + h + bottom, width, KBLOCK),
                          lambda *i: relayout(*i).astype("int16"), name="x4c")
    return te.compute((n, c4, top + h + bottom, width, KBLOCK), relayout, name="x4c")


def schedule_relayout(sch: Schedule, columns: tuple[int, int] | None = None) -> None:
    """Block ``x4c`` of :func:`relayout_nchw4c`: (image, channel block, row) in parallel, the
    4 channels of a pixel unrolled and the row left to LLVM's vectorizer, which sees an
    interleaved group (4 row loads and byte shuffles); a 4-lane vector per pixel was built
    from byte inserts (rec's 240 -> 240 1x1 on 12x80: 394 -> 366 us with it).

    ``columns = (left, w)``: the row is cut into its left padding, its ``w`` input columns
    and the rest, so that the middle part has no padding test and vectorizes (with the
    test inside, the int16 ``pairs`` layout was copied one element at a time: 15% of a
    96 -> 24 3x3 conv on AVX2)."""
    loops = sch.get_loops(sch.get_sblock("x4c"))
    sch.parallel(sch.fuse(*loops[:3]))  # (image, channel block, row) or (image, row, block)
    sch.unroll(loops[-1])
    if columns is not None:
        left, w = columns
        xx = loops[-2]
        rest = int(sch.get(xx).extent) - left - w
        parts = [p for p in (left, w, rest) if p]
        if len(parts) > 1:
            sch.loop_partition(xx, [*parts[:-1], None])


def default_conv_tiles(ow: int, o: int, isa: str = "avx512_vnni") -> tuple[int, int]:
    """Register tile ``(mb, nb)``: ``mb`` pixels of a row x ``nb`` blocks of 16 channels.

    ``nb`` wastes the fewest padded channel blocks (widest first); ``mb`` keeps
    ``mb * nb + nb`` zmm registers under 28 and trades padded columns (``OW % mb``) against
    the per-tile overhead (about ``1/mb``). With ``isa="avx2"`` (16 ymm registers, two per
    16 channels, and about 5 taken by the intrinsic's widened operands) ``2 * mb * nb``
    accumulators stay at 10 or below.
    """
    oblk = _ceil_to(o, LANES) // LANES
    widths = (2, 1) if isa == "avx2" else (4, 3, 2, 1)
    nb = min(widths, key=lambda b: (_ceil_to(oblk, b) - oblk, -b)) if oblk > 1 else 1
    regs = 10 // (2 * nb) if isa == "avx2" else (28 - nb) // nb
    cap = max(1, min(12, regs, ow))
    mb = min(range(1, cap + 1), key=lambda b: (_ceil_to(ow, b) * (1 + 1 / b), -b))
    return mb, nb


def int8_conv2d_compute(
    n: int,
    c: int,
    h: int,
    w: int,
    o: int,
    kh: int,
    kw: int,
    stride: int = 1,
    *,
    data_layout: str = "NCHW",
    out_layout: str = "NCHW",
    bias: bool = False,
    requant: Requant | None = None,
    mb: int = 1,
    nb: int = 1,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    pad_value: int = 0,
    isa: str = "avx512_vnni",
) -> tirx.PrimFunc:
    """The unscheduled PrimFunc: blocks ``x4c`` (NCHW input only), ``acc``, ``epi``, ``out``.

    ``pad`` is ``(top, left, bottom, right)``, applied while re-laying out an NCHW input;
    ``isa="avx2"`` takes the int16 weights of ``pack_conv_weight(w, "avx2")``.
    """
    if out_layout not in ("NCHW", "NCHW16c"):
        raise ValueError(f"out_layout must be NCHW or NCHW16c, got {out_layout!r}")
    top, left, bottom, right = check_pad(pad, pad_value)
    padded = any((top, left, bottom, right))
    if padded and data_layout != "NCHW":
        raise ValueError("the kernel pads only NCHW inputs (pad the blocked layouts before)")
    hp, wp = h + top + bottom, w + left + right
    oh, ow = conv_output_size(hp, wp, kh, kw, stride)
    if oh < 1 or ow < 1:
        raise ValueError("kernel larger than the (padded) input")
    c4 = _ceil_to(c, KBLOCK) // KBLOCK
    oblk = _ceil_to(o, LANES) // LANES
    owp = _ceil_to(ow, mb)
    opp = _ceil_to(oblk, nb) * LANES
    if data_layout == "NCHW":
        x = te.placeholder((n, c, h, w), "uint8", name="x")

        x4 = relayout_nchw4c(x, pad, pad_value, widen=isa == "avx2")
    elif data_layout == "NCHW4c":
        x = te.placeholder((n, c4, h, w, KBLOCK), "uint8", name="x")
        x4 = x
    elif data_layout == "NCHW16c":
        x = te.placeholder((n, _ceil_to(c, LANES) // LANES, h, w, LANES), "uint8", name="x")
        sub = LANES // KBLOCK

        class _View:  # x4[b, c4, y, x, ci] over the NCHW16c tensor
            def __getitem__(self, idx):
                b, cb, y, xx, ci = idx
                return x[b, cb // sub, y, xx, cb % sub * KBLOCK + ci]

        x4 = _View()
    else:
        raise ValueError(f"data_layout must be NCHW, NCHW4c or NCHW16c, got {data_layout!r}")
    if isa == "avx2":
        wt = te.placeholder((oblk, c4 * kh * kw, 2, LANES, 2), "int16", name="W")

        def weight(ob, pos, lane, ci):
            return wt[ob, pos, ci // 2, lane, ci % 2]
    else:
        wt = te.placeholder((oblk, c4 * kh * kw, LANES, KBLOCK), "int8", name="W")

        def weight(ob, pos, lane, ci):
            return wt[ob, pos, lane, ci]

    def col(j):
        return tirx.min(j, ow - 1) if owp != ow else j

    def blk(j):
        return tirx.min(j // LANES, oblk - 1) if opp != oblk * LANES else j // LANES

    rc = te.reduce_axis((0, c4), name="rc")
    rh = te.reduce_axis((0, kh), name="rh")
    rw = te.reduce_axis((0, kw), name="rw")
    ri = te.reduce_axis((0, KBLOCK), name="ri")
    acc = te.compute(
        (n, oh, owp, opp),
        lambda b, y, xx, oc: te.sum(
            x4[b, rc, y * stride + rh, col(xx) * stride + rw, ri].astype("int32")
            * weight(blk(oc), (rc * kh + rh) * kw + rw, oc % LANES, ri).astype("int32"),
            axis=[rc, rh, rw, ri],
        ),
        name="acc",
    )
    params = [x, wt]
    b_t, m0_t, sh_t, lut_t = _epilogue_params(o, bias, requant, params)
    # epilogue in the accumulator's (pixel, channel) order, so it vectorises over channels;
    # padded channels read the last real channel's parameters, then are zeroed/dropped.
    # A lookup table is applied by the ``out`` block, after the transpose: one channel plane
    # at a time, its indices cluster in the table (2.5x faster than 16 channels per vector
    # on small layers, where the 64 KiB table does not stay in L1).
    # (an integer gate runs here, on the accumulator's vectors)
    now, later = split_activation(requant, lut_t)
    epi_dtype = "int32" if requant is None else \
        requant.result_dtype if now is not None else requant.out_dtype

    def epilogue(b, y, xx, oc):
        v = _epilogue_expr(acc[b, y, xx, oc], tirx.min(oc, o - 1), b_t, m0_t, sh_t, requant,
                           now)
        if o % LANES:
            v = tirx.Select(oc < o, v, tirx.const(0, epi_dtype))
        return v

    def finish(v):
        return _activation(v, requant, later) if later is not None else v

    epi = te.compute((n, oh, owp, opp), epilogue, name="epi")
    if out_layout == "NCHW":
        out = te.compute((n, o, oh, ow), lambda b, oc, y, xx: finish(epi[b, y, xx, oc]),
                         name="out")
    else:
        out = te.compute(
            (n, oblk, oh, ow, LANES),
            lambda b, ob, y, xx, lane: finish(epi[b, y, xx, ob * LANES + lane]),
            name="out",
        )
    return te.create_prim_func([*params, out])


def schedule_int8_conv2d(
    func: tirx.PrimFunc, *, mb: int, nb: int, isa: str = "avx512_vnni",
    columns: tuple[int, int] | None = None,
) -> tvm.IRModule:
    """Tile, parallelise and tensorize a PrimFunc made by :func:`int8_conv2d_compute`.

    ``isa="avx2"`` tensorizes each 16-channel block as two exact 8-channel AVX2 blocks
    (build it for an AVX2 target, e.g. ``mcpu="haswell"``); on an ``NCHW`` input, re-laid
    out in int16, with :data:`.vnni_intrin.AVX2_WIDE_INTRIN`. ``columns = (left padding,
    input width)`` lets that re-layout copy the inside of each row without a padding test.
    """
    intrin, lanes = _isa_intrin(isa)
    sch = Schedule(func)
    names = {sch.get(blk).name_hint for blk in sch.get_child_blocks(sch.get_sblock("root"))}
    widened = "x4c" in names and isa == "avx2"
    if widened:
        intrin = AVX2_WIDE_INTRIN
    acc = sch.get_sblock("acc")
    b, y, xx, oc, rc, rh, rw, ri = sch.get_loops(acc)
    xo, xi = sch.split(xx, [None, mb])
    oo, o1, oi = sch.split(oc, [None, nb, LANES])
    sch.reorder(oo, b, y, xo, rc, rh, rw, xi, o1, oi, ri)
    row = sch.fuse(oo, b, y)
    sch.parallel(row)
    # The register tile (mb x nb*16) is written back into a row buffer (OW x nb*16), and the
    # epilogue runs once per row: each output channel's row is then stored contiguously
    # (whole cache lines) instead of mb elements per channel plane per tile, which thrashed
    # L1 when the plane size was a multiple of 4 KiB.
    tile_wb = sch.cache_write(acc, 0, "global")
    sch.reverse_compute_at(tile_wb, xo)
    epi = sch.get_sblock("epi")
    out = sch.get_sblock("out")
    sch.reverse_compute_at(epi, row)
    sch.reverse_compute_at(out, row)
    init = sch.decompose_reduction(acc, rc)
    if lanes != LANES:
        half, oi = sch.split(oi, [None, lanes])
    sch.tensorize(oi, intrin)
    if lanes != LANES:
        sch.unroll(half)
    sch.set_scope(init, 0, "local")
    sch.unroll(xi)
    sch.unroll(o1)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(tile_wb)[-1])
    if len(sch.get(out).iter_vars) == 5:  # NCHW16c: no transpose, 16-lane stores
        sch.compute_inline(epi)
        sch.vectorize(sch.get_loops(out)[-1])
    else:
        el = sch.get_loops(epi)
        sch.vectorize(sch.split(el[-1], [None, LANES])[1])
    if "x4c" in names:
        schedule_relayout(sch, columns=columns if widened else None)
    return sch.mod


def int8_conv2d(
    n: int,
    c: int,
    h: int,
    w: int,
    o: int,
    kh: int,
    kw: int,
    stride: int = 1,
    *,
    data_layout: str = "NCHW",
    out_layout: str = "NCHW",
    bias: bool = False,
    requant: Requant | None = None,
    mb: int | None = None,
    nb: int | None = None,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    pad_value: int = 0,
    isa: str = "avx512_vnni",
) -> tvm.IRModule:
    """Scheduled, tensorized IRModule (PrimFunc ``"main"``) of the conv kernel.

    ``h``, ``w`` are the dimensions of the input; ``pad`` (``top, left, bottom, right``, NCHW
    only) pads it with ``pad_value`` inside the kernel, else it must come padded. ``isa``:
    ``"avx512_vnni"`` or ``"avx2"``.
    """
    _, ow = conv_output_size(h + pad[0] + pad[2], w + pad[1] + pad[3], kh, kw, stride)
    dmb, dnb = default_conv_tiles(ow, o, isa)
    mb, nb = mb or dmb, nb or dnb
    func = int8_conv2d_compute(
        n, c, h, w, o, kh, kw, stride, data_layout=data_layout, out_layout=out_layout,
        bias=bias, requant=requant, mb=mb, nb=nb, pad=pad, pad_value=pad_value, isa=isa,
    )
    return schedule_int8_conv2d(func, mb=mb, nb=nb, isa=isa,
                                columns=(pad[1], w) if data_layout == "NCHW" else None)


def build_int8_conv2d(*args, target: tvm.target.Target | None = None, **kwargs):
    """Compile :func:`int8_conv2d`; returns ``tvm.compile``'s executable (function ``"main"``)."""
    isa = kwargs.get("isa", "avx512_vnni")
    return tvm.compile(int8_conv2d(*args, **kwargs), target or default_target(isa))
