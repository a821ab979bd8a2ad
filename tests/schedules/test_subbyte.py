"""Sub-byte weights: packing round trips and the VNNI GEMV kernels, exact against NumPy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tvm
from tvmquant.schedules.x86 import subbyte_gemv as sb

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})


def _need_vnni():
    try:
        ok = "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        ok = False
    if not ok:
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni not in /proc/cpuinfo)")


def _weights(rng, bits, n, k):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w = rng.integers(lo, hi + 1, (n, k)).astype(np.int8)
    w[0, :] = lo  # extremes in every test
    w[-1, :] = hi
    return w


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("shape", [(1, 1), (16, 32), (17, 33), (40, 7), (3, 100)])
def test_pack_round_trip(bits, shape):
    rng = np.random.default_rng()
    w = _weights(rng, bits, *shape)
    packed = sb.pack_subbyte(w, bits)
    assert packed.dtype == np.int8 and packed.shape[-1] == 64
    np.testing.assert_array_equal(sb.unpack_subbyte(packed, bits, *shape), w)


@pytest.mark.parametrize("bits", [4, 2])
def test_packed_size_is_exact(bits):
    w = np.zeros((4096, 4096), np.int8)
    assert sb.pack_subbyte(w, bits).nbytes * (8 // bits) == w.nbytes


def test_pack_layout_of_one_byte():
    """Byte 4*i + j of block (0, 0) holds w[i, j] in its low nibble, w[i, 4 + j] in its high."""
    w = np.zeros((16, 8), np.int8)
    w[2, 1], w[2, 5] = -8, 7
    packed = sb.pack_subbyte(w, 4).view(np.uint8)
    assert packed[0, 0, 4 * 2 + 1] == ((-8 + 8) | ((7 + 8) << 4))
    assert packed[0, 0, 0] == (8 | (8 << 4))  # zeros are stored as the offset 8


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="4-bit range"):
        sb.pack_subbyte(np.full((2, 8), 8, np.int8), 4)
    with pytest.raises(ValueError, match="8, 4 or 2"):
        sb.pack_subbyte(np.zeros((2, 8), np.int8), 3)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("mnk", [(1, 64, 64), (1, 33, 96), (3, 40, 64), (4, 17, 32 * 9),
                                 (2, 256, 512)])
def test_gemv_exact(bits, mnk):
    _need_vnni()
    m, n, k = mnk
    k = -(-k // sb.k_block(bits)) * sb.k_block(bits)
    rng = np.random.default_rng()  # fresh inputs every run
    w = _weights(rng, bits, n, k)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    a[0, :] = 255
    packed = sb.pack_subbyte(w, bits)
    ex = tvm.compile(sb.subbyte_gemv(m, n, k, bits), TARGET)
    c = tvm.runtime.tensor(np.zeros((m, packed.shape[0] * 16), np.int32))
    ex.mod["main"](tvm.runtime.tensor(a), tvm.runtime.tensor(packed), c)
    np.testing.assert_array_equal(c.numpy()[:, :n], sb.gemv_reference(a, w))


@pytest.mark.parametrize("bits,out_dtype,lo,hi", [(4, "uint8", 0, 255), (2, "int8", -128, 127),
                                                  (4, "uint8", 3, 200)])
def test_gemv_with_fused_requantization_exact(bits, out_dtype, lo, hi):
    """The int8 kernels' epilogue (bias, dyadic multiplier and shift per channel, zero point,
    clamp) in the GEMV's store, against ``epilogue_reference`` on fresh inputs."""
    from tvmquant.schedules.x86.int8_dense import Requant, epilogue_reference

    _need_vnni()
    m, n, k = 3, 40, 4 * sb.k_block(bits)
    rng = np.random.default_rng()
    w = _weights(rng, bits, n, k)
    a = rng.integers(0, 256, (m, k)).astype(np.uint8)
    n_pad = -(-n // 16) * 16
    bias = rng.integers(-5000, 5000, n_pad).astype(np.int32)
    m0 = rng.integers(1 << 30, 1 << 31, n_pad).astype(np.int32)
    shift = rng.integers(34, 42, n_pad).astype(np.int32)
    shift[0] = 0  # no rounding term
    requant = Requant(7 if out_dtype == "uint8" else -3, lo, hi, out_dtype)
    ex = tvm.compile(sb.subbyte_gemv(m, n, k, bits, requant), TARGET)
    c = tvm.runtime.tensor(np.zeros((m, n_pad), out_dtype))
    ex.mod["main"](*[tvm.runtime.tensor(v) for v in (a, sb.pack_subbyte(w, bits), bias, m0,
                                                      shift)], c)
    acc = sb.gemv_reference(a, w)
    ref = epilogue_reference(acc, bias[:n], m0[:n], shift[:n], requant)
    np.testing.assert_array_equal(c.numpy()[:, :n], ref)


@pytest.mark.parametrize("bits", [4, 2])
def test_gemv_unpacks_in_registers(bits):
    """Structure: one 64-byte weight load feeds 8/bits vpdpbusd; no byte shifts emulated."""
    asm = tvm.compile(sb.subbyte_gemv(1, 64, 256, bits), TARGET).mod.inspect_source("asm")
    assert asm.count("vpdpbusd") >= 8 // bits
    assert "vpsrlw" in asm  # the 16-bit logical shift that exposes the upper fields


def test_gemv_rejects_unpadded_k():
    with pytest.raises(ValueError, match="multiple of 8"):
        sb.subbyte_gemv(1, 16, 12, 4)
