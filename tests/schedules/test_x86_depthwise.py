"""The depthwise conv kernel (tvmquant.schedules.x86.int8_depthwise_conv2d), VNNI and AVX2,
against NumPy.

Kernels that run VNNI code check /proc/cpuinfo first and skip with the reason otherwise; the
packing, sizing and assembly checks compile and run anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import epilogue_operand
from tvmquant.schedules.x86 import int8_dense as dense
from tvmquant.schedules.x86 import int8_depthwise_conv2d as dw

from tvmquant.numerics import dyadic

ISAS = ["avx512_vnni", "avx2"]


def _need(isa: str = "avx512_vnni") -> None:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    wanted = ["avx512_vnni", "avx512_vbmi"] if isa == "avx512_vnni" else [isa]
    missing = [f for f in wanted if f not in flags]
    if missing:
        pytest.skip(f"this CPU lacks {' and '.join(missing)} (per /proc/cpuinfo): "
                    "cannot run the kernel here")


def _kernel_input(x, kh, kw, stride, pad, pad_value, rng):
    """``x`` padded as the dispatch pads it: the conv's padding with ``pad_value``, then the
    rows and columns the kernel reads past it with garbage (they must not matter)."""
    n, c, h, w = x.shape
    top, left, bottom, right = pad
    oh, ow = dw.depthwise_output_size(h, w, kh, kw, *stride, pad)
    hp, wp = h + top + bottom, w + left + right
    hk, wk = dw.depthwise_input_size(oh, ow, kh, kw, *stride, (hp, wp))
    xk = rng.integers(0, 256, (n, c, hk, wk)).astype(np.uint8)
    xk[:, :, :hp, :wp] = pad_value
    xk[:, :, top:top + h, left:left + w] = x
    return xk, (oh, ow), (hp, wp)


def _run(mod_args, args, shape, dtype):
    import tvm

    ex = dw.build_int8_depthwise_conv2d(*mod_args[0], **mod_args[1])
    out = tvm.runtime.tensor(np.zeros(shape, dtype))
    ex.mod["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


def test_pack_depthwise_weight_layout():
    w = np.random.default_rng(0).integers(-128, 128, (6, 1, 5, 3)).astype(np.int8)
    p = dw.pack_depthwise_weight(w)
    assert p.shape == (6, 5, 1, 4) and p.dtype == np.int8
    np.testing.assert_array_equal(p[:, :, 0, :3], w[:, 0])
    assert not p[..., 3].any()  # the 4th column of the group is zero
    with pytest.raises(ValueError, match="C, 1, KH, KW"):
        dw.pack_depthwise_weight(np.zeros((6, 2, 3, 3), np.int8))
    wide = dw.pack_depthwise_weight(w, "avx2")  # the same layout in int16 (vpmaddwd pairs)
    assert wide.dtype == np.int16 and np.array_equal(wide, p.astype(np.int16))


def test_avx2_asm_is_vpmaddwd_on_widened_windows():
    """Per 8 outputs x 4 kernel columns: two widening loads and two ``vpmaddwd``; nothing
    from AVX-512."""
    ex = dw.build_int8_depthwise_conv2d(1, 8, 6, 32, 3, 3, (1, 1), isa="avx2")
    asm = ex.mod.inspect_source("asm")
    assert "vpmaddwd" in asm and "vpmovzxbw" in asm
    assert "zmm" not in asm and "vpdpbusd" not in asm
    # a register tile of 2 rows x 2 vectors of 16 x (even, odd) x 3 kernel rows x 2 column
    # pairs, unrolled
    assert dw.register_tile(6, 32, "avx2") == (2, 2)
    assert asm.count("vpmaddwd") == 2 * 2 * 2 * 3 * 2


@pytest.mark.parametrize("oh, ow, kh, kw, sh, sw", [
    (12, 80, 5, 5, 1, 1), (1, 40, 3, 2, 3, 2), (6, 7, 3, 3, 1, 2), (5, 3, 3, 3, 2, 1)])
def test_input_size_keeps_every_load_inside(oh, ow, kh, kw, sh, sw):
    """The last 64-byte load (``vpermb`` reads a whole register) ends inside the buffer."""
    h, w = dw.depthwise_input_size(oh, ow, kh, kw, sh, sw)
    groups, owp = -(-kw // 4), -(-ow // 16) * 16
    last = ((oh - 1) * sh + kh - 1) * w + (owp - 16) * sw + 4 * (groups - 1)
    assert last + 64 <= h * w
    assert w >= (owp - 1) * sw + 4 * groups and h >= (oh - 1) * sh + kh


@pytest.mark.parametrize("mcpu, shuffle", [("icelake-server", "vpermb"),
                                           ("cascadelake", "vpshufb")])
def test_depthwise_asm_has_vpdpbusd(mcpu, shuffle):
    """One ``vpdpbusd`` per 16 pixels x 4 kernel columns; the windows are cut by ``vpermb``
    where the CPU has AVX-512 VBMI, by LLVM's longer byte shuffles where not."""
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    ex = dw.build_int8_depthwise_conv2d(1, 8, 6, 20, 3, 3, (1, 1), target=target)
    asm = ex.mod.inspect_source("asm")
    # 6 rows x 2 vectors x 3 kernel rows, in a register tile of 3 rows (unrolled)
    assert asm.count("vpdpbusd") == 3 * 2 * 3 and shuffle in asm


# (c, h, w, kh, kw, stride, pad): PP-OCR's layers, odd sizes, strides 1 and 2 per axis
CASES = [
    (5, 9, 21, 3, 3, (1, 1), (1, 1, 1, 1)),
    (7, 13, 27, 5, 5, (2, 2), (2, 1, 2, 0)),
    (16, 12, 40, 5, 5, (1, 1), (2, 2, 2, 2)),
    (9, 12, 33, 3, 3, (2, 1), (1, 1, 1, 1)),
    (9, 12, 33, 3, 3, (1, 2), (1, 1, 1, 1)),
    (6, 3, 80, 3, 2, (1, 2), (0, 0, 0, 0)),
    (4, 10, 10, 5, 5, (1, 1), (2, 2, 2, 2)),
    (3, 7, 7, 7, 7, (1, 1), (3, 3, 3, 3)),
]
REQUANTS = [
    None,
    dense.Requant(3, 0, 255, "uint8"),
    dense.Requant(-3000, -32768, 32767, "int16", lut_size=65536, lut_offset=32768),
    dense.Requant(-40, -300, 500, "int16", lut_size=301, lut_offset=-50, lut_dtype="int8"),
    dense.Requant(-3000, -32768, 32767, "int16", gate=dense.Gate("uint8", 0, 255)),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "c{}-{}x{}-k{}x{}-s{}{}".format(
    *c[:5], *c[5]))
@pytest.mark.parametrize("rq", REQUANTS, ids=["int32", "u8", "lut-u8-65536", "lut-i8-301",
                                               "gate-u8"])
@pytest.mark.parametrize("isa", ISAS)
def test_depthwise_exact(case, rq, isa):
    _need(isa)
    c, h, w, kh, kw, stride, pad = case
    rng = np.random.default_rng()  # fresh inputs every run
    x = rng.integers(0, 256, (1, c, h, w)).astype(np.uint8)
    wt = rng.integers(-128, 128, (c, 1, kh, kw)).astype(np.int8)
    pad_value = int(rng.integers(0, 256))
    xk, (oh, ow), hpwp = _kernel_input(x, kh, kw, stride, pad, pad_value, rng)
    acc = dw.depthwise_reference(x, wt, stride, pad, pad_value)
    args = [xk, dw.pack_depthwise_weight(wt, isa)]
    dtype = np.int32
    if rq is None:
        ref = acc
    else:
        bias = rng.integers(-(2**20), 2**20, c).astype(np.int32)
        d = dyadic(rng.uniform(1e-5, 3e-3, c))
        m0 = d.m0.astype(np.int32)
        sh = d.shift.astype(np.int32) - (4 if rq.has_activation else 0)
        table = epilogue_operand(rng, rq)
        args += [bias, m0, sh] + ([table] if table is not None else [])
        ref = dense.epilogue_reference(acc.astype(np.int32), bias, m0, sh, rq, axis=1,
                                       lut=table)
        dtype = rq.result_dtype
    got = _run(((1, c, oh, ow, kh, kw, stride),
                {"bias": rq is not None, "requant": rq, "input_at_least": hpwp, "isa": isa}),
               args, (1, c, oh, ow), dtype)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("isa", ISAS)
def test_bias_wraps_around_as_int32(isa):
    """A dead channel of PP-OCR rec: one weight, a bias of -2**31 + 1523, shift 53. The int32
    add wraps as in the graph (LLVM widened a plain add before the int64 multiply)."""
    _need(isa)
    rng = np.random.default_rng()
    c, h, w = 3, 6, 20
    x = rng.integers(0, 256, (1, c, h, w)).astype(np.uint8)
    wt = np.zeros((c, 1, 5, 5), np.int8)
    wt[:, 0, 2, 2] = -127
    rq = dense.Requant(-17587, -32768, 32767, "int16")
    bias = np.full(c, -(2**31) + 1523, np.int32)
    m0, sh = np.full(c, 1560672697, np.int32), np.full(c, 53, np.int32)
    xk, (oh, ow), hpwp = _kernel_input(x, 5, 5, (1, 1), (2, 2, 2, 2), 12, rng)
    acc = dw.depthwise_reference(x, wt, (1, 1), (2, 2, 2, 2), 12).astype(np.int32)
    ref = dense.epilogue_reference(acc, bias, m0, sh, rq, axis=1)
    got = _run(((1, c, oh, ow, 5, 5, (1, 1)),
                {"bias": True, "requant": rq, "input_at_least": hpwp, "isa": isa}),
               [xk, dw.pack_depthwise_weight(wt, isa), bias, m0, sh], (1, c, oh, ow),
               np.int16)
    np.testing.assert_array_equal(got, ref)


def test_refuses_bad_sizes():
    with pytest.raises(ValueError, match="bad sizes"):
        dw.int8_depthwise_conv2d(1, 4, 6, 6, 3, 3, (1, 4))
    with pytest.raises(ValueError, match="bad sizes"):  # AVX2: strides 1 and 2 along rows
        dw.int8_depthwise_conv2d(1, 4, 6, 6, 3, 3, (1, 3), isa="avx2")
