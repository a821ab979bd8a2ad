"""The pixel-lane int8 conv kernel (``int8_conv2d_pixels``): exact against NumPy, its structure,
and the dispatcher's choice between it and the channel-lane kernel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tvm
from helpers import conv_requant_chain, epilogue_operand
from tvmquant.schedules.x86 import int8_conv2d as conv
from tvmquant.schedules.x86 import int8_conv2d_pixels as px
from tvmquant.schedules.x86 import int8_dense as dense
from tvmquant.schedules.x86.dispatch import DispatchX86Int8

from tvmquant._compat import const_value
from tvmquant.numerics import dyadic

ISAS = ["avx512_vnni", "avx2"]


def _need(isa: str = "avx512_vnni") -> None:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    if isa not in flags:
        pytest.skip(f"this CPU lacks {isa} (per /proc/cpuinfo): cannot run the kernel here")


def _run(ex, args, out_shape, out_dtype):
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args]
    out = tvm.runtime.tensor(np.zeros(out_shape, dtype=out_dtype))
    ex.mod["main"](*tensors, out)
    return out.numpy()


def test_pack_weight_layout():
    w = np.arange(2 * 6 * 3 * 3).reshape(2, 6, 3, 3).astype(np.int8)
    p = px.pack_conv_weight_pixels(w)
    assert p.shape == (2, 2 * 3 * 3, 4)
    for o, c, kh, kw in [(0, 0, 0, 0), (1, 5, 2, 1), (1, 3, 1, 2)]:
        assert p[o, (c // 4 * 3 + kh) * 3 + kw, c % 4] == w[o, c, kh, kw]
    assert not p[:, 9:, 2:].any()  # channels 6, 7: zero padding
    with pytest.raises(ValueError, match="int8 OIHW"):
        px.pack_conv_weight_pixels(w.astype(np.int32))
    wide = px.pack_conv_weight_pixels(w, "avx2")  # the same layout, widened for vpmaddwd
    assert wide.dtype == np.int16 and np.array_equal(wide, p.astype(np.int16))
    with pytest.raises(ValueError, match="isa"):
        px.pack_conv_weight_pixels(w, "avx512")


def test_tiles_and_choice():
    assert px.pixel_tiles(80, 24) == (5, 4)  # 5 vectors fill the row; 24 = 6 x 4 channels
    mb, nb = px.pixel_tiles(40, 37)
    assert mb == 3 and mb * nb <= px.MAX_TILE and nb > 1
    assert px.prefer_pixels(80, 24) and px.prefer_pixels(160, 32)
    assert px.prefer_pixels(40, 96)  # 17% of the pixel lanes wasted: still faster
    assert not px.prefer_pixels(20, 192) and not px.prefer_pixels(20, 16)
    # AVX2: one vector of pixels, up to 6 channels (12 ymm accumulators of 16 available)
    assert px.pixel_tiles(80, 24, "avx2") == (1, 6)
    assert px.pixel_tiles(80, 96, "avx2")[0] == 1
    assert all(px.pixel_tiles(ow, o, "avx2")[1] <= px.MAX_TILE_AVX2
               for ow in (7, 40, 80) for o in (5, 24, 37, 240))


def test_asm_has_vpdpbusd_with_broadcast_weights():
    ex = px.build_int8_conv2d_pixels(1, 8, 6, 20, 5, 3, 3)
    asm = ex.mod.inspect_source("asm")
    assert "vpdpbusd" in asm and ("vpbroadcastd" in asm or "{1to16}" in asm)


def test_avx2_asm_is_vpmaddwd_on_ymm_with_broadcast_weights():
    ex = px.build_int8_conv2d_pixels(1, 8, 6, 20, 5, 3, 3, pad=(1, 1, 1, 1), isa="avx2")
    asm = ex.mod.inspect_source("asm")
    assert "vpmaddwd" in asm and "vpbroadcastd" in asm
    assert "vpdpbusd" not in asm and "zmm" not in asm  # runs on AVX2-only CPUs
    # the hot loop reads its pixels straight from memory or registers: no byte shuffling
    assert "vpinsrb" not in asm and "vpextrb" not in asm


CASES = [
    # n, c, h, w, o, kh, kw, pad (top, left, bottom, right)
    (1, 8, 6, 20, 5, 3, 3, (1, 1, 1, 1)),
    (1, 13, 11, 9, 37, 3, 3, (0, 0, 0, 0)),  # C not a multiple of 4, O prime, OW 7
    (2, 6, 7, 33, 24, 1, 1, (0, 0, 0, 0)),
    (1, 3, 9, 17, 12, 5, 5, (2, 0, 1, 3)),
    (1, 32, 4, 80, 24, 3, 3, (1, 1, 1, 1)),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}_{}x{}_o{}_k{}".format(*c[:6]))
def test_conv_exact(case, isa):
    _need(isa)
    n, c, h, w, o, kh, kw, pad = case
    rng = np.random.default_rng()
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, kh, kw), dtype=np.int8)
    x[0, :, 0, :] = 255
    wt[0] = -128
    value = int(rng.integers(0, 256))
    top, left, bottom, right = pad
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)
    ref = conv.conv2d_reference(xp, wt, 1)
    ex = px.build_int8_conv2d_pixels(n, c, h, w, o, kh, kw, pad=pad, pad_value=value, isa=isa)
    got = _run(ex, [x, px.pack_conv_weight_pixels(wt, isa)], ref.shape, np.int32)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("rq", [
    dense.Requant(3, 0, 255, "uint8"),
    dense.Requant(-5, -100, 90, "int8"),
    dense.Requant(-3000, -32768, 32767, "int16", lut_size=65536, lut_offset=32768),
    dense.Requant(-40, -300, 500, "int16", lut_size=301, lut_offset=-50, lut_dtype="int8"),
    dense.Requant(-3000, -32768, 32767, "int16", gate=dense.Gate("uint8", 0, 255)),
    dense.Requant(-40, -300, 500, "int16", gate=dense.Gate("int8", -100, 90)),
], ids=["u8", "i8-clamp", "lut-u8-65536", "lut-i8-301", "gate-u8", "gate-i8-clamp"])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=["o5", "o37"])
def test_conv_epilogue_exact(case, rq, isa):
    _need(isa)
    n, c, h, w, o, kh, kw, pad = case
    rng = np.random.default_rng()
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, kh, kw), dtype=np.int8)
    bias = rng.integers(-(2**20), 2**20, o).astype(np.int32)
    d = dyadic(rng.uniform(1e-5, 3e-3, o))
    m0, sh = d.m0.astype(np.int32), d.shift.astype(np.int32) - 4
    table = epilogue_operand(rng, rq)
    args = [x, px.pack_conv_weight_pixels(wt, isa), bias, m0, sh] + \
        ([table] if table is not None else [])
    top, left, bottom, right = pad
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    acc = conv.conv2d_reference(xp, wt, 1).astype(np.int32)
    ref = dense.epilogue_reference(acc, bias, m0, sh, rq, axis=1, lut=table)
    ex = px.build_int8_conv2d_pixels(n, c, h, w, o, kh, kw, bias=True, requant=rq, pad=pad,
                                     isa=isa)
    got = _run(ex, args, ref.shape, ref.dtype)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("o,width,stride,kernel", [
    (24, 80, 1, "pixels"),   # wide rows, 24 channels: pixels on the lanes
    (32, 20, 1, "channels"),  # rows of 20 waste 37% of the pixel lanes
    (24, 80, 2, "channels"),  # stride 2: the pixel kernel is stride 1 only
])
def test_dispatch_picks_the_kernel_and_stays_exact(o, width, stride, kernel, isa):
    from tvm import relax

    mod = conv_requant_chain(16, o, width, stride)
    after = DispatchX86Int8(isa=isa)(mod)
    relax.analysis.well_formed(after)
    call = next(b.value for b in after["main"].body.blocks[0].bindings
                if getattr(b.value.op, "name", "") == "relax.call_tir")
    packed = const_value(call.args[1].fields[1])
    assert packed.ndim == (3 if kernel == "pixels" else 4 if isa == "avx512_vnni" else 5)
    assert packed.dtype == (np.int16 if isa == "avx2" else np.int8)
    _need(isa)
    target = dense.default_target(isa)
    vm_a = relax.VirtualMachine(tvm.compile(after, target), tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng().integers(0, 256, (1, 16, 6, width))
                           .astype("uint8"))
    np.testing.assert_array_equal(vm_a["main"](x).numpy(), vm_b["main"](x).numpy())
