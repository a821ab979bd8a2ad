"""Bit-serial dense on popcount: binary, ternary and few-bit integers as sums of bit planes.

``C[M, N] = sum_k a[m, k] * w[n, k]`` where both operands are stored as bit planes packed
64 per ``uint64`` word along ``K`` (:func:`bitpack`), as in TVM's old ``bitserial_dense``:

``"unipolar"``
    ``a`` unsigned ``abits``-bit, ``w`` two's-complement ``wbits``-bit (``wbits = 1``:
    ``w`` in {0, 1}). ``C = sum_ij c_i d_j popcount(a_i & w_j)`` with ``c_i = 2^i``,
    ``d_j = 2^j`` except ``d_(wbits-1) = -2^(wbits-1)`` when ``wbits > 1`` (the sign bit).
``"xnor"``
    binary ``a, w`` in {-1, +1} (bit = 1 encodes -1), XNOR-Net:
    ``C = K - 2 popcount(a ^ w)``.
``"ternary"``
    ``a`` in {-1, +1} (one plane), ``w`` in {-1, 0, +1} as two planes, ``nonzero`` and
    ``negative``: ``C = popcount(nz) - 2 popcount(nz & (a ^ neg))``.
``"bipolar"``
    multi-bit XNOR: ``a`` and ``w`` odd integers, sums of ``b`` bipolar planes
    ``x = sum_i 2^i s_i`` with ``s_i`` in {-1, +1} (``abits``-bit ``a`` in
    ``[-(2^abits - 1), 2^abits - 1]``): ``C = sum_ij 2^(i+j) (K - 2 popcount(a_i ^ w_j))``.

The kernel streams 8 words (512 bits) per load and counts them with one vector popcount
(``vpopcntq`` with AVX-512 VPOPCNTDQ; LLVM expands it into shuffles on AVX2 and into
``cnt`` + pairwise adds on ARM NEON), the words past the last full 512 bits in vectors of
4, 2 and 1 words (a 576-bit row reads 9 words, not 16), summed at the end. ``K`` is padded
with zero bits to a multiple of 64 by :func:`bitpack` (zero bits add nothing in every
mode: ``0 & x = 0``, ``0 ^ 0 = 0``). The per-channel scale (XNOR-Net's
``alpha``) and the requantization are applied outside, on the int32 result.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

WORD = 64
CHUNK = 8  # words per vector load: 512 bits
MODES = ("unipolar", "xnor", "ternary", "bipolar")
MAX_UNROLLED_CHUNKS = 16  # up to 8192 bits per row: one expression, no accumulator buffer


def padded_words(k: int) -> int:
    """64-bit words per row of ``k`` bits."""
    return -(-k // WORD)


def bitpack(x: np.ndarray, bits: int) -> np.ndarray:
    """``x[R, K]`` integers -> bit planes ``[bits, R, words]`` uint64 (bit ``b`` of ``x``).

    Negative values contribute their two's-complement bits (``bits`` of them). ``K`` is padded
    with zeros to a multiple of 64 bits.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"bitpack wants a 2-D [rows, K] array, got shape {x.shape}")
    r, k = x.shape
    words = padded_words(k)
    u = (x.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint64)
    planes = np.zeros((bits, r, words * WORD), dtype=np.uint8)
    for b in range(bits):
        planes[b, :, :k] = (u >> np.uint64(b)) & np.uint64(1)
    # little-endian bit order inside each 64-bit word: bit t of word w is element 64 w + t
    packed = np.packbits(planes.reshape(bits, r, words, WORD), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed.view(np.uint64).reshape(bits, r, words))


def encode(x: np.ndarray, mode: str, bits: int = 1) -> np.ndarray:
    """Values -> the planes a mode expects (see the module docstring)."""
    x = np.asarray(x)
    if mode == "xnor":
        if not np.isin(x, (-1, 1)).all():
            raise ValueError("xnor operands must be -1 or +1")
        return bitpack((x < 0).astype(np.int64), 1)
    if mode == "bipolar":
        top = (1 << bits) - 1
        if not (np.all(np.abs(x) <= top) and np.all(x % 2 != 0)):
            raise ValueError(f"{bits}-bit bipolar values are odd integers in [-{top}, {top}]")
        # s_i = 2 u_i - 1 for the bits u_i of (x + top) / 2; the plane holds 1 for -1
        return bitpack(top - (x.astype(np.int64) + top) // 2, bits)
    if mode == "ternary-weight":
        if not np.isin(x, (-1, 0, 1)).all():
            raise ValueError("ternary weights must be -1, 0 or +1")
        return np.concatenate([bitpack((x != 0).astype(np.int64), 1),
                               bitpack((x < 0).astype(np.int64), 1)])
    return bitpack(x, bits)


def reference(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact ``a . w^T`` of the decoded values, int32."""
    return (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)


def bitserial_dense(m: int, n: int, k: int, *, mode: str = "unipolar", abits: int = 1,
                    wbits: int = 1) -> tvm.IRModule:
    """The kernel: ``A`` planes ``[abits, m, words]``, ``W`` planes ``[wplanes, n, words]``
    (uint64), ``C[m, n]`` int32 (``k`` is the true reduction length, for ``xnor``)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode in ("xnor", "ternary"):
        abits, wbits = 1, (2 if mode == "ternary" else 1)
    if not (1 <= abits <= 8 and 1 <= wbits <= 8):
        raise ValueError("abits and wbits must be between 1 and 8")
    words = padded_words(k)
    chunks = words // CHUNK
    # the words past the last full chunk, in vectors of 4, 2 and 1 words
    pieces, at = [], chunks * CHUNK
    for lanes in (4, 2, 1):
        if words - at >= lanes:
            pieces.append((at, lanes))
            at += lanes
    pairs = [(i, j) for i in range(abits) for j in range(wbits)] \
        if mode in ("unipolar", "bipolar") else [(0, 0)] if mode == "xnor" else [(0, 0), (0, 1)]
    n_acc = len(pairs)

    def coef(i: int, j: int) -> int:
        if mode == "xnor":
            return -2
        if mode == "bipolar":
            return -2 << (i + j)
        if mode == "ternary":
            return 1 if j == 0 else -2
        d = -(1 << j) if (wbits > 1 and j == wbits - 1) else 1 << j
        return (1 << i) * d

    def load(buf, plane, row, word, lanes):
        return buf.vload([plane, row, word], f"uint64x{lanes}") if lanes > 1 else \
            buf[plane, row, word]

    def term(a_buf, w_buf, r, col, word, lanes, p):
        """popcount term of plane pair ``p`` for row ``r``, output ``col``, ``lanes`` words
        from ``word``."""
        i, j = pairs[p]
        av, wv = load(a_buf, i, r, word, lanes), load(w_buf, j, col, word, lanes)
        if mode == "unipolar":
            bits = T.bitwise_and(av, wv)
        elif mode in ("xnor", "bipolar"):
            bits = T.bitwise_xor(av, wv)
        elif j == 0:  # ternary: popcount(nonzero)
            bits = wv
        else:
            bits = T.bitwise_and(load(w_buf, 0, col, word, lanes), T.bitwise_xor(av, wv))
        if lanes == 1:
            return T.Cast("int64", T.popcount(bits)) * T.int64(coef(i, j))
        return T.Cast(f"int64x{lanes}", T.popcount(bits)) * \
            T.broadcast(T.int64(coef(i, j)), lanes)

    def words_sum(a_buf, w_buf, r, col, word, lanes):
        """All plane pairs over ``lanes`` words, weighted (unrolled in the IR)."""
        total = term(a_buf, w_buf, r, col, word, lanes, 0)
        for p in range(1, n_acc):
            total = total + term(a_buf, w_buf, r, col, word, lanes, p)
        return total

    def chunk_sum(a_buf, w_buf, r, col, c):
        return words_sum(a_buf, w_buf, r, col, c * CHUNK, CHUNK)

    base = k if mode == "xnor" else \
        k * ((1 << abits) - 1) * ((1 << wbits) - 1) if mode == "bipolar" else 0
    wplanes = wbits

    def hsum(vec, lanes=CHUNK):
        """The ``lanes`` int64 lanes of ``vec`` summed (``llvm.vector.reduce.add``)."""
        if lanes == 1:
            return vec
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.vector.reduce.add"),
                                       vec, dtype="int64")

    def tail_sum(a_buf, w_buf, r, col):
        total = T.int64(0)
        for word, lanes in pieces:
            total = total + hsum(words_sum(a_buf, w_buf, r, col, word, lanes), lanes)
        return total

    if chunks <= MAX_UNROLLED_CHUNKS:
        # The whole row as one expression: no accumulator buffer (a local buffer inside the
        # parallel loop is a workspace allocation per output), a balanced sum for LLVM.
        def row_sum(a_buf, w_buf, r, col):
            parts = [chunk_sum(a_buf, w_buf, r, col, c) for c in range(chunks)]
            if not parts:
                return tail_sum(a_buf, w_buf, r, col)
            while len(parts) > 1:
                parts = [parts[i] + parts[i + 1] if i + 1 < len(parts) else parts[i]
                         for i in range(0, len(parts), 2)]
            return hsum(parts[0]) + tail_sum(a_buf, w_buf, r, col)

        @T.prim_func(s_tir=True)
        def dense(
            A: T.Buffer((abits, m, words), "uint64"),
            W: T.Buffer((wplanes, n, words), "uint64"),
            C: T.Buffer((m, n), "int32"),
        ):
            T.func_attr({"global_symbol": "main", "tirx.noalias": True})
            for col in T.parallel(n):
                for r in range(m):
                    with T.sblock("row"):
                        T.reads(A[0:abits, r, 0:words], W[0:wplanes, col, 0:words])
                        T.writes(C[r, col])
                        C[r, col] = T.int32(base) + T.Cast("int32", row_sum(A, W, r, col))

        return tvm.IRModule({"main": dense})

    @T.prim_func(s_tir=True)
    def dense_long(
        A: T.Buffer((abits, m, words), "uint64"),
        W: T.Buffer((wplanes, n, words), "uint64"),
        C: T.Buffer((m, n), "int32"),
    ):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for col in T.parallel(n):
            with T.sblock("col"):
                T.reads(A[0:abits, 0:m, 0:words], W[0:wplanes, col, 0:words])
                T.writes(C[0:m, col])
                acc = T.sblock_alloc_buffer((8,), "int64", scope="global")  # a stack array
                for r in range(m):
                    acc[T.ramp(0, 1, 8)] = T.broadcast(T.int64(0), 8)
                    for c in range(chunks):
                        acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + chunk_sum(A, W, r, col, c)
                    C[r, col] = T.int32(base) + T.Cast(
                        "int32", hsum(acc[T.ramp(0, 1, 8)]) + tail_sum(A, W, r, col))

    return tvm.IRModule({"main": dense_long})


def bitpack_kernel(m: int, k: int, bits: int, dtype: str = "uint8",
                   bit_offset: int = 0) -> tvm.IRModule:
    """Run-time :func:`bitpack` of activation codes: ``A[m, k]`` -> ``[bits, m, words]``.

    Bit ``t`` of word ``w`` of plane ``b`` is bit ``b + bit_offset`` of ``A[r, 64 w + t]``
    (zero past ``k``), the layout :func:`bitserial_dense` reads. Rows run in parallel; the
    64 bits of a word are gathered with shifts and ORs. Binary codes (int8 -1/+1) pack
    their sign bit: ``dtype="int8", bit_offset=7``, the ``xnor`` encoding (1 = -1).
    """
    words = padded_words(k)
    _check_bits(dtype, bits, bit_offset)

    @T.prim_func(s_tir=True)
    def pack(A: T.Buffer((m, k), dtype), P: T.Buffer((bits, m, words), "uint64")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for r in T.parallel(m):
            for b, w in T.grid(bits, words):
                with T.sblock("pack"):
                    T.reads(A[r, 0:k])
                    T.writes(P[b, r, w])
                    P[b, r, w] = T.uint64(0)
                    for t in range(WORD):
                        if w * WORD + t < k:
                            P[b, r, w] = P[b, r, w] | T.shift_left(
                                T.Cast("uint64", T.bitwise_and(
                                    T.shift_right(A[r, w * WORD + t],
                                                  T.Cast(dtype, b + bit_offset)),
                                    T.Cast(dtype, 1))),
                                T.Cast("uint64", t))

    return tvm.IRModule({"main": pack})


def _check_bits(dtype: str, bits: int, bit_offset: int) -> None:
    if dtype not in ("uint8", "int8") or not 0 <= bit_offset <= 8 - bits:
        raise ValueError(f"packing takes bits {bit_offset}..{bit_offset + bits - 1} of 8-bit "
                         f"codes; got dtype={dtype!r}, bits={bits}, bit_offset={bit_offset}")


def conv_output_size(h: int, w: int, kh: int, kw: int, stride: int,
                     pad: tuple[int, int, int, int]) -> tuple[int, int]:
    """Output height and width of a convolution (``pad`` = top, left, bottom, right)."""
    top, left, bottom, right = pad
    return (h + top + bottom - kh) // stride + 1, (w + left + right - kw) // stride + 1


def bitpack_im2col_kernel(n: int, c: int, h: int, w: int, kh: int, kw: int, stride: int,
                          pad: tuple[int, int, int, int], bits: int, dtype: str = "uint8",
                          bit_offset: int = 0) -> tvm.IRModule:
    """Bit-serial conv2d's input side: NCHW u8 codes -> packed im2col planes.

    ``P[b, r, word]`` with row ``r = (n, y, x)`` over output pixels and reduction index
    ``k = (ci, i, j)`` (the order of an OIHW weight flattened to ``[O, C*kh*kw]``): bit ``b``
    of ``A[n, ci, y*stride + i - top, x*stride + j - left]``, zero outside the image (the
    padding value 0; a nonzero zero point is padded by the graph before). A conv2d is then
    this kernel followed by :func:`bitserial_dense` on the output-pixel rows. ``dtype`` and
    ``bit_offset`` as in :func:`bitpack_kernel`.
    """
    _check_bits(dtype, bits, bit_offset)
    top, left, _, _ = pad
    ho, wo = conv_output_size(h, w, kh, kw, stride, pad)
    k = c * kh * kw
    words = padded_words(k)
    rows = n * ho * wo

    @T.prim_func(s_tir=True)
    def pack(A: T.Buffer((n, c, h, w), dtype), P: T.Buffer((bits, rows, words), "uint64")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for r in T.parallel(rows):
            for b, wd in T.grid(bits, words):
                with T.sblock("pack"):
                    T.reads(A[0:n, 0:c, 0:h, 0:w])
                    T.writes(P[b, r, wd])
                    P[b, r, wd] = T.uint64(0)
                    for t in range(WORD):
                        kk: T.let = wd * WORD + t
                        ci: T.let = kk // (kh * kw)
                        i: T.let = kk % (kh * kw) // kw
                        j: T.let = kk % kw
                        y: T.let = r % (ho * wo) // wo * stride + i - top
                        x: T.let = r % wo * stride + j - left
                        if kk < k and 0 <= y and y < h and 0 <= x and x < w:
                            P[b, r, wd] = P[b, r, wd] | T.shift_left(
                                T.Cast("uint64", T.bitwise_and(T.shift_right(
                                    A[r // (ho * wo), ci, y, x], T.Cast(dtype, b + bit_offset)),
                                    T.Cast(dtype, 1))),
                                T.Cast("uint64", t))

    return tvm.IRModule({"main": pack})


def _msb_mask32(vec):
    """The most significant bit of each of 32 bytes as a 32-bit mask (``vpmovmskb``)."""
    m = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmovmskb"),
                                T.reinterpret(vec, dtype="int8x32"), dtype="int32")
    return T.Cast("uint64", T.Cast("uint32", m))


def bitpack_conv_nhwc_kernel(n: int, h: int, w: int, c: int, kh: int, kw: int, stride: int,
                             pad: tuple[int, int, int, int], bits: int, dtype: str = "uint8",
                             bit_offset: int = 0) -> tvm.IRModule:
    """Bit-serial conv2d's input side on x86 (AVX2): NHWC u8 codes -> packed patch planes.

    ``c`` must be a multiple of 64. The reduction index runs ``k = (i, j, ci)`` (kernel row,
    column, channel), so each 64-bit word is 64 consecutive channels of one input pixel:
    one 64-byte load, a shift that puts bit ``b`` of every byte in its top bit, and two
    ``vpmovmskb`` make the word (instead of 64 scalar gathers). Pixels outside the image
    give zero words. The weights go with :func:`pack_conv_weight_nhwc`. ``dtype`` and
    ``bit_offset`` as in :func:`bitpack_kernel`.
    """
    _check_bits(dtype, bits, bit_offset)
    vec = f"{dtype}x32"
    if c % WORD:
        raise ValueError(f"channels must be a multiple of {WORD} (pad them), got {c}")
    top, left, _, _ = pad
    ho, wo = conv_output_size(h, w, kh, kw, stride, pad)
    cb = c // WORD
    k_words = kh * kw * cb
    words = padded_words(k_words * WORD)
    rows = n * ho * wo

    @T.prim_func(s_tir=True)
    def pack(A: T.Buffer((n, h, w, c), dtype), P: T.Buffer((bits, rows, words), "uint64")):
        T.func_attr({"global_symbol": "main", "tirx.noalias": True})
        for r in T.parallel(rows):
            for b, wd in T.grid(bits, words):
                with T.sblock("pack"):
                    T.reads(A[0:n, 0:h, 0:w, 0:c])
                    T.writes(P[b, r, wd])
                    i: T.let = wd // (kw * cb)
                    j: T.let = wd // cb % kw
                    c0: T.let = wd % cb * WORD
                    y: T.let = r % (ho * wo) // wo * stride + i - top
                    x: T.let = r % wo * stride + j - left
                    if wd < k_words and 0 <= y and y < h and 0 <= x and x < w:
                        up: T.let = T.broadcast(T.Cast(dtype, 7 - b - bit_offset), 32)
                        P[b, r, wd] = _msb_mask32(T.shift_left(
                            A.vload([r // (ho * wo), y, x, c0], vec), up)) | \
                            T.shift_left(_msb_mask32(T.shift_left(
                                A.vload([r // (ho * wo), y, x, c0 + 32], vec), up)),
                                T.uint64(32))
                    else:
                        P[b, r, wd] = T.uint64(0)

    return tvm.IRModule({"main": pack})


def pack_conv_weight_nhwc(wt: np.ndarray, bits: int) -> np.ndarray:
    """OIHW weights -> the planes that :func:`bitpack_conv_nhwc_kernel`'s rows meet:
    reduction order ``(i, j, ci)`` with channels zero-padded to a multiple of 64."""
    o, c, kh, kw = wt.shape
    cp = -(-c // WORD) * WORD
    padded = np.zeros((o, kh, kw, cp), dtype=np.int64)
    padded[..., :c] = np.asarray(wt).transpose(0, 2, 3, 1)
    return bitpack(padded.reshape(o, kh * kw * cp), bits)
