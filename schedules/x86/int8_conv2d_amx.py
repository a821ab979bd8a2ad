"""u8 x s8 -> s32 stride-1 conv2d on AMX-INT8 tiles (Sapphire Rapids and later).

``out[n, o, oh, ow] = epilogue(sum_{c, kh, kw} x[n, c, oh + kh, ow + kw] * w[o, c, kh, kw])``

The layout is :mod:`.int8_conv2d_pixels`'s, scaled from one ``vpdpbusd`` (16 pixels x 4
channels x 1 output channel) to one ``tdpbsud`` (16 pixels x 64 channels x 16 output
channels): in the ``NCHW4c`` input, 16 neighbouring pixels x 4 channels are 64 contiguous
bytes, one row of an AMX tile, and 16 such rows 4 channels apart are a 16 x 64 tile of the
unsigned operand; 16 output channels x 64 input channels of one kernel position are a tile
of the signed operand. The accumulator tile is ``[16 output channels, 16 pixels]``: part of
an ``NCHW`` output row (:func:`.amx_intrin.conv_row_intrin`).

Layouts
-------
- Input ``x``: uint8 ``NCHW``, re-laid out by the kernel as ``NCHW4c`` with its spatial
  padding, its channels padded with zeros to a multiple of 64 (a tile's depth), and columns
  on the right up to the last tile's reach.
- Weight: int8 ``OIHW`` packed by :func:`pack_conv_weight_amx` into ``[O', KH, KW, C'/4, 4]``
  (``O'`` the output channels rounded up to the register tile's ``16 * nb``, ``C'`` the
  input channels rounded up to 64, both zero padded).
- Output ``[N, O, OH, OW]``: int32, or uint8/int8/int16 with the fused requantization
  epilogue of :mod:`.int8_dense` (lookup table included). PrimFunc parameters: ``x, W,
  [bias], [m0, shift], [lut], out``.

Schedule: (channel block, image, output row) triples spread over the cores; one intrinsic
call per triple computes the row's int32 sums in tiles (configuring the tiles once), and the
epilogue runs on the finished row, vectorized along it (as the pixel kernel's).

``backend="emulate"`` builds the same kernel with every AMX instruction run by
:mod:`.amx_emulator` (slow: one Python call per instruction), which is how it is tested on
CPUs without AMX.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from .amx_intrin import GROUPS, TILE_ROWS, conv_row_intrin
from .int8_conv2d import check_pad, conv_output_size, relayout_nchw4c, schedule_relayout
from .int8_conv2d_pixels import row_epilogue, vectorize_row_epilogue
from .int8_dense import KBLOCK, Requant, _ceil_to, default_target

#: Input channels in one tile's depth (16 groups of 4).
DEPTH = GROUPS * KBLOCK


def amx_tiles(ow: int, o: int) -> tuple[int, int]:
    """Register tile ``(mb, nb)``: ``mb`` blocks of 16 pixels x ``nb`` blocks of 16 output
    channels, each 1 or 2 (4 accumulator tiles at most). Two blocks share each operand tile
    load; a second block is taken where it pads the row (or the channels) by less than an
    eighth more."""
    def blocks(extent: int) -> int:
        return 2 if extent > TILE_ROWS and \
            _ceil_to(extent, 2 * TILE_ROWS) <= 1.125 * _ceil_to(extent, TILE_ROWS) else 1
    return blocks(ow), blocks(o)


def prefer_amx(c: int, o: int, ow: int, kh: int, kw: int) -> bool:
    """Whether a stride-1 ``kh x kw`` conv with ``c`` input channels, ``o`` output channels
    and ``ow``-wide output rows goes on AMX rather than the AVX-512 VNNI kernels (a 1x1 kernel
    or one at least 2x2; not ``1 x k``): when at least
    a quarter of the multiply-adds that the tiles compute are the conv's (the rest meets the
    zero padding of channels and rows). A tile multiply does 16384 multiply-adds in about 16
    cycles, ``vpdpbusd`` 64 in one or two, so a quarter still leaves AMX ahead; an estimate
    from those rates, not yet measured (this project's machine has no AMX)."""
    if (kh == 1) != (kw == 1):
        return False
    mb, nb = amx_tiles(ow, o)
    used = c * o * ow
    computed = _ceil_to(c, DEPTH) * _ceil_to(o, TILE_ROWS * nb) * _ceil_to(ow, TILE_ROWS * mb)
    return used >= 0.25 * computed


def pack_conv_weight_amx(w: np.ndarray, nb: int) -> np.ndarray:
    """``OIHW`` int8 -> ``[ceil(O, 16 nb), KH, KW, ceil(C, 64) / 4, 4]`` (zero padded)."""
    w = np.asarray(w)
    if w.ndim != 4 or w.dtype != np.int8:
        raise ValueError(f"pack_conv_weight_amx wants an int8 OIHW weight, got {w.dtype} "
                         f"{w.shape}")
    o, c, kh, kw = w.shape
    op, cp = _ceil_to(o, TILE_ROWS * nb), _ceil_to(c, DEPTH)
    wp = np.zeros((op, cp, kh, kw), dtype=np.int8)
    wp[:o, :c] = w
    # [o, c4, ci, kh, kw] -> [o, kh, kw, c4, ci]
    t = wp.reshape(op, cp // KBLOCK, KBLOCK, kh, kw).transpose(0, 3, 4, 1, 2)
    return np.ascontiguousarray(t)


def int8_conv2d_amx_compute(
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
) -> tirx.PrimFunc:
    """The unscheduled PrimFunc: blocks ``x4c``, ``acc``, ``epi``, ``out``."""
    top, left, bottom, right = check_pad(pad, pad_value)
    oh, ow = conv_output_size(h + top + bottom, w + left + right, kh, kw, 1)
    if oh < 1 or ow < 1:
        raise ValueError("kernel larger than the (padded) input")
    cp = _ceil_to(c, DEPTH)
    owp = _ceil_to(ow, TILE_ROWS * mb)
    op = _ceil_to(o, TILE_ROWS * nb)
    x = te.placeholder((n, c, h, w), "uint8", name="x")
    x4 = relayout_nchw4c(x, pad, pad_value, width=owp + kw - 1, channels=cp)
    wt = te.placeholder((op, kh, kw, cp // KBLOCK, KBLOCK), "int8", name="W")
    if (kh == 1) != (kw == 1):
        raise ValueError(f"the AMX conv takes 1x1 kernels or ones at least 2x2, not {kh}x{kw}")
    rc = te.reduce_axis((0, cp // KBLOCK), name="rc")
    ri = te.reduce_axis((0, KBLOCK), name="ri")
    if kh == 1:  # no unit axes: the intrinsic's 1x1 form has none
        rh = rw = 0
        axes = [rc, ri]
    else:
        rh = te.reduce_axis((0, kh), name="rh")
        rw = te.reduce_axis((0, kw), name="rw")
        axes = [rc, rh, rw, ri]
    # rows outermost: one row's channels x pixels are the intrinsic's (contiguous) output
    acc = te.compute(
        (n, oh, op, owp),
        lambda b, y, oc, xx: te.sum(
            x4[b, rc, y + rh, xx + rw, ri].astype("int32")
            * wt[oc, rh, rw, rc, ri].astype("int32"),
            axis=axes,
        ),
        name="acc",
    )
    params = [x, wt]
    out = row_epilogue(lambda b, oc, y, xx: acc[b, y, oc, xx], (n, op, oh, owp), o, ow,
                       params, bias=bias, requant=requant)
    return te.create_prim_func([*params, out])


def schedule_int8_conv2d_amx(func: tirx.PrimFunc, *, mb: int, nb: int,
                             backend: str = "amx") -> tvm.IRModule:
    """Parallelise and tensorize a PrimFunc made by :func:`int8_conv2d_amx_compute`."""
    sch = Schedule(func)
    acc = sch.get_sblock("acc")
    b, y, oc, xx, rc, *kernel, _ = sch.get_loops(acc)  # kernel: (rh, rw), or none for 1x1
    kh, kw = (int(sch.get(k).extent) for k in kernel) if kernel else (1, 1)
    oo, oi = sch.split(oc, [None, TILE_ROWS * nb])
    sch.reorder(oo, b, y, oi, xx)
    row = sch.fuse(oo, b, y)
    sch.parallel(row)
    epi, out = sch.get_sblock("epi"), sch.get_sblock("out")
    sch.reverse_compute_at(epi, row, preserve_unit_loops=True)
    sch.reverse_compute_at(out, row, preserve_unit_loops=True)
    init = sch.decompose_reduction(acc, oi)
    c4, width = int(sch.get(rc).extent), int(sch.get(xx).extent)
    sch.tensorize(oi, conv_row_intrin(c4, kh, kw, width, nb, mb, backend))
    sch.vectorize(sch.get_loops(init)[-1])
    vectorize_row_epilogue(sch)
    schedule_relayout(sch)
    return sch.mod


def int8_conv2d_amx(
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
    backend: str = "amx",
) -> tvm.IRModule:
    """Scheduled, tensorized IRModule (PrimFunc ``"main"``) of the AMX conv kernel (stride
    1; ``pad`` is ``(top, left, bottom, right)``, filled with ``pad_value``). The weight is
    packed with :func:`pack_conv_weight_amx` and the same ``nb``: :func:`amx_tiles` gives
    the default ``(mb, nb)``."""
    _, ow = conv_output_size(h + pad[0] + pad[2], w + pad[1] + pad[3], kh, kw, 1)
    dmb, dnb = amx_tiles(ow, o)
    mb, nb = mb or dmb, nb or dnb
    func = int8_conv2d_amx_compute(n, c, h, w, o, kh, kw, bias=bias, requant=requant,
                                   mb=mb, nb=nb, pad=pad, pad_value=pad_value)
    return schedule_int8_conv2d_amx(func, mb=mb, nb=nb, backend=backend)


def build_int8_conv2d_amx(*args, target: tvm.target.Target | None = None, **kwargs):
    """Compile :func:`int8_conv2d_amx`; ``tvm.compile``'s executable (``"main"``). The
    ``"amx"`` back end needs an AMX target (``x86-amx``) and, to run, an AMX CPU."""
    if target is None:
        target = default_target("amx" if kwargs.get("backend", "amx") == "amx" else
                                "avx512_vnni")
    return tvm.compile(int8_conv2d_amx(*args, **kwargs), target)
