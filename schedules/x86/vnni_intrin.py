"""x86 int8 dot-product tensor intrinsics (AVX-512 VNNI, AVX2 fallback).

Registered under tvmquant's own names (never over TVM's upstream ``dot_16x4_vnni``):

``tvmquant_dot_16x4_vnni`` (:data:`VNNI_INTRIN`)
    ``C[i] += sum_k int32(A[k]) * int32(B[i, k])`` for ``i < 16``, ``k < 4``; ``A`` uint8[4]
    (broadcast to all 16 lanes), ``B`` int8[16, 4], ``C`` int32[16]. One ``vpdpbusd zmm``.
    ``B`` must be one contiguous 64-byte block (strides ``[4, 1]``): the weights are packed
    ``N/16 x K/4 x 16 x 4`` (see :func:`tvmquant.schedules.x86.int8_dense.pack_weight`) so
    that this holds. The description declares those strides, so tensorizing onto an unpacked
    ``(N, K)`` weight fails to compile instead of silently reading the wrong bytes.

``tvmquant_dot_16x4_vnni_window_s{1,2,3}`` (:func:`window_intrin`)
    ``C[i] += sum_k int32(A[i * stride + k]) * int32(B[k])``: 16 output pixels x 4 kernel
    columns of a convolution row, cut from one 64-byte load of the row by a byte shuffle
    (``vpermb``), weights ``B`` broadcast. The depthwise kernel's
    (:mod:`.int8_depthwise_conv2d`).

``tvmquant_dot_16x4_vnni_pixels`` (:data:`PIXELS_INTRIN`)
    ``C[i] += sum_k int32(A[i, k]) * int32(B[k])``: 16 *pixels* of an ``NCHW4c`` row (their
    4 channels each, 64 contiguous bytes) against one output channel's 4 weights, broadcast.
    The kernel of :mod:`.int8_conv2d_pixels`, for convolutions with few output channels.

``tvmquant_dot_16x4_avx2_pixels`` (:data:`AVX2_PIXELS_INTRIN`)
    The pixel-lane product for AVX2 machines: the same 16 pixels x 4 channels, read from an
    input that the kernel widened to int16 and laid out in channel *pairs*
    (``A`` int16 ``[2, 16, 2]``: each pair's 16 pixels are 64 contiguous bytes, the two
    pairs a run-time stride apart), against the 4 weights widened to int16. Four
    ``vpmaddwd`` (8 pixels x one channel pair each, the pair's two weights broadcast as one
    int32) and four ``vpaddd``. Exact for every uint8 x int8 input.

``tvmquant_dot_8x4_avx2_window`` (:data:`AVX2_WINDOW_INTRIN`)
    ``C[j] += sum_k int32(A[2j + k]) * int32(B[k])`` (``j < 8``, ``k < 4``): 8 outputs of a
    depthwise row, 2 input columns apart (stride 2, or the even or the odd outputs of a
    stride-1 row) x 4 kernel columns, for AVX2 CPUs. Two 16-byte loads of the row (at 0
    and 2) widened to int16 (``vpmovzxbw``) hold the pairs ``(A[2j], A[2j+1])`` and
    ``(A[2j+2], A[2j+3])``; two ``vpmaddwd`` with the weight pairs (int16, broadcast) add
    them. Exact for every uint8 x int8 input.

``tvmquant_dot_8x4_avx2_i16_wide`` (:data:`AVX2_WIDE_INTRIN`)
    :data:`AVX2_INTRIN` on an input that the conv kernel's re-layout already widened to
    int16 (``A`` int16[4]): each pair is one ``vpbroadcastd`` from memory instead of byte
    masks and shifts in general registers.

``tvmquant_dot_8x4_avx2_i16`` (:data:`AVX2_INTRIN`)
    The same product with 8 output lanes, for AVX2 machines without VNNI, on weights that
    the packing widened to int16 in reduction pairs (``B`` int16 ``[2, 8, 2]``, lanes
    stride 2, pairs stride 32: :func:`.int8_dense.pack_weight` and
    :func:`.int8_conv2d.pack_conv_weight` with ``isa="avx2"``). Exact for every uint8 x
    int8 input: each activation pair, zero-extended to int16, is broadcast and multiplied
    with 8 weight pairs by one ``vpmaddwd`` (2 per block, plus 2 ``vpaddd``). (The classic
    ``vpmaddubsw`` sequence is NOT used: its int16 pair sums saturate, e.g. 255*127*2.)

Why not TVM's own ``dot_16x4_vnni``: it passes ``int32x16`` operands to
``llvm.x86.avx512.vpdpbusd.512``, but the LLVM inside the apache-tvm 0.27 wheel declares that
intrinsic with ``<64 x i8>`` operands, so the LLVM module fails verification. Here the
broadcast activations are reinterpreted as ``uint8x64`` and the weights loaded as ``int8x64``.

Importing this module registers the intrinsics (idempotently).
"""

from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_INTRIN = "tvmquant_dot_16x4_vnni"
AVX2_INTRIN = "tvmquant_dot_8x4_avx2_i16"
AVX2_PIXELS_INTRIN = "tvmquant_dot_16x4_avx2_pixels"
AVX2_WIDE_INTRIN = "tvmquant_dot_8x4_avx2_i16_wide"
AVX2_WINDOW_INTRIN = "tvmquant_dot_8x4_avx2_window"

#: Output lanes and reduction depth of each intrinsic.
VNNI_LANES, AVX2_LANES, DOT_K = 16, 8, 4


# ---------------------------------------------------------------------------------------------
# AVX-512 VNNI: 16 x 4
# ---------------------------------------------------------------------------------------------
@T.prim_func(s_tir=True)
def _vnni_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", strides=[4, 1], offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _vnni_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", strides=[4, 1], offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        # No named temporaries here: in TVMScript 0.27 ``x: T.int32 = ...`` inside a prim_func
        # becomes a buffer, which the lowering turns into workspace allocations per call site
        # (``x: T.let = ...`` is the immutable-value form).
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            # the 4 activation bytes, as one int32 broadcast to 16 lanes, seen as 64 x u8
            T.reinterpret(
                T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 16),
                dtype="uint8x64",
            ),
            B.vload([0, 0], dtype="int8x64"),  # the contiguous 16 x 4 weight block
            dtype="int32x16",
        )


# ---------------------------------------------------------------------------------------------
# AVX2 with int16 weights: 8 x 4 in two vpmaddwd
# ---------------------------------------------------------------------------------------------
#: ``C[i] += sum_k int32(A[k]) * int32(B[k // 2, i, k % 2])``: 8 lanes x 4 with the
#: weights widened to int16 once, at packing time, in pairs of reduction elements
#: (``[2, 8, 2]``: the 8 lanes' ``(k0, k1)`` pairs, then their ``(k2, k3)`` pairs). Each
#: ``vpmaddwd`` multiplies a broadcast activation pair with 8 weight pairs straight from
#: memory: 2 ``vpmaddwd`` + 2 ``vpaddd`` per block (the int8 weights widened in registers
#: took 9 instructions with ``vphaddd`` and ``vpermq``: rec on AVX2 14.4 -> 12.5 ms with
#: the conv kernel moved over).


def _avx2_desc(a_dtype: str):
    """The description of the AVX2 8x4 block on a uint8 (:data:`AVX2_INTRIN`) or an
    already widened int16 (:data:`AVX2_WIDE_INTRIN`) activation."""

    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), a_dtype, offset_factor=1),
        B: T.Buffer((2, 8, 2), "int16", strides=[32, 2, 1], offset_factor=1),
        C: T.Buffer((8,), "int32", offset_factor=1),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:2, 0:8, 0:2])
            T.writes(C[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * \
                            T.cast(B[vk // 2, vi, vk % 2], "int32")

    return desc


@T.prim_func(s_tir=True)
def _avx2_i16_impl(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((2, 8, 2), "int16", strides=[32, 2, 1], offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:2, 0:8, 0:2])
        T.writes(C[0:8])
        # the 4 activation bytes as one int32 a0 | a1 << 8 | a2 << 16 | a3 << 24, the pairs
        # (a0, a1) and (a2, a3) zero-extended to int16 in one int32 each, broadcast to the
        # 8 lanes
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + \
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(
                    (T.reinterpret(A.vload([0], "uint8x4"), dtype="int32") & 0xFF)
                    | ((T.reinterpret(A.vload([0], "uint8x4"), dtype="int32") & 0xFF00) << 8),
                    8), dtype="int16x16"),
                B.vload([0, 0, 0], dtype="int16x16"),
                dtype="int32x8",
            ) + \
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(
                    ((T.reinterpret(A.vload([0], "uint8x4"), dtype="int32") >> 16) & 0xFF)
                    | ((T.reinterpret(A.vload([0], "uint8x4"), dtype="int32") >> 8) & 0xFF0000),
                    8), dtype="int16x16"),
                B.vload([1, 0, 0], dtype="int16x16"),
                dtype="int32x8",
            )


@T.prim_func(s_tir=True)
def _avx2_wide_impl(
    A: T.Buffer((4,), "int16", offset_factor=1),
    B: T.Buffer((2, 8, 2), "int16", strides=[32, 2, 1], offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:4], B[0:2, 0:8, 0:2])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + \
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"),
                                          8), dtype="int16x16"),
                B.vload([0, 0, 0], dtype="int16x16"),
                dtype="int32x8",
            ) + \
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(T.reinterpret(A.vload([2], "int16x2"), dtype="int32"),
                                          8), dtype="int16x16"),
                B.vload([1, 0, 0], dtype="int16x16"),
                dtype="int32x8",
            )


@T.prim_func(s_tir=True)
def _avx2_window_desc(
    A: T.Buffer((18,), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:18], B[0:4])
        T.writes(C[0:8])
        for j in T.serial(0, 8):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vj, vk = T.axis.remap("SR", [j, k])
                    C[vj] = C[vj] + T.cast(A[vj * 2 + vk], "int32") * T.cast(B[vk], "int32")


@T.prim_func(s_tir=True)
def _avx2_window_impl(
    A: T.Buffer((18,), "uint8", offset_factor=1),
    B: T.Buffer((4,), "int16", offset_factor=1),
    C: T.Buffer((8,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:8], A[0:18], B[0:4])
        T.writes(C[0:8])
        C[T.ramp(T.int32(0), 1, 8)] = C.vload([0], dtype="int32x8") + \
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.Cast("int16x16", A.vload([0], dtype="uint8x16")),
                T.reinterpret(T.broadcast(T.reinterpret(B.vload([0], "int16x2"), dtype="int32"),
                                          8), dtype="int16x16"),
                dtype="int32x8",
            ) + \
            T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.Cast("int16x16", A.vload([2], dtype="uint8x16")),
                T.reinterpret(T.broadcast(T.reinterpret(B.vload([2], "int16x2"), dtype="int32"),
                                          8), dtype="int16x16"),
                dtype="int32x8",
            )


# ---------------------------------------------------------------------------------------------
# AVX-512 VNNI, pixels on the lanes: 16 pixels x 4 channels (contiguous) . 4 weights
# ---------------------------------------------------------------------------------------------
#: ``C[i] += sum_k int32(A[i, k]) * int32(B[k])``, ``i < 16``, ``k < 4``: 16 pixels of an
#: ``NCHW4c`` row (64 contiguous bytes) against one output channel's 4 weights, broadcast.
PIXELS_INTRIN = "tvmquant_dot_16x4_vnni_pixels"


@T.prim_func(s_tir=True)
def _pixels_desc(
    A: T.Buffer((16, 4), "uint8", strides=[4, 1], offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vi, vk], "int32") * T.cast(B[vk], "int32")


@T.prim_func(s_tir=True)
def _pixels_impl(
    A: T.Buffer((16, 4), "uint8", strides=[4, 1], offset_factor=1),
    B: T.Buffer((4,), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:16, 0:4], B[0:4])
        T.writes(C[0:16])
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            A.vload([0, 0], dtype="uint8x64"),
            # the 4 weights as one int32 broadcast to 16 lanes
            T.reinterpret(
                T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"), 16),
                dtype="int8x64",
            ),
            dtype="int32x16",
        )


# ---------------------------------------------------------------------------------------------
# AVX2, pixels on the lanes: 16 pixels x 2 channel pairs (int16) . 4 weights (int16)
# ---------------------------------------------------------------------------------------------
@T.prim_func(s_tir=True)
def _avx2_pixels_desc(a: T.handle, b: T.handle, c: T.handle) -> None:
    s0 = T.int32()
    A = T.match_buffer(a, (2, 16, 2), "int16", strides=[s0, 2, 1], offset_factor=1)
    B = T.match_buffer(b, (4,), "int16", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2, 0:16, 0:2], B[0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk // 2, vi, vk % 2], "int32") * \
                        T.cast(B[vk], "int32")


@T.prim_func(s_tir=True)
def _avx2_pixels_impl(a: T.handle, b: T.handle, c: T.handle) -> None:
    s0 = T.int32()
    A = T.match_buffer(a, (2, 16, 2), "int16", strides=[s0, 2, 1], offset_factor=1)
    B = T.match_buffer(b, (4,), "int16", offset_factor=1)
    C = T.match_buffer(c, (16,), "int32", offset_factor=1)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:2, 0:16, 0:2], B[0:4])
        T.writes(C[0:16])
        for h in T.unroll(0, 2):  # the two halves of 8 pixels
            C[T.ramp(h * 8, 1, 8)] = C.vload([h * 8], dtype="int32x8") + \
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    A.vload([0, h * 8, 0], dtype="int16x16"),
                    T.reinterpret(T.broadcast(
                        T.reinterpret(B.vload([0], "int16x2"), dtype="int32"), 8),
                        dtype="int16x16"),
                    dtype="int32x8",
                ) + \
                T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                    A.vload([1, h * 8, 0], dtype="int16x16"),
                    T.reinterpret(T.broadcast(
                        T.reinterpret(B.vload([2], "int16x2"), dtype="int32"), 8),
                        dtype="int16x16"),
                    dtype="int32x8",
                )


def window_intrin(stride: int) -> str:
    """``C[i] += sum_k int32(A[i * stride + k]) * int32(B[k])`` (``i < 16``, ``k < 4``): 16
    output pixels x 4 kernel columns of a convolution row, from one 64-byte load of the
    input row (``A`` is read past its last needed byte, up to 64 bytes from its start:
    the caller leaves that much readable memory after it), a byte shuffle (``vpermb``) into
    16 x 4 windows, and one ``vpdpbusd`` with the 4 weights ``B`` broadcast. Registered on
    first use, per stride (1 to 3)."""
    if stride not in (1, 2, 3):
        raise ValueError(f"window intrinsic for stride 1-3, got {stride}")
    name = f"tvmquant_dot_16x4_vnni_window_s{stride}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    span = 15 * stride + 4
    perm = [i * stride + k for i in range(16) for k in range(4)]

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((span,), "uint8", offset_factor=1),
             B: T.Buffer((4,), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:span], B[0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vi * stride + vk], "int32") * \
                            T.cast(B[vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((span,), "uint8", offset_factor=1),
             B: T.Buffer((4,), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:span], B[0:4])
            T.writes(C[0:16])
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                T.Shuffle([A.vload([0], dtype="uint8x64")], perm),
                T.reinterpret(
                    T.broadcast(T.reinterpret(B.vload([0], "int8x4"), dtype="int32"), 16),
                    dtype="int8x64",
                ),
                dtype="int32x16",
            )

    TensorIntrin.register(name, desc, impl)
    return name


def register() -> None:
    """Register the intrinsics under tvmquant's names (no-op when already registered)."""
    if TensorIntrin.get(VNNI_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(VNNI_INTRIN, _vnni_desc, _vnni_impl)
    if TensorIntrin.get(AVX2_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(AVX2_INTRIN, _avx2_desc("uint8"), _avx2_i16_impl)
    if TensorIntrin.get(PIXELS_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(PIXELS_INTRIN, _pixels_desc, _pixels_impl)
    if TensorIntrin.get(AVX2_WINDOW_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(AVX2_WINDOW_INTRIN, _avx2_window_desc, _avx2_window_impl)
    if TensorIntrin.get(AVX2_WIDE_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(AVX2_WIDE_INTRIN, _avx2_desc("int16"), _avx2_wide_impl)
    if TensorIntrin.get(AVX2_PIXELS_INTRIN, allow_missing=True) is None:
        TensorIntrin.register(AVX2_PIXELS_INTRIN, _avx2_pixels_desc, _avx2_pixels_impl)


register()
