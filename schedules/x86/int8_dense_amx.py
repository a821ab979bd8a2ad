"""u8 x s8 -> s32 dense (matmul) on AMX-INT8 tiles (Sapphire Rapids and later).

``C[M, N] = epilogue(A[M, K] @ W^T)``, as :mod:`.int8_dense` computes it, with the tile
unit doing the multiply-adds: 16 rows of ``A`` x 64 of their bytes are one unsigned tile,
16 of :func:`.int8_dense.pack_weight`'s 64-byte blocks (16 output columns x 64 reduction
elements) one signed tile, and ``tdpbusd`` multiplies them into a 16 x 16 int32 tile
(:func:`.amx_intrin.dense_intrin`).

Layouts
-------
- ``A``: uint8 ``[M, K]``, copied by the kernel into a zero-padded ``[M', K']`` (``M'`` the
  rows rounded up to the register tile's ``16 * mb``, ``K'`` the reduction to 64), so that
  every tile load stays inside it.
- ``W``: :func:`pack_weight_amx`: :func:`.int8_dense.pack_weight`'s ``[N/16, K/4, 16, 4]``
  with zero blocks appended up to ``[ceil(N/16, nb), K'/4, 16, 4]``.
- ``C``: ``[M, N]`` int32, or uint8/int8/int16 with :mod:`.int8_dense`'s fused epilogue
  (lookup table included). PrimFunc parameters: ``A, W, [bias], [m0, shift], [lut], C``.

Schedule: (row block, column block) pairs spread over the cores; one intrinsic call each
(the tiles configured once, the whole reduction in tiles), then the epilogue on that block.
``backend="emulate"`` runs the AMX instructions on :mod:`.amx_emulator`.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import te, tirx
from tvm.s_tir import Schedule

from .amx_intrin import GROUPS, TILE_BYTES, TILE_ROWS, dense_intrin
from .int8_dense import (
    LANES,
    Requant,
    _ceil_to,
    _epilogue_expr,
    _epilogue_params,
    default_target,
    pack_weight,
)


def amx_dense_tiles(m: int, n: int) -> tuple[int, int]:
    """Register tile ``(mb, nb)``: ``mb`` blocks of 16 rows x ``nb`` blocks of 16 columns,
    each 1 or 2, a second block taken where it pads by less than an eighth more."""
    def blocks(extent: int) -> int:
        return 2 if extent > TILE_ROWS and \
            _ceil_to(extent, 2 * TILE_ROWS) <= 1.125 * _ceil_to(extent, TILE_ROWS) else 1
    return blocks(m), blocks(n)


def prefer_amx_dense(m: int, n: int, k: int) -> bool:
    """Whether an ``M x N x K`` matmul goes on AMX rather than :mod:`.int8_dense`: when at
    least a quarter of the multiply-adds its tiles compute are real (see
    :func:`.int8_conv2d_amx.prefer_amx`; an estimate, not a measurement)."""
    mb, nb = amx_dense_tiles(m, n)
    computed = _ceil_to(m, TILE_ROWS * mb) * _ceil_to(n, LANES * nb) * _ceil_to(k, TILE_BYTES)
    return m * n * k >= 0.25 * computed


def pack_weight_amx(w: np.ndarray, layout: str, nb: int) -> np.ndarray:
    """:func:`.int8_dense.pack_weight` (``layout`` ``"NK"`` or ``"KN"``) padded with zero
    blocks to ``[ceil(N/16, nb), ceil(K, 64)/4, 16, 4]``."""
    p = pack_weight(w, layout)
    nblk, kblk = p.shape[:2]
    out = np.zeros((_ceil_to(nblk, nb), _ceil_to(kblk, GROUPS), LANES, 4), np.int8)
    out[:nblk, :kblk] = p
    return out


def int8_dense_amx_compute(m: int, n: int, k: int, *, bias: bool = False,
                           requant: Requant | None = None, mb: int = 1,
                           nb: int = 1) -> tirx.PrimFunc:
    """The unscheduled PrimFunc: blocks ``A_pad``, ``acc``, ``C``."""
    mp, kp = _ceil_to(m, TILE_ROWS * mb), _ceil_to(k, TILE_BYTES)
    nbp = _ceil_to(_ceil_to(n, LANES) // LANES, nb)
    a = te.placeholder((m, k), "uint8", name="A")
    w = te.placeholder((nbp, kp // 4, LANES, 4), "int8", name="W")
    a_pad = te.compute(
        (mp, kp),
        lambda i, j: tirx.if_then_else(
            tirx.all(i < m, j < k), a[tirx.min(i, m - 1), tirx.min(j, k - 1)],
            tirx.const(0, "uint8")),
        name="A_pad",
    )
    k4 = te.reduce_axis((0, kp // 4), name="k4")
    q = te.reduce_axis((0, 4), name="q")
    acc = te.compute(
        (mp, nbp, LANES),
        lambda i, jb, jl: te.sum(
            a_pad[i, k4 * 4 + q].astype("int32") * w[jb, k4, jl, q].astype("int32"),
            axis=[k4, q]),
        name="acc",
    )
    params = [a, w]
    b_t, m0_t, sh_t, lut_t = _epilogue_params(n, bias, requant, params)
    c = te.compute(
        (m, n),
        lambda i, j: _epilogue_expr(acc[i, j // LANES, j % LANES], j, b_t, m0_t, sh_t,
                                    requant, lut_t),
        name="C",
    )
    return te.create_prim_func([*params, c])


def schedule_int8_dense_amx(func: tirx.PrimFunc, *, mb: int, nb: int,
                            backend: str = "amx") -> tvm.IRModule:
    """Parallelise and tensorize a PrimFunc made by :func:`int8_dense_amx_compute`."""
    sch = Schedule(func)
    acc = sch.get_sblock("acc")
    i, jb, jl, k4, _ = sch.get_loops(acc)
    io, ii = sch.split(i, [None, TILE_ROWS * mb])
    if nb > 1:
        jo, ji = sch.split(jb, [None, nb])
        sch.reorder(io, jo, ii, ji, jl)
    else:  # no unit loop: the intrinsic's one-block form has none
        jo = jb
        sch.reorder(io, jo, ii, jl)
    tile = sch.fuse(io, jo)
    sch.parallel(tile)
    c = sch.get_sblock("C")
    sch.reverse_compute_at(c, tile, preserve_unit_loops=True)
    init = sch.decompose_reduction(acc, ii)
    sch.tensorize(ii, dense_intrin(int(sch.get(k4).extent), nb, mb, backend))
    sch.vectorize(sch.get_loops(init)[-1])
    cl = sch.get_loops(c)[-1]
    # the epilogue vectorized along the block's columns, unless a lookup table follows (its
    # 5th read, after acc, bias, m0, shift): a 16-lane gather is slower than 16 loads
    if int(sch.get(cl).extent) % LANES == 0 and len(sch.get(c).reads) <= 4:
        sch.vectorize(sch.split(cl, [None, LANES])[1])
    ap = sch.get_sblock("A_pad")
    rows, cols = sch.get_loops(ap)
    sch.parallel(rows)
    sch.vectorize(sch.split(cols, [None, TILE_BYTES])[1])
    return sch.mod


def int8_dense_amx(m: int, n: int, k: int, *, bias: bool = False,
                   requant: Requant | None = None, mb: int | None = None,
                   nb: int | None = None, backend: str = "amx") -> tvm.IRModule:
    """Scheduled, tensorized IRModule (PrimFunc ``"main"``) of the AMX dense kernel; the
    weight is packed by :func:`pack_weight_amx` with the same ``nb`` (default
    :func:`amx_dense_tiles`)."""
    dmb, dnb = amx_dense_tiles(m, n)
    mb, nb = mb or dmb, nb or dnb
    func = int8_dense_amx_compute(m, n, k, bias=bias, requant=requant, mb=mb, nb=nb)
    return schedule_int8_dense_amx(func, mb=mb, nb=nb, backend=backend)


def build_int8_dense_amx(*args, target: tvm.target.Target | None = None, **kwargs):
    """Compile :func:`int8_dense_amx`; ``tvm.compile``'s executable (``"main"``)."""
    if target is None:
        target = default_target("amx" if kwargs.get("backend", "amx") == "amx" else
                                "avx512_vnni")
    return tvm.compile(int8_dense_amx(*args, **kwargs), target)
