"""AMX-INT8 tensor intrinsics (Sapphire Rapids and later), with an emulated twin for other CPUs.

An AMX core holds 8 *tiles* of up to 16 rows x 64 bytes. ``tdpbsud c, a, b`` multiplies a
16 x 64 int8 tile ``a`` with a 16 x 64 uint8 tile ``b`` seen as ``[16 (k), 16 (n), 4]``:
``c[m, n] += sum_{k, i} s8(a[m, 4k + i]) * u8(b[k, 4n + i])``, 16 x 16 x 64 = 16384
multiply-adds in one instruction (256 ``vpdpbusd`` lanes' worth).

``tvmquant_amx_conv_row_*`` (:func:`conv_row_intrin`)
    One output row of a stride-1 convolution (a 1x1 kernel, or one at least 2 x 2) for
    ``16 * nb`` output channels:
    ``C[o, p] += sum_{rc, rh, rw, i} int32(X[rc, rh, p + rw, i]) * int32(W[o, rh, rw, rc, i])``
    with ``X`` the ``NCHW4c`` input (4 channels per pixel, so 16 pixels x 4 channels of a row
    are 64 contiguous bytes: one row of a ``b`` tile, the next row 4 channels further), ``W``
    the weights packed ``[O, KH, KW, C/4, 4]`` (16 channel groups x 4 of one output channel
    are one row of an ``a`` tile) and ``C`` int32. The weights are the *signed* operand, so
    the instruction is ``tdpbsud`` (``a`` signed, ``b`` unsigned), and the accumulator tile
    comes out as ``[16 channels, 16 pixels]``: a row of ``NCHW``. Register tile: ``nb``
    channel blocks x ``mb`` pixel blocks (``nb * mb <= 4`` accumulators in tiles 0-3, the
    weights in tiles 4-5, the input in tiles 6-7). The intrinsic configures the tiles
    (``ldtilecfg``) once per call, that is once per output row, and keeps the accumulators
    in tiles over the whole reduction.

``tvmquant_amx_dense_*`` (:func:`dense_intrin`)
    A ``16 mb x 16 nb`` block of a matmul, the whole reduction in tiles: 16 rows of the
    uint8 activations x 64 bytes are an unsigned tile, 16 of the packed weights' 64-byte
    blocks (:func:`.int8_dense.pack_weight`) a signed one, so the instruction is
    ``tdpbusd`` and the accumulator ``[16 rows, 16 columns]`` (:mod:`.int8_dense_amx`).

Each intrinsic exists in two back ends built from the same code (:class:`AmxOps`):
``"amx"`` emits LLVM's AMX intrinsics; ``"emulate"`` turns every AMX instruction into a call
into :mod:`.amx_emulator` with the same operands, so the kernel's instruction stream (tile
configuration, addresses, strides, tile numbers) runs and is checked on any CPU.

On Linux a process must ask for the AMX register state before its first tile instruction:
:func:`tvmquant.targets.request_amx_permission` (tvmquant calls it where it builds or runs
modules; a program that loads an exported library on its own calls it, or gets
``SIGILL``).
"""

from __future__ import annotations

import numpy as np
from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from ...targets import cpu_has_amx, request_amx_permission  # noqa: F401  (re-exported)
from . import amx_emulator

#: Tile numbers: accumulators 0-3, the signed operand (weights) 4-5, the unsigned one 6-7.
ACC_TILES, A_TILES, B_TILES = (0, 1, 2, 3), (4, 5), (6, 7)
#: Rows and bytes per row of every tile here (the palette's maximum).
TILE_ROWS, TILE_BYTES = 16, 64
#: Input channel groups (of 4) in one ``b`` tile: its 16 rows.
GROUPS = TILE_ROWS
BACKENDS = ("amx", "emulate")


def tile_config(shapes=((TILE_ROWS, TILE_BYTES),) * 8) -> bytes:
    """The 64-byte ``ldtilecfg`` operand for palette 1: tile ``t`` has ``shapes[t] = (rows,
    bytes per row)``."""
    if len(shapes) > 8:
        raise ValueError("palette 1 has 8 tiles")
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1  # palette 1; byte 1, the start row, stays 0
    colsb = np.zeros(8, "<u2")
    for t, (rows, nbytes) in enumerate(shapes):
        if not (0 < rows <= TILE_ROWS and 0 < nbytes <= TILE_BYTES):
            raise ValueError(f"tile {t}: {rows} x {nbytes} bytes")
        colsb[t] = nbytes
        cfg[48 + t] = rows
    cfg[16:32] = colsb.view(np.uint8)
    return cfg.tobytes()


class AmxOps:
    """The AMX instructions as TIR expressions, in one back end (``"amx"`` or ``"emulate"``)."""

    def __init__(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"AMX back end must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def _call(self, name: str, *args):
        if self.backend == "amx":
            return tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args)
        # the emulator's functions take the tile numbers as plain integers
        args = [tirx.Cast("int32", a) if getattr(a, "dtype", None) == "int8" else a
                for a in args]
        return tirx.call_packed(amx_emulator.PREFIX + name, *args)

    @staticmethod
    def _tile(t):
        return tirx.Cast("int8", t)

    def ldtilecfg(self, ptr):
        return self._call("ldtilecfg", ptr)

    def tilerelease(self):
        return self._call("tilerelease")

    def tileloadd(self, t, ptr, stride_bytes):
        return self._call("tileloadd64", self._tile(t), ptr, tirx.Cast("int64", stride_bytes))

    def tilestored(self, t, ptr, stride_bytes):
        return self._call("tilestored64", self._tile(t), ptr, tirx.Cast("int64", stride_bytes))

    def tdpbsud(self, c, a, b):
        """``c += s8(a) . u8(b)``."""
        return self._call("tdpbsud", self._tile(c), self._tile(a), self._tile(b))

    def tdpbusd(self, c, a, b):
        """``c += u8(a) . s8(b)``."""
        return self._call("tdpbusd", self._tile(c), self._tile(a), self._tile(b))


def _config_words() -> list[int]:
    """The tile configuration as 8 little-endian int64 words (how the kernels store it)."""
    return [int(v) for v in np.frombuffer(tile_config(), "<i8")]


_WORDS = _config_words()


@T.macro
def _configure_tiles(ops):
    """``ldtilecfg`` of :func:`tile_config`'s 64 bytes, written to the stack as 8 words."""
    cfg = T.alloc_buffer((8,), "int64", scope="local")
    cfg[0] = T.int64(_WORDS[0])
    cfg[1] = T.int64(_WORDS[1])
    cfg[2] = T.int64(_WORDS[2])
    cfg[3] = T.int64(_WORDS[3])
    cfg[4] = T.int64(_WORDS[4])
    cfg[5] = T.int64(_WORDS[5])
    cfg[6] = T.int64(_WORDS[6])
    cfg[7] = T.int64(_WORDS[7])
    T.evaluate(ops.ldtilecfg(cfg.access_ptr("r")))


def conv_row_intrin(c4: int, kh: int, kw: int, width: int, nb: int, mb: int,
                    backend: str = "amx") -> str:
    """Register (once) and name the intrinsic computing one output row (``width`` pixels, a
    multiple of ``16 * mb``) of ``16 * nb`` output channels of a stride-1 ``kh x kw``
    convolution over ``4 * c4`` input channels (``c4`` a multiple of 16); see the module
    docstring."""
    if c4 % GROUPS or width % (TILE_ROWS * mb) or not (1 <= nb <= 2 and 1 <= mb <= 2) or \
            (kh == 1) != (kw == 1):
        raise ValueError(f"conv row intrinsic: c4={c4} (multiple of 16), width={width} "
                         f"(multiple of {16 * mb}), nb={nb}, mb={mb} (1 or 2), kernel "
                         f"{kh}x{kw} (1x1, or both sides above 1)")
    name = f"tvmquant_amx_conv_row_c{c4}_k{kh}x{kw}_w{width}_n{nb}m{mb}_{backend}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    ops = AmxOps(backend)
    oc, span, blocks = TILE_ROWS * nb, width + kw - 1, c4 // GROUPS
    steps = width // (TILE_ROWS * mb)
    sxc, sxh, swo, sco = (tirx.Var(v, "int32") for v in ("sxc", "sxh", "swo", "sco"))
    bytes_c = 4  # int32 accumulators

    @T.prim_func(s_tir=True)
    def desc(
        X: T.Buffer((c4, kh, span, 4), "uint8", strides=[sxc, sxh, 4, 1], offset_factor=1),
        W: T.Buffer((oc, kh, kw, c4, 4), "int8", strides=[swo, kw * c4 * 4, c4 * 4, 4, 1],
                    offset_factor=1),
        C: T.Buffer((oc, width), "int32", strides=[sco, 1], offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:oc, 0:width], X[0:c4, 0:kh, 0:span, 0:4], W[0:oc, 0:kh, 0:kw, 0:c4, 0:4])
            T.writes(C[0:oc, 0:width])
            if kh == 1:  # a 1x1 kernel: the block has no kernel-position axes
                for o, p, rc, ri in T.grid(oc, width, c4, 4):
                    with T.sblock("update"):
                        vo, vp, vc, vi = T.axis.remap("SSRR", [o, p, rc, ri])
                        C[vo, vp] = C[vo, vp] + T.cast(X[vc, 0, vp, vi], "int32") * \
                            T.cast(W[vo, 0, 0, vc, vi], "int32")
            else:
                for o, p, rc, rh, rw, ri in T.grid(oc, width, c4, kh, kw, 4):
                    with T.sblock("update"):
                        vo, vp, vc, vh, vw, vi = T.axis.remap("SSRRRR", [o, p, rc, rh, rw, ri])
                        C[vo, vp] = C[vo, vp] + T.cast(X[vc, vh, vp + vw, vi], "int32") * \
                            T.cast(W[vo, vh, vw, vc, vi], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        X: T.Buffer((c4, kh, span, 4), "uint8", strides=[sxc, sxh, 4, 1], offset_factor=1),
        W: T.Buffer((oc, kh, kw, c4, 4), "int8", strides=[swo, kw * c4 * 4, c4 * 4, 4, 1],
                    offset_factor=1),
        C: T.Buffer((oc, width), "int32", strides=[sco, 1], offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:oc, 0:width], X[0:c4, 0:kh, 0:span, 0:4], W[0:oc, 0:kh, 0:kw, 0:c4, 0:4])
            T.writes(C[0:oc, 0:width])
            _configure_tiles(ops)
            for xo in range(steps):
                for i in T.unroll(nb):
                    for j in T.unroll(mb):
                        T.evaluate(ops.tileloadd(
                            i * mb + j,
                            C.access_ptr("r", offset=i * TILE_ROWS * sco
                                         + (xo * mb + j) * TILE_ROWS),
                            sco * bytes_c))
                for rh, rw, cb in T.grid(kh, kw, blocks):
                    for i in T.unroll(nb):
                        T.evaluate(ops.tileloadd(
                            A_TILES[0] + i,
                            W.access_ptr("r", offset=i * TILE_ROWS * swo + rh * (kw * c4 * 4)
                                         + rw * (c4 * 4) + cb * GROUPS * 4),
                            swo))
                    for j in T.unroll(mb):
                        T.evaluate(ops.tileloadd(
                            B_TILES[0] + j,
                            X.access_ptr("r", offset=cb * GROUPS * sxc + rh * sxh
                                         + ((xo * mb + j) * TILE_ROWS + rw) * 4),
                            sxc))
                    for i in T.unroll(nb):
                        for j in T.unroll(mb):
                            T.evaluate(ops.tdpbsud(i * mb + j, A_TILES[0] + i,
                                                   B_TILES[0] + j))
                for i in T.unroll(nb):
                    for j in T.unroll(mb):
                        T.evaluate(ops.tilestored(
                            i * mb + j,
                            C.access_ptr("w", offset=i * TILE_ROWS * sco
                                         + (xo * mb + j) * TILE_ROWS),
                            sco * bytes_c))
            T.evaluate(ops.tilerelease())

    TensorIntrin.register(name, desc, impl)
    return name


def dense_intrin(k4: int, nb: int, mb: int, backend: str = "amx") -> str:
    """Register (once) and name the intrinsic computing a ``16 mb x 16 nb`` block of a
    matmul over ``4 * k4`` reduction elements (``k4`` a multiple of 16):
    ``C[i, jb, jl] += sum_{k, q} int32(A[i, 4k + q]) * int32(W[jb, k, jl, q])`` with ``A`` the
    uint8 activations (row-major: 16 rows x 64 bytes are an unsigned tile), ``W`` the int8
    weights packed ``[N/16, K/4, 16, 4]`` (:func:`.int8_dense.pack_weight`: 16 of its
    64-byte blocks are a signed tile) and ``C`` int32 ``[rows, N/16, 16]``: ``tdpbusd``.
    Accumulators in tiles 0-3 (``mb * nb <= 4``), ``A`` in 4-5, ``W`` in 6-7."""
    if k4 % GROUPS or not (1 <= nb <= 2 and 1 <= mb <= 2):
        raise ValueError(f"dense intrinsic: k4={k4} (multiple of 16), nb={nb}, mb={mb} "
                         "(1 or 2)")
    name = f"tvmquant_amx_dense_k{k4}_n{nb}m{mb}_{backend}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    ops = AmxOps(backend)
    rows, kp, blocks = TILE_ROWS * mb, 4 * k4, k4 // GROUPS
    sa, sw, sc = (tirx.Var(v, "int32") for v in ("sa", "sw", "sc"))

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((rows, kp), "uint8", strides=[sa, 1], offset_factor=1),
        W: T.Buffer((nb, k4, 16, 4), "int8", strides=[sw, 64, 4, 1], offset_factor=1),
        C: T.Buffer((rows, nb, 16), "int32", strides=[sc, 16, 1], offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:nb, 0:16], A[0:rows, 0:kp], W[0:nb, 0:k4, 0:16, 0:4])
            T.writes(C[0:rows, 0:nb, 0:16])
            if nb == 1:  # one column block: the block has no block axis (a unit loop)
                for i, jl, k, q in T.grid(rows, 16, k4, 4):
                    with T.sblock("update"):
                        vi, vl, vk, vq = T.axis.remap("SSRR", [i, jl, k, q])
                        C[vi, 0, vl] = C[vi, 0, vl] + T.cast(A[vi, vk * 4 + vq], "int32") * \
                            T.cast(W[0, vk, vl, vq], "int32")
            else:
                for i, jb, jl, k, q in T.grid(rows, nb, 16, k4, 4):
                    with T.sblock("update"):
                        vi, vb, vl, vk, vq = T.axis.remap("SSSRR", [i, jb, jl, k, q])
                        C[vi, vb, vl] = C[vi, vb, vl] + T.cast(A[vi, vk * 4 + vq], "int32") * \
                            T.cast(W[vb, vk, vl, vq], "int32")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((rows, kp), "uint8", strides=[sa, 1], offset_factor=1),
        W: T.Buffer((nb, k4, 16, 4), "int8", strides=[sw, 64, 4, 1], offset_factor=1),
        C: T.Buffer((rows, nb, 16), "int32", strides=[sc, 16, 1], offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:rows, 0:nb, 0:16], A[0:rows, 0:kp], W[0:nb, 0:k4, 0:16, 0:4])
            T.writes(C[0:rows, 0:nb, 0:16])
            _configure_tiles(ops)
            for i in T.unroll(mb):
                for j in T.unroll(nb):
                    T.evaluate(ops.tileloadd(
                        i * nb + j, C.access_ptr("r", offset=i * TILE_ROWS * sc + j * 16),
                        sc * 4))
            for kb in range(blocks):
                for i in T.unroll(mb):
                    T.evaluate(ops.tileloadd(
                        A_TILES[0] + i,
                        A.access_ptr("r", offset=i * TILE_ROWS * sa + kb * TILE_BYTES), sa))
                for j in T.unroll(nb):
                    T.evaluate(ops.tileloadd(
                        B_TILES[0] + j,
                        W.access_ptr("r", offset=j * sw + kb * GROUPS * 64), 64))
                for i in T.unroll(mb):
                    for j in T.unroll(nb):
                        T.evaluate(ops.tdpbusd(i * nb + j, A_TILES[0] + i, B_TILES[0] + j))
            for i in T.unroll(mb):
                for j in T.unroll(nb):
                    T.evaluate(ops.tilestored(
                        i * nb + j, C.access_ptr("w", offset=i * TILE_ROWS * sc + j * 16),
                        sc * 4))
            T.evaluate(ops.tilerelease())

    TensorIntrin.register(name, desc, impl)
    return name
