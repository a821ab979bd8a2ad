"""Bit-serial dense (popcount) kernels: packing and exactness against NumPy on fresh inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tvm
from tvmquant.schedules.x86 import bitserial_dense as bs

AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server", "num-cores": 2})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})
ARM = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                         "mattr": ["+neon"]})


def _flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _target_for_this_cpu():
    flags = _flags()
    if "avx512_vpopcntdq" in flags:
        return AVX512
    if "avx2" in flags:
        return AVX2
    pytest.skip("this CPU has neither AVX-512 VPOPCNTDQ nor AVX2 (per /proc/cpuinfo)")


def _operands(rng, mode, m, n, k, abits, wbits):
    if mode == "xnor":
        a, w = rng.choice([-1, 1], (m, k)), rng.choice([-1, 1], (n, k))
        return a, w, bs.encode(a, "xnor"), bs.encode(w, "xnor")
    if mode == "ternary":
        a, w = rng.choice([-1, 1], (m, k)), rng.choice([-1, 0, 1], (n, k))
        return a, w, bs.encode(a, "xnor"), bs.encode(w, "ternary-weight")
    if mode == "bipolar":  # odd values, sums of +-1 planes
        a = 2 * rng.integers(0, 1 << abits, (m, k)) - ((1 << abits) - 1)
        w = 2 * rng.integers(0, 1 << wbits, (n, k)) - ((1 << wbits) - 1)
        return a, w, bs.encode(a, "bipolar", abits), bs.encode(w, "bipolar", wbits)
    a = rng.integers(0, 1 << abits, (m, k))
    lo, hi = (-(1 << (wbits - 1)), 1 << (wbits - 1)) if wbits > 1 else (0, 2)
    w = rng.integers(lo, hi, (n, k))
    w[0] = lo  # the most negative weight, every run
    return a, w, bs.encode(a, "unipolar", abits), bs.encode(w, "unipolar", wbits)


def test_bitpack_bit_order_and_padding():
    x = np.zeros((1, 70), np.int64)
    x[0, [0, 63, 64, 69]] = 1
    planes = bs.bitpack(x, 1)
    assert planes.shape == (1, 1, 2) and planes.dtype == np.uint64  # K padded to 128 bits
    assert planes[0, 0, 0] == (1 | (1 << 63)) and planes[0, 0, 1] == (1 | (1 << 5))


def test_bitpack_two_complement_planes():
    planes = bs.bitpack(np.array([[-2, 1, -1]]), 2)  # -2 = 0b10, 1 = 0b01, -1 = 0b11
    assert planes[0, 0, 0] == 0b110 and planes[1, 0, 0] == 0b101


def test_encode_rejects_wrong_values():
    with pytest.raises(ValueError, match="-1 or \\+1"):
        bs.encode(np.array([[0, 1]]), "xnor")
    with pytest.raises(ValueError, match="ternary"):
        bs.encode(np.array([[2, 1]]), "ternary-weight")
    with pytest.raises(ValueError, match="odd integers"):
        bs.encode(np.array([[2, 1]]), "bipolar", 2)
    with pytest.raises(ValueError, match="mode"):
        bs.bitserial_dense(1, 1, 64, mode="bipolar-ish")


CASES = [("xnor", 1, 1, (3, 20, 700)), ("xnor", 1, 1, (1, 5, 512)),
         ("ternary", 1, 2, (2, 17, 1000)), ("unipolar", 1, 1, (1, 5, 64)),
         ("unipolar", 2, 2, (3, 9, 300)), ("unipolar", 3, 1, (2, 5, 130)),
         ("unipolar", 2, 4, (4, 33, 1100)),
         ("bipolar", 2, 2, (3, 9, 300)), ("bipolar", 1, 3, (2, 6, 1030)),
         ("xnor", 1, 1, (2, 3, 448)),  # 7 words: tail pieces of 4, 2 and 1
         # past MAX_UNROLLED_CHUNKS: the accumulator-loop variant
         ("xnor", 1, 1, (2, 5, 9000)), ("unipolar", 2, 2, (2, 3, 9000))]


@pytest.mark.parametrize("mode,abits,wbits,mnk", CASES,
                         ids=[f"{c[0]}-a{c[1]}w{c[2]}-{'x'.join(map(str, c[3]))}" for c in CASES])
def test_bitserial_dense_exact(mode, abits, wbits, mnk):
    target = _target_for_this_cpu()
    m, n, k = mnk
    rng = np.random.default_rng()  # fresh inputs every run
    a, w, ap, wp = _operands(rng, mode, m, n, k, abits, wbits)
    ex = tvm.compile(bs.bitserial_dense(m, n, k, mode=mode, abits=abits, wbits=wbits), target)
    c = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    ex.mod["main"](tvm.runtime.tensor(ap), tvm.runtime.tensor(wp), c)
    np.testing.assert_array_equal(c.numpy(), bs.reference(a, w))


@pytest.mark.parametrize("mode,abits,wbits,mnk", CASES[:4],
                         ids=[f"{c[0]}-a{c[1]}w{c[2]}" for c in CASES[:4]])
def test_bitserial_dense_avx2_fallback_exact(mode, abits, wbits, mnk):
    """The AVX2 build (no vector popcount instruction: LLVM expands it) is exact too, and is
    the fallback indeed (no ``vpopcntq`` in its code)."""
    if "avx2" not in _flags():
        pytest.skip("this CPU has no AVX2 (avx2 not in /proc/cpuinfo)")
    m, n, k = mnk
    a, w, ap, wp = _operands(np.random.default_rng(), mode, m, n, k, abits, wbits)
    ex = tvm.compile(bs.bitserial_dense(m, n, k, mode=mode, abits=abits, wbits=wbits), AVX2)
    assert "vpopcntq" not in ex.mod.inspect_source("asm")
    c = tvm.runtime.tensor(np.zeros((m, n), np.int32))
    ex.mod["main"](tvm.runtime.tensor(ap), tvm.runtime.tensor(wp), c)
    np.testing.assert_array_equal(c.numpy(), bs.reference(a, w))


@pytest.mark.parametrize("target,instruction", [(AVX512, "vpopcntq"), (ARM, "cnt")],
                         ids=["x86-vpopcntdq", "arm-neon"])
def test_popcount_instruction_in_generated_code(target, instruction):
    """Structure only (no run): the vector popcount is the instruction we count on."""
    mod = bs.bitserial_dense(1, 16, 1024, mode="xnor")
    asm = tvm.compile(mod, target).mod.inspect_source("asm")
    assert instruction in asm
