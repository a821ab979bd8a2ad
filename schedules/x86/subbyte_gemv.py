"""Sub-byte weight GEMV on AVX-512 VNNI: ``C[M, N] = A[M, K] (u8) . W[N, K] (s8/s4/s2)``.

For the memory-bound shapes (batch-1 matmuls, 1x1 convolutions on few pixels) the time is
the weight bytes streamed from memory, so weights stored at 4 or 2 bits must turn into less
time, not only a smaller file. Layout, packed once at compile time by :func:`pack_subbyte`:

    W_packed[N/16, K/(4*P), 64] int8,   P = 8 / bits values per byte

Byte ``4*i + j`` of block ``(nb, kb)`` holds, in its ``P`` bit fields from the lowest up, the
weights ``W[16*nb + i, 4*P*kb + 4*s + j]`` for ``s = 0..P-1``, stored offset-binary
(``w + 2^(bits-1)``, so every field is a small non-negative number). One 64-byte load
therefore feeds ``P`` ``vpdpbusd`` instructions: field ``s`` is unpacked in registers with
one 16-bit logical shift and one byte mask (AVX-512 has no 8-bit shifts; a sign-extending
unpack would cost several instructions per field) and multiplied with activation bytes
``4*P*kb + 4*s .. + 3``, broadcast to the 16 lanes. The offset comes back out once per row:
``C = acc - 2^(bits-1) * sum_k A[k]``. ``bits = 8`` is the same kernel without unpacking
(the int8 baseline of the benchmarks: same loop structure, only the storage differs).

Weights are two's-complement ``bits``-bit integers (int4 in [-8, 7], int2 in [-2, 1]).
``N`` is padded to 16 and ``K`` to ``4*P`` with zero weights (``A`` must be padded the same
way in ``K``; :func:`gemv_reference` is the exact NumPy reference).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

LANES = 16


def values_per_byte(bits: int) -> int:
    if bits not in (2, 4, 8):
        raise ValueError(f"sub-byte GEMV supports 8, 4 or 2-bit weights, got {bits}")
    return 8 // bits


def k_block(bits: int) -> int:
    """Reduction depth covered by one 64-byte weight load."""
    return 4 * values_per_byte(bits)


def pack_subbyte(w: np.ndarray, bits: int) -> np.ndarray:
    """``W[N, K]`` (int8 values within ``bits``-bit range) -> ``[ceil(N/16), ceil(K/kb), 64]``."""
    w = np.asarray(w)
    per = values_per_byte(bits)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.integer):
        raise ValueError(f"pack_subbyte wants an integer [N, K] weight, got {w.dtype} {w.shape}")
    if w.size and (w.min() < lo or w.max() > hi):
        raise ValueError(f"weights outside the {bits}-bit range [{lo}, {hi}]")
    n, k = w.shape
    kb = k_block(bits)
    np_, kp = -(-n // LANES) * LANES, -(-k // kb) * kb
    wp = np.zeros((np_, kp), dtype=np.int64)
    wp[:n, :k] = w
    # [nb, i, kb, s, j] -> [nb, kb, i, j, s]
    t = wp.reshape(np_ // LANES, LANES, kp // kb, per, 4).transpose(0, 2, 1, 4, 3)
    mask = (1 << bits) - 1
    packed = np.zeros(t.shape[:-1], dtype=np.int64)
    offset = 0 if bits == 8 else 1 << (bits - 1)  # offset binary: w + 2^(bits-1) >= 0
    for s in range(per):
        packed |= ((t[..., s] + offset) & mask) << (bits * s)
    packed = packed.astype(np.uint8).view(np.int8)
    return np.ascontiguousarray(packed.reshape(np_ // LANES, kp // kb, 64))


def unpack_subbyte(packed: np.ndarray, bits: int, n: int, k: int) -> np.ndarray:
    """Inverse of :func:`pack_subbyte` (drops the padding); returns int8 ``[n, k]``."""
    per = values_per_byte(bits)
    p = np.asarray(packed).view(np.uint8).astype(np.int64)
    nb, kbn, _ = p.shape
    p = p.reshape(nb, kbn, LANES, 4)
    fields = [(p >> (bits * s)) & ((1 << bits) - 1) for s in range(per)]
    t = np.stack(fields, axis=-1)  # [nb, kb, i, j, s]
    if bits == 8:
        t = np.where(t >= 128, t - 256, t)
    else:
        t = t - (1 << (bits - 1))
    w = t.transpose(0, 2, 1, 4, 3).reshape(nb * LANES, kbn * k_block(bits))
    return w[:n, :k].astype(np.int8)


def gemv_reference(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact ``A . W^T`` in int64, returned as int32 (what the kernel computes)."""
    return (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)


def subbyte_gemv(m: int, n: int, k: int, bits: int, requant=None) -> tvm.IRModule:
    """The kernel for ``A[m, k]`` u8 (``k`` a multiple of ``4*P``) and packed ``n``; C int32.

    With ``requant`` (a :class:`~tvmquant.schedules.x86.int8_dense.Requant`) the int8
    kernels' epilogue runs in the kernel before the store: the parameters grow
    ``bias, m0, shift`` (int32 ``[n_pad]``) and ``C`` holds
    ``clip(zp + round_half_up((acc + bias) * m0 / 2^shift), lo, hi)`` in
    ``requant.out_dtype`` (:func:`~tvmquant.schedules.x86.int8_dense.epilogue_reference`).
    """
    per = values_per_byte(bits)
    kb = k_block(bits)
    if k % kb:
        raise ValueError(f"K={k} must be a multiple of {kb} for {bits}-bit weights (pad A)")
    nb_count = -(-n // LANES)
    n_pad = nb_count * LANES
    kb_count = k // kb

    def act(a_buf, row, col):
        """4 activation bytes broadcast to all 16 lanes, as 64 x u8."""
        return T.reinterpret(
            T.broadcast(T.reinterpret(a_buf.vload([row, col], "uint8x4"), dtype="int32"), 16),
            dtype="uint8x64")

    mask = (1 << bits) - 1
    offset = 0 if bits == 8 else 1 << (bits - 1)

    def field(vb, s):
        if bits == 8:
            return vb
        # (s is the unrolled loop variable: a shift by 0 for the lowest field folds away)
        wide = T.shift_right(T.reinterpret(vb, dtype="uint16x32"),
                             T.broadcast(T.uint16(bits * s), 32))
        return T.bitwise_and(T.reinterpret(wide, dtype="int8x64"),
                             T.broadcast(T.int8(mask), 64))

    # U independent accumulator chains per row hide vpdpbusd's latency (a single chain
    # would make the kernel latency-bound long before it is memory-bound).
    chains = max(1, min(4, kb_count))
    main_iters, tail = divmod(kb_count, chains)

    @T.macro
    def row_sums(A, rowsum):
        for r in range(m):
            with T.sblock("rowsum"):
                vr = T.axis.spatial(m, r)
                T.reads(A[vr, 0:k])
                T.writes(rowsum[vr])
                rowsum[vr] = 0
                for kk in range(k):
                    rowsum[vr] = rowsum[vr] + T.Cast("int32", A[vr, kk])

    @T.macro
    def accumulate(A, W, acc, nb):
        """``acc[r * chains * 16 ..]``: row ``r``'s 16 sums of block ``nb`` (offset kept)."""
        for r in T.unroll(m * chains):
            acc[T.ramp(r * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
        for kk in range(main_iters):
            for u in T.unroll(chains):
                vb: T.let = W.vload([nb, kk * chains + u, 0], "int8x64")
                for r in T.unroll(m):
                    for s in T.unroll(per):
                        acc[T.ramp((r * chains + u) * 16, 1, 16)] = T.call_llvm_pure_intrin(
                            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                            acc[T.ramp((r * chains + u) * 16, 1, 16)],
                            act(A, r, (kk * chains + u) * kb + s * 4),
                            field(vb, s),
                            dtype="int32x16")
        for t in T.unroll(tail):
            vt: T.let = W.vload([nb, main_iters * chains + t, 0], "int8x64")
            for r in T.unroll(m):
                for s in T.unroll(per):
                    acc[T.ramp(r * chains * 16, 1, 16)] = T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                        acc[T.ramp(r * chains * 16, 1, 16)],
                        act(A, r, (main_iters * chains + t) * kb + s * 4),
                        field(vt, s),
                        dtype="int32x16")
        for r in T.unroll(m):
            for u in T.unroll(1, chains):
                acc[T.ramp(r * chains * 16, 1, 16)] = (
                    acc[T.ramp(r * chains * 16, 1, 16)]
                    + acc[T.ramp((r * chains + u) * 16, 1, 16)])

    def total(acc, rowsum, r):
        return acc[T.ramp(r * chains * 16, 1, 16)] - T.broadcast(rowsum[r] * offset, 16)

    if requant is None:
        @T.prim_func(s_tir=True)
        def gemv(
            A: T.Buffer((m, k), "uint8"),
            W: T.Buffer((nb_count, kb_count, 64), "int8"),
            C: T.Buffer((m, n_pad), "int32"),
        ):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            rowsum = T.alloc_buffer((m,), "int32")
            row_sums(A, rowsum)
            for nb in T.parallel(nb_count):
                with T.sblock("gemv"):
                    T.reads(A[0:m, 0:k], W[nb, 0:kb_count, 0:64], rowsum[0:m])
                    T.writes(C[0:m, nb * 16:nb * 16 + 16])
                    # scope "global": a stack array; a "local" buffer inside the parallel
                    # loop is a workspace allocation per iteration (10% of the w4 GEMV)
                    acc = T.sblock_alloc_buffer((m * chains * 16,), "int32", scope="global")
                    accumulate(A, W, acc, nb)
                    for r in T.unroll(m):
                        C[r, T.ramp(nb * 16, 1, 16)] = total(acc, rowsum, r)

        return tvm.IRModule({"main": gemv})

    out_vec = f"{requant.out_dtype}x16"

    def requantized(x, bias, m0, shift, nb):
        """The int8 kernels' epilogue on 16 lanes, in int64."""
        lanes = T.ramp(nb * 16, 1, 16)
        sh = T.Cast("int64x16", shift[lanes])
        one = T.broadcast(T.int64(1), 16)
        half = T.shift_right(T.shift_left(one, sh), one)  # 2^(sh-1), 0 for sh = 0
        y = T.Cast("int64x16", x + bias[lanes]) * T.Cast("int64x16", m0[lanes]) + half
        y = T.shift_right(y, sh) + T.broadcast(T.int64(requant.zero_point), 16)
        y = T.max(T.min(y, T.broadcast(T.int64(requant.hi), 16)),
                  T.broadcast(T.int64(requant.lo), 16))
        return T.Cast(out_vec, y)

    @T.prim_func(s_tir=True)
    def gemv_requant(
        A: T.Buffer((m, k), "uint8"),
        W: T.Buffer((nb_count, kb_count, 64), "int8"),
        bias: T.Buffer((n_pad,), "int32"),
        m0: T.Buffer((n_pad,), "int32"),
        shift: T.Buffer((n_pad,), "int32"),
        C: T.Buffer((m, n_pad), requant.out_dtype),
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        rowsum = T.alloc_buffer((m,), "int32")
        row_sums(A, rowsum)
        for nb in T.parallel(nb_count):
            with T.sblock("gemv"):
                T.reads(A[0:m, 0:k], W[nb, 0:kb_count, 0:64], rowsum[0:m],
                        bias[nb * 16:nb * 16 + 16], m0[nb * 16:nb * 16 + 16],
                        shift[nb * 16:nb * 16 + 16])
                T.writes(C[0:m, nb * 16:nb * 16 + 16])
                acc = T.sblock_alloc_buffer((m * chains * 16,), "int32", scope="global")
                accumulate(A, W, acc, nb)
                for r in T.unroll(m):
                    C[r, T.ramp(nb * 16, 1, 16)] = requantized(total(acc, rowsum, r), bias, m0,
                                                               shift, nb)

    return tvm.IRModule({"main": gemv_requant})
