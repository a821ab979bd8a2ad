"""Exactness of the x86 int8 kernels (tvmquant.schedules.x86) against int64 NumPy.

Every kernel that runs VNNI (or AVX2) code first checks /proc/cpuinfo and skips with the
reason otherwise; the structural checks (``vpdpbusd`` in the assembly, layout enforcement)
only compile and run anywhere.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import tvm
from helpers import epilogue_operand
from tvm import te
from tvm.s_tir import Schedule
from tvmquant.schedules.x86 import int8_conv2d as conv
from tvmquant.schedules.x86 import int8_dense as dense
from tvmquant.schedules.x86.vnni_intrin import AVX2_INTRIN, VNNI_INTRIN

from tvmquant.numerics import dyadic


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


_FLAGS = _cpu_flags()


def _need(flag: str) -> None:
    if flag not in _FLAGS:
        pytest.skip(f"this CPU lacks {flag} (per /proc/cpuinfo): cannot run the kernel here")


def _run(ex, args, out_shape, out_dtype):
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype=out_dtype))
    ex.mod["main"](*tensors, out)
    return out.numpy()


def _epilogue_params(rng, n):
    bias = rng.integers(-(2**20), 2**20, n).astype(np.int32)
    d = dyadic(rng.uniform(1e-5, 3e-3, n))
    return bias, d.m0.astype(np.int32), d.shift.astype(np.int32)


# --------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------
def test_pack_weight_layout():
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (21, 10), dtype=np.int8)  # N=21, K=10
    p = dense.pack_weight(w, "NK")
    assert p.shape == dense.packed_weight_shape(21, 10) == (2, 3, 16, 4)
    for n in range(21):
        for k in range(10):
            assert p[n // 16, k // 4, n % 16, k % 4] == w[n, k]
    assert not p[1, :, 5:].any() and not p[:, 2, :, 2:].any()  # zero padding
    np.testing.assert_array_equal(dense.pack_weight(w.T.copy(), "KN"), p)
    np.testing.assert_array_equal(dense.unpack_weight(p, 21, 10), w)
    with pytest.raises(ValueError):
        dense.pack_weight(w, "kn")
    with pytest.raises(TypeError):
        dense.pack_weight(w.astype(np.int16), "NK")


def test_pack_conv_weight_layout():
    rng = np.random.default_rng(1)
    w = rng.integers(-128, 128, (18, 6, 3, 2), dtype=np.int8)  # O, C, KH, KW
    p = conv.pack_conv_weight(w)
    assert p.shape == conv.packed_conv_weight_shape(18, 6, 3, 2) == (2, 2 * 3 * 2, 16, 4)
    for o in range(18):
        for c in range(6):
            for i in range(3):
                for j in range(2):
                    assert p[o // 16, (c // 4 * 3 + i) * 2 + j, o % 16, c % 4] == w[o, c, i, j]
    p16 = conv.pack_conv_weight(w, "avx2")  # int16, reduction pairs outermost in the block
    assert p16.dtype == np.int16 and p16.shape == (2, 12, 2, 16, 2)
    np.testing.assert_array_equal(p16[:, :, 0], p[:, :, :, 0:2])
    np.testing.assert_array_equal(p16[:, :, 1], p[:, :, :, 2:4])
    x = rng.integers(0, 256, (2, 6, 3, 5), dtype=np.uint8)
    x4 = conv.pack_input(x)
    assert x4.shape == (2, 2, 3, 5, 4)
    np.testing.assert_array_equal(x4[:, 1, :, :, :2], x[:, 4:6].transpose(0, 2, 3, 1))
    assert not x4[:, 1, :, :, 2:].any()
    x16 = conv.pack_input(x, 16)
    assert x16.shape == (2, 1, 3, 5, 16)
    np.testing.assert_array_equal(conv.unpack_output(x16, 6), x)


# --------------------------------------------------------------------------------------------
# structure: vpdpbusd in the assembly, the packed layout enforced (compile only)
# --------------------------------------------------------------------------------------------
def test_dense_asm_has_vpdpbusd():
    ex = dense.build_int8_dense(8, 64, 64)
    asm = ex.mod.inspect_source("asm")
    assert "vpdpbusd" in asm
    assert "zmm" in asm


def test_conv_asm_has_vpdpbusd():
    ex = conv.build_int8_conv2d(1, 8, 6, 6, 16, 3, 3, 1)
    assert "vpdpbusd" in ex.mod.inspect_source("asm")


def test_avx2_asm_is_exact_sequence():
    ex = dense.build_int8_dense(4, 32, 16, isa="avx2")
    asm = ex.mod.inspect_source("asm")
    assert "vpmaddwd" in asm and "vpdpbusd" not in asm
    assert "vpmaddubsw" not in asm  # saturating: not exact for u8 x s8
    assert re.search(r"vpbroadcastd\s+-?\w*\(%", asm)  # A widened: pairs broadcast from memory


def test_intrinsic_refuses_unpacked_weight():
    """Tensorizing 16x4 blocks straight out of an unpacked (N, K) weight must not build."""
    m, n, k = 4, 32, 64
    a = te.placeholder((m, k), "uint8", name="A")
    w = te.placeholder((n, k), "int8", name="W")
    r = te.reduce_axis((0, k), "k")
    c = te.compute(
        (m, n), lambda i, j: te.sum(a[i, r].astype("int32") * w[j, r].astype("int32"), axis=r)
    )
    sch = Schedule(te.create_prim_func([a, w, c]))
    blk = sch.get_sblock("compute")
    i, j, kk = sch.get_loops(blk)
    jo, ji = sch.split(j, [None, 16])
    ko, ki = sch.split(kk, [None, 4])
    sch.reorder(i, jo, ko, ji, ki)
    sch.decompose_reduction(blk, ko)
    try:
        sch.tensorize(ji, VNNI_INTRIN)
    except Exception:
        return
    with pytest.raises(Exception, match="strides"):
        tvm.compile(sch.mod, dense.default_target())


# --------------------------------------------------------------------------------------------
# dense: exact against NumPy
# --------------------------------------------------------------------------------------------
DENSE_SHAPES = [(1, 16, 4), (1, 33, 7), (7, 40, 66), (13, 100, 129), (64, 64, 64), (5, 3, 1),
                (1, 200, 300), (37, 48, 20)]
REQUANTS = [
    None,
    dense.Requant(3, 0, 255, "uint8"),
    dense.Requant(-7, -128, 127, "int8"),
    dense.Requant(0, 12, 200, "uint8"),  # a fused ReLU6-like clamp
    dense.Requant(-3000, -32768, 32767, "int16"),  # the input of a 16-bit lookup table
]


@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dense_exact(shape):
    _need("avx512_vnni")
    m, n, k = shape
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    a[0, :] = 255  # extreme rows/columns: no saturation anywhere
    w[0, :] = -128
    ex = dense.build_int8_dense(m, n, k)
    got = _run(ex, [a, dense.pack_weight(w.T.copy(), "KN")], (m, n), np.int32)
    ref = a.astype(np.int64) @ w.astype(np.int64).T
    np.testing.assert_array_equal(got, ref)


EPILOGUES = [(True, None)] + [(b, rq) for rq in REQUANTS[1:] for b in (False, True)]
EPILOGUE_IDS = ["bias"] + [f"{'bias-' if b else ''}{n}" for n in ("u8", "i8", "clamp", "i16")
                           for b in (False, True)]


@pytest.mark.parametrize("shape", [(1, 33, 7), (7, 40, 66), (16, 64, 128)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=EPILOGUE_IDS)
def test_dense_epilogue_exact(shape, epilogue):
    bias, rq = epilogue
    _need("avx512_vnni")
    m, n, k = shape
    rng = np.random.default_rng(k + 7 * n)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    b, m0, sh = _epilogue_params(rng, n)
    ex = dense.build_int8_dense(m, n, k, bias=bias, requant=rq)
    args = [a, dense.pack_weight(w, "NK")] + ([b] if bias else []) + ([m0, sh] if rq else [])
    got = _run(ex, args, (m, n), rq.out_dtype if rq else np.int32)
    acc = (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)
    ref = dense.epilogue_reference(acc, b if bias else None, m0, sh, rq)
    assert got.dtype == ref.dtype
    np.testing.assert_array_equal(got, ref)


def test_dense_requant_edge_shifts():
    """shift = 0 (no rounding term), odd/large shifts, m0 near 2^31, int32 bias wrap-around."""
    _need("avx512_vnni")
    m, n, k = 6, 20, 36
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    shift = np.array([0, 1, 2, 31, 40, 62] + [33] * (n - 6), dtype=np.int32)
    m0 = rng.integers(1, 2**31, n).astype(np.int32)
    m0[:6] = [1, 3, 2**31 - 1, 2**30, 2**31 - 1, 2**31 - 1]
    bias = rng.integers(-(2**31), 2**31, n, dtype=np.int64).astype(np.int32)
    rq = dense.Requant(1, -128, 127, "int8")
    ex = dense.build_int8_dense(m, n, k, bias=True, requant=rq)
    got = _run(ex, [a, dense.pack_weight(w, "NK"), bias, m0, shift], (m, n), np.int8)
    acc = (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)
    np.testing.assert_array_equal(got, dense.epilogue_reference(acc, bias, m0, shift, rq))


@pytest.mark.parametrize("tiles", [(1, 1, None), (3, 2, None), (4, 4, 16), (6, 1, 8)])
def test_dense_tilings_exact(tiles):
    """Non-default register tiles and K blocking, with row and column-block tails."""
    _need("avx512_vnni")
    mb, nb, kc = tiles
    m, n, k = 11, 80, 64
    rng = np.random.default_rng(mb * 10 + nb)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    ex = dense.build_int8_dense(m, n, k, mb=mb, nb=nb, kc=kc)
    got = _run(ex, [a, dense.pack_weight(w, "NK")], (m, n), np.int32)
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64).T)


@pytest.mark.parametrize("shape", [(1, 16, 8), (7, 40, 66), (9, 64, 100)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dense_avx2_exact(shape):
    """The AVX2 fallback, with the operands that saturate vpmaddubsw (255 x -128, 255 x 127)."""
    _need("avx2")
    m, n, k = shape
    rng = np.random.default_rng(n)
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    a[0, :] = 255
    w[0, :] = -128
    w[1, :] = 127
    ex = dense.build_int8_dense(m, n, k, isa="avx2")
    got = _run(ex, [a, dense.pack_weight(w, "NK", "avx2")], (m, n), np.int32)
    np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64).T)
    assert AVX2_INTRIN  # registered under its own name


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2"])
def test_dense_epilogue_placement(isa):
    """On AVX2 the epilogue runs after the tiles, over rows in parallel (in the tiles it
    cost a workspace allocation per tile and, where tiles overhang, a byte extract and a
    branch per output); on AVX-512 it stays in the tile, where masked stores are cheap."""
    rq = dense.Requant(3, 0, 255)
    sch = Schedule(dense.int8_dense(40, 100, 120, bias=True, requant=rq, isa=isa))
    loops = [sch.get(lp) for lp in sch.get_loops(sch.get_sblock("C"))]
    if isa == "avx2":
        assert [int(lp.extent) for lp in loops] == [40, 100]
        assert loops[0].kind == tvm.tirx.ForKind.PARALLEL
    else:  # under the parallel loop of tiles, vectorized over 16 columns
        assert loops[0].kind == tvm.tirx.ForKind.PARALLEL and int(loops[0].extent) != 40
        assert int(loops[-1].extent) == 16 and loops[-1].kind == tvm.tirx.ForKind.VECTORIZED


# --------------------------------------------------------------------------------------------
# conv2d: exact against NumPy
# --------------------------------------------------------------------------------------------
CONV_CASES = [
    # n, c, h, w (padded input), o, kh, kw, stride
    (1, 8, 10, 10, 16, 3, 3, 1),
    (1, 3, 11, 9, 20, 3, 3, 2),  # C=3 (RGB), O not a multiple of 16
    (2, 6, 7, 7, 33, 1, 1, 1),
    (1, 16, 9, 9, 40, 3, 3, 2),
    (1, 5, 8, 13, 17, 1, 1, 2),
    (1, 32, 6, 6, 64, 1, 1, 1),
]


def _conv_ids(c):
    n, ch, h, w, o, kh, _kw, s = c
    return f"n{n}c{ch}_{h}x{w}_o{o}_k{kh}s{s}"


def _conv_input(x, layout):
    return {"NCHW": x, "NCHW4c": conv.pack_input(x), "NCHW16c": conv.pack_input(x, 16)}[layout]


def _conv_out_shape(n, o, oh, ow, out_layout):
    return (n, o, oh, ow) if out_layout == "NCHW" else (n, -(-o // 16), oh, ow, 16)


def _conv_out_to_nchw(y, o, out_layout):
    if out_layout == "NCHW":
        return y
    tail = o % 16
    if tail:
        assert not y[:, -1, :, :, tail:].any(), "padded output channels must be 0"
    return conv.unpack_output(y, o)


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_ids)
@pytest.mark.parametrize("layouts", [("NCHW", "NCHW"), ("NCHW4c", "NCHW"),
                                     ("NCHW16c", "NCHW16c"), ("NCHW", "NCHW16c")],
                         ids=lambda t: "-".join(t))
def test_conv2d_exact(case, layouts):
    _need("avx512_vnni")
    layout, out_layout = layouts
    n, c, h, w, o, kh, kw, s = case
    rng = np.random.default_rng(sum(case))
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, kh, kw), dtype=np.int8)
    x[0, :, 0, :] = 255
    wt[0] = -128
    ex = conv.build_int8_conv2d(n, c, h, w, o, kh, kw, s, data_layout=layout,
                                out_layout=out_layout)
    oh, ow = conv.conv_output_size(h, w, kh, kw, s)
    got = _run(ex, [_conv_input(x, layout), conv.pack_conv_weight(wt)],
               _conv_out_shape(n, o, oh, ow, out_layout), np.int32)
    got = _conv_out_to_nchw(got, o, out_layout)
    np.testing.assert_array_equal(got, conv.conv2d_reference(x, wt, s))


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[2]], ids=_conv_ids)
@pytest.mark.parametrize("rq", REQUANTS[1:], ids=["u8", "i8", "clamp", "i16"])
@pytest.mark.parametrize("out_layout", ["NCHW", "NCHW16c"])
def test_conv2d_epilogue_exact(case, rq, out_layout):
    _need("avx512_vnni")
    n, c, h, w, o, kh, kw, s = case
    rng = np.random.default_rng(o)
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, kh, kw), dtype=np.int8)
    b, m0, sh = _epilogue_params(rng, o)
    ex = conv.build_int8_conv2d(n, c, h, w, o, kh, kw, s, bias=True, requant=rq,
                                out_layout=out_layout)
    oh, ow = conv.conv_output_size(h, w, kh, kw, s)
    got = _run(ex, [x, conv.pack_conv_weight(wt), b, m0, sh],
               _conv_out_shape(n, o, oh, ow, out_layout), rq.out_dtype)
    got = _conv_out_to_nchw(got, o, out_layout)
    acc = conv.conv2d_reference(x, wt, s).astype(np.int32)
    ref = dense.epilogue_reference(acc, b, m0, sh, rq, axis=1)
    np.testing.assert_array_equal(got, ref)


LUT_REQUANTS = [
    # the int16 input of a 16-bit table as LowerToIntegerOnly writes it (offset 32768) ...
    dense.Requant(-3000, -32768, 32767, "int16", lut_size=65536, lut_offset=32768),
    # ... and a short int8 table whose indices leave it on both sides (clipped)
    dense.Requant(-40, -300, 500, "int16", lut_size=301, lut_offset=-50, lut_dtype="int8"),
]
LUT_IDS = ["lut-u8-65536", "lut-i8-301"]
GATE_REQUANTS = [
    # hard-swish's integer gate on 16-bit codes, into uint8 ...
    dense.Requant(-3000, -32768, 32767, "int16", gate=dense.Gate("uint8", 0, 255)),
    # ... and into int8, clamped at both ends, from a narrower int16 clamp
    dense.Requant(-40, -300, 500, "int16", gate=dense.Gate("int8", -100, 90)),
]
GATE_IDS = ["gate-u8", "gate-i8-clamp"]
PADS = [(0, 0, 0, 0), (1, 1, 1, 1), (2, 0, 1, 3)]


@pytest.mark.parametrize("case", [CONV_CASES[0], CONV_CASES[1], CONV_CASES[4]], ids=_conv_ids)
@pytest.mark.parametrize("pad,rq", [(p, rq) for p in PADS for rq in LUT_REQUANTS]
                         + list(zip(PADS[1:], GATE_REQUANTS)),
                         ids=[f"pad{''.join(map(str, p))}-{i}" for p in PADS for i in LUT_IDS]
                         + [f"pad{''.join(map(str, p))}-{i}" for p, i in zip(PADS[1:], GATE_IDS)])
def test_conv2d_pads_and_looks_up_in_the_kernel(case, pad, rq):
    """The kernel's own padding (any value) and lookup-table or gate epilogue, against
    NumPy."""
    _need("avx512_vnni")
    n, c, h, w, o, kh, kw, s = case
    rng = np.random.default_rng()
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, kh, kw), dtype=np.int8)
    b, m0, sh = _epilogue_params(rng, o)
    sh = sh - 4  # spread the accumulators over the whole int16 range
    table, value = epilogue_operand(rng, rq), int(rng.integers(0, 256))
    ex = conv.build_int8_conv2d(n, c, h, w, o, kh, kw, s, bias=True, requant=rq, pad=pad,
                                pad_value=value)
    top, left, bottom, right = pad
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)
    acc = conv.conv2d_reference(xp, wt, s).astype(np.int32)
    ref = dense.epilogue_reference(acc, b, m0, sh, rq, axis=1, lut=table)
    got = _run(ex, [x, conv.pack_conv_weight(wt), b, m0, sh, table], ref.shape,
               rq.result_dtype)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("case", CONV_CASES, ids=_conv_ids)
@pytest.mark.parametrize("out_layout", ["NCHW", "NCHW16c"])
def test_conv2d_avx2_exact(case, out_layout):
    """The AVX2 fallback of the conv kernel, with the operands that saturate vpmaddubsw, its
    padding, requantization and table or gate, against NumPy."""
    _need("avx2")
    n, c, h, w, o, kh, kw, s = case
    rng = np.random.default_rng()
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, kh, kw), dtype=np.int8)
    x[0, :, 0, :] = 255
    wt[0] = -128
    raw = conv.build_int8_conv2d(n, c, h, w, o, kh, kw, s, out_layout=out_layout, isa="avx2")
    oh, ow = conv.conv_output_size(h, w, kh, kw, s)
    got = _run(raw, [x, conv.pack_conv_weight(wt, "avx2")],
               _conv_out_shape(n, o, oh, ow, out_layout), np.int32)
    np.testing.assert_array_equal(_conv_out_to_nchw(got, o, out_layout),
                                  conv.conv2d_reference(x, wt, s))
    pad = (1, 2, 0, 1)
    for rq in [LUT_REQUANTS[1]] + ([GATE_REQUANTS[1]] if out_layout == "NCHW" else []):
        b, m0, sh = _epilogue_params(rng, o)
        table, value = epilogue_operand(rng, rq), int(rng.integers(0, 256))
        ex = conv.build_int8_conv2d(n, c, h, w, o, kh, kw, s, bias=True, requant=rq, pad=pad,
                                    pad_value=value, isa="avx2")
        xp = np.pad(x, ((0, 0), (0, 0), (1, 0), (2, 1)), constant_values=value)
        acc = conv.conv2d_reference(xp, wt, s).astype(np.int32)
        ref = dense.epilogue_reference(acc, b, m0 >> 4, sh - 4, rq, axis=1, lut=table)
        got = _run(ex, [x, conv.pack_conv_weight(wt, "avx2"), b, m0 >> 4, sh - 4, table],
                   ref.shape, rq.result_dtype)
        np.testing.assert_array_equal(got, ref)


def test_conv_avx2_asm_is_exact_sequence():
    ex = conv.build_int8_conv2d(1, 8, 6, 6, 32, 3, 3, 1, isa="avx2")
    asm = ex.mod.inspect_source("asm")
    assert "vpmaddwd" in asm and "ymm" in asm
    for absent in ("vpdpbusd", "vpmaddubsw", "zmm"):  # no VNNI, no saturation, no AVX-512
        assert absent not in asm, absent
    # the NCHW input is re-laid out in int16: each activation pair is broadcast straight
    # from memory (AVX2_WIDE_INTRIN), not assembled from bytes in general registers
    assert re.search(r"vpbroadcastd\s+-?\w*\(%", asm)


@pytest.mark.parametrize("rq", LUT_REQUANTS + GATE_REQUANTS, ids=LUT_IDS + GATE_IDS)
def test_dense_looks_up_in_the_kernel(rq):
    _need("avx512_vnni")
    m, n, k = 37, 50, 70
    rng = np.random.default_rng()
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    b, m0, sh = _epilogue_params(rng, n)
    table = epilogue_operand(rng, rq)
    ex = dense.build_int8_dense(m, n, k, bias=True, requant=rq)
    got = _run(ex, [a, dense.pack_weight(w, "NK"), b, m0, sh - 4, table], (m, n),
               rq.result_dtype)
    acc = (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)
    np.testing.assert_array_equal(
        got, dense.epilogue_reference(acc, b, m0, sh - 4, rq, lut=table))


def test_lookup_table_requant_checks():
    with pytest.raises(ValueError, match="lookup table"):
        dense.Requant(0, -5, 5, "int16", lut_size=10, lut_dtype="int16")
    assert dense.Requant(0, -5, 5, "int16", lut_size=10).result_dtype == "uint8"
    assert dense.Requant(0, -5, 5, "int16").result_dtype == "int16"
    assert GATE_REQUANTS[1].result_dtype == "int8" and GATE_REQUANTS[1].has_activation
    with pytest.raises(ValueError, match="not both"):
        dense.Requant(0, -5, 5, "int16", lut_size=10, gate=dense.Gate())
    with pytest.raises(ValueError, match="gate clamp"):
        dense.Gate("int8", -5, 200)
    with pytest.raises(ValueError, match="uint8 or int8"):
        dense.Gate("int16")
    with pytest.raises(ValueError, match="gate's 9 parameters"):
        dense.epilogue_reference(np.zeros((2, 3), np.int32), None, np.ones(3), np.ones(3),
                                 GATE_REQUANTS[0], lut=np.zeros(7, np.int32))
    with pytest.raises(ValueError, match="pads only NCHW"):
        conv.int8_conv2d(1, 8, 6, 6, 16, 3, 3, 1, data_layout="NCHW4c", pad=(1, 1, 1, 1))


# --------------------------------------------------------------------------------------------
# in a Relax graph: R.call_tir with pre-packed constant weights
# --------------------------------------------------------------------------------------------
def test_dense_in_relax_call_tir():
    _need("avx512_vnni")
    from tvm import relax

    m, n, k = 3, 24, 18
    rng = np.random.default_rng(11)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)  # the (K, N) weight of matmul(x, w)
    b, m0, sh = _epilogue_params(rng, n)
    rq = dense.Requant(-2, -128, 127, "int8")
    kern = dense.kernel_for_relax(dense.int8_dense(m, n, k, bias=True, requant=rq), "qdense")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "uint8"))
    with bb.function("main", [x]):
        gv = bb.add_func(kern, "qdense")
        consts = [relax.const(v) for v in (dense.pack_weight(w, "KN"), b, m0, sh)]
        y = bb.emit(relax.call_tir(gv, [x, *consts], relax.TensorType((m, n), "int8")))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), dense.default_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    got = vm["main"](tvm.runtime.tensor(a)).numpy()
    acc = (a.astype(np.int64) @ w.astype(np.int64)).astype(np.int32)
    np.testing.assert_array_equal(got, dense.epilogue_reference(acc, b, m0, sh, rq))


# --------------------------------------------------------------------------------------------
# requantization from the product's high word (Requant.high_word, every shift in 33..62)
# --------------------------------------------------------------------------------------------
HIGH_WORD_REQUANTS = [
    dense.Requant(3, 0, 255, "uint8", high_word=True),
    dense.Requant(-5, -100, 90, "int8", high_word=True),
    dense.Requant(-40, -30000, 32000, "int16", high_word=True),
    dense.Requant(-40, -300, 500, "int16", gate=dense.Gate("int8", -100, 90), high_word=True),
]


def _high_word_params(rng, n):
    """Biases over the whole int32 range (the sums wrap), every shift from 33 to 62, and
    multipliers from 1 to 2**31 - 1, so that the outputs spread over the clamp range."""
    bias = rng.integers(-(2**31), 2**31, n).astype(np.int32)
    sh = (33 + np.arange(n) % 30).astype(np.int32)
    m0 = np.minimum(2.0 ** (sh - 31) * rng.uniform(0.5, 400.0, n), 2**31 - 1).astype(np.int32)
    return bias, np.maximum(m0, 1), sh


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2"])
@pytest.mark.parametrize("rq", HIGH_WORD_REQUANTS, ids=["u8", "i8", "i16", "gate-i8"])
def test_high_word_requantization_exact(rq, isa):
    """The int32 high-word form gives the int64 reference's bytes, in the dense kernel and
    in the pixel-lane conv's row epilogue, at every shift it is used for."""
    _need(isa)
    from tvmquant.schedules.x86 import int8_conv2d_pixels as px

    rng = np.random.default_rng()
    m, n, k = 7, 60, 200
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    a[0], w[0] = 255, -128
    bias, m0, sh = _high_word_params(rng, n)
    table = epilogue_operand(rng, rq)
    extra = [table] if table is not None else []
    plain = dataclasses.replace(rq, high_word=False)
    acc = (a.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
    ref = dense.epilogue_reference(acc, bias, m0, sh, plain, lut=table)
    pre = dense.epilogue_reference(acc, bias, m0, sh, dataclasses.replace(plain, gate=None))
    assert len(np.unique(pre)) > 20  # the requantized values spread, not all clamped
    ex = dense.build_int8_dense(m, n, k, bias=True, requant=rq, isa=isa)
    got = _run(ex, [a, dense.pack_weight(w, "NK", isa), bias, m0, sh, *extra], (m, n),
               rq.result_dtype)
    np.testing.assert_array_equal(got, ref)
    # the same on a 1x1 conv with pixels on the lanes (its epilogue runs on rows)
    x = a.T.reshape(1, k, 1, m)
    wc = w.reshape(n, k, 1, 1)
    ex = px.build_int8_conv2d_pixels(1, k, 1, m, n, 1, 1, bias=True, requant=rq, isa=isa)
    got = _run(ex, [x, px.pack_conv_weight_pixels(wc, isa), bias, m0, sh, *extra],
               (1, n, 1, m), rq.result_dtype)
    np.testing.assert_array_equal(got, ref.T.reshape(1, n, 1, m))


def _scaled_params(rng, n, rq):
    """Shifts from 3 to 62, half of the channels at the 24-32 of the layers before a gate,
    multipliers in [2**30, 2**31) (as the pipeline makes them), biases that put the (small)
    sums where the requantized values spread over ``rq``'s clamp range, and a fifth of them
    over all of int32."""
    i = np.arange(n)
    sh = np.where(i % 2 == 0, 24 + (i // 2) % 9, 3 + (i // 2) % 60).astype(np.int32)
    m0 = rng.integers(2**30, 2**31, n).astype(np.int32)
    target = rng.uniform(rq.lo - rq.zero_point, rq.hi - rq.zero_point, n)
    bias = np.clip(target * 2.0 ** sh.astype(np.float64) / m0, -(2**31), 2**31 - 1)
    bias = bias.astype(np.int64)
    wide = rng.random(n) < 0.2
    bias[wide] = rng.integers(-(2**31), 2**31, int(wide.sum()))
    return bias.astype(np.int32), m0, sh


@pytest.mark.parametrize("isa", ["avx512_vnni", "avx2"])
@pytest.mark.parametrize("rq", HIGH_WORD_REQUANTS, ids=["u8", "i8", "i16", "gate-i8"])
def test_scaled_high_word_requantization_exact(rq, isa):
    """Shifts below 33 scaled to 33 (``Requant.scaled``): the int64 reference's bytes, where
    the dispatcher's check allows the form (it does for multipliers as the pipeline makes
    them), including sums at both ends of int32."""
    _need(isa)
    rng = np.random.default_rng()
    m, n, k = 17, 120, 8
    # small sums (a shift of 30 maps a sum to about itself), and row 0's as large as they get
    a = rng.integers(0, 4, (m, k), dtype=np.uint8)
    w = rng.integers(-4, 4, (n, k), dtype=np.int8)
    a[0], w[:, 0] = 255, -128
    bias, m0, sh = _scaled_params(rng, n, rq)
    bias[:4] = [-(2**31), 2**31 - 1, -(2**31) + 5, 2**31 - 6]  # sums that wrap, or end there
    rq = dataclasses.replace(rq, scaled=True)
    plain = dataclasses.replace(rq, high_word=False, scaled=False)
    assert dense.scaled_high_word_is_exact(m0, sh, plain)
    table = epilogue_operand(rng, rq)
    extra = [table] if table is not None else []
    acc = (a.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
    ref = dense.epilogue_reference(acc, bias, m0, sh, plain, lut=table)
    pre = dense.epilogue_reference(acc, bias, m0, sh, dataclasses.replace(plain, gate=None))
    low = sh < 33
    clamped = (pre == plain.lo) | (pre == plain.hi)
    assert (~clamped[:, low]).sum() > 25  # low shifts' outputs spread, not all clamped
    ex = dense.build_int8_dense(m, n, k, bias=True, requant=rq, isa=isa)
    got = _run(ex, [a, dense.pack_weight(w, "NK", isa), bias, m0, sh, *extra], (m, n),
               rq.result_dtype)
    np.testing.assert_array_equal(got, ref)


def test_scaled_high_word_check_refuses_a_clip_that_changes_outputs():
    rq = dense.Requant(0, 0, 255)
    ok = np.array([2**30, 2**30 + 5], np.int32), np.array([29, 40], np.int32)
    assert dense.scaled_high_word_is_exact(*ok, rq)
    # a tiny multiplier: the clip at 2**27 (shift 29) would hold a sum that rises further
    assert not dense.scaled_high_word_is_exact(np.array([1, 2**30], np.int32), ok[1], rq)
    # shifts outside 3..62
    assert not dense.scaled_high_word_is_exact(ok[0], np.array([2, 40], np.int32), rq)
    assert not dense.scaled_high_word_is_exact(ok[0], np.array([30, 63], np.int32), rq)
    with pytest.raises(ValueError, match="high_word"):
        dense.Requant(0, 0, 255, scaled=True)


def test_avx2_dispatch_requantizes_from_the_high_word_when_every_shift_allows():
    from tvmquant.schedules.x86.dispatch import _Match, _use_high_word

    def match(shifts, m0=1):
        return _Match(None, None, None, None, np.full(len(shifts), m0, np.int32),
                      np.array(shifts, np.int32), dense.Requant(3, 0, 255), None)

    for shifts, m0, high, scaled in [([33, 40, 62], 1, True, False),
                                     ([32, 40], 700, False, False),  # the clip cuts
                                     ([32, 40], 2**30, True, True),
                                     ([29, 33], 2**30 + 7, True, True),
                                     ([40, 63], 2**30, False, False)]:
        m = match(shifts, m0)
        _use_high_word(m)
        assert (m.requant.high_word, m.requant.scaled) == (high, scaled), shifts
