"""The AMX-INT8 conv kernel (``int8_conv2d_amx``), its tile instructions and their emulator.

This project's machine has no AMX. Every kernel here is therefore run twice over where it
can be: through :mod:`amx_emulator` (each AMX instruction of the kernel, with its real
operands, run by a NumPy model of the instruction) on any CPU, and for real on a CPU with
AMX-INT8 (skipped elsewhere, saying so). The emulator itself is checked against the
instruction's definition written out element by element.
"""

from __future__ import annotations

import ctypes
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tvm
from helpers import conv_requant_chain, emit_requant, epilogue_operand
from tvm import relax
from tvmquant.schedules.pipeline import fusion_phases
from tvmquant.schedules.x86 import amx_emulator as emu
from tvmquant.schedules.x86 import int8_conv2d as conv
from tvmquant.schedules.x86 import int8_conv2d_amx as amx
from tvmquant.schedules.x86 import int8_dense as dense
from tvmquant.schedules.x86 import int8_dense_amx as damx
from tvmquant.schedules.x86.amx_intrin import tile_config
from tvmquant.schedules.x86.dispatch import DispatchX86Int8, target_isa

import tvmquant
from tvmquant._compat import const_value
from tvmquant.numerics import dyadic
from tvmquant.targets import cpu_has_amx, request_amx_permission, resolve_target


def _need_amx() -> None:
    if not cpu_has_amx():
        pytest.skip("this CPU has no AMX-INT8 (amx_int8 not in /proc/cpuinfo): the AMX build "
                    "is checked through the emulator only")
    if not request_amx_permission():
        pytest.skip("Linux refused this process the AMX tile state (arch_prctl)")


def _need_avx512_vnni() -> None:
    """The emulated AMX kernels are built for a Sapphire Rapids CPU: their tile instructions
    become calls into the emulator, the rest of their code is AVX-512."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    if "avx512_vnni" not in flags:
        pytest.skip("this CPU lacks avx512_vnni (per /proc/cpuinfo): the emulated AMX kernels "
                    "(built for Sapphire Rapids, AVX-512 around the tile calls) cannot run here")


def _ptr(a: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(a.ctypes.data)


# ---------------------------------------------------------------------------------------------
# the tile configuration and the emulator, against the ISA's definitions
# ---------------------------------------------------------------------------------------------
def test_tile_config_bytes():
    cfg = np.frombuffer(tile_config(((16, 64), (3, 12))), np.uint8)
    assert cfg.size == 64 and cfg[0] == 1 and cfg[1] == 0
    assert list(cfg[16:20]) == [64, 0, 12, 0]  # bytes per row, 16-bit little-endian
    assert list(cfg[48:51]) == [16, 3, 0]  # rows, one byte per tile
    assert not cfg[20:48].any() and not cfg[51:].any()
    assert emu.parse_tile_config(cfg) == ([16, 3, 0, 0, 0, 0, 0, 0],
                                          [64, 12, 0, 0, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        tile_config(((17, 64),))


@pytest.mark.parametrize("corrupt,message", [
    (lambda b: b.__setitem__(0, 2), "palette"),
    (lambda b: b.__setitem__(1, 1), "start row"),
    (lambda b: b.__setitem__(40, 1), "reserved"),
    (lambda b: b.__setitem__(48, 17), "not valid"),
    (lambda b: b.__setitem__(16, 0), "not valid"),  # rows without bytes
])
def test_emulator_faults_on_bad_configurations(corrupt, message):
    raw = bytearray(tile_config())
    corrupt(raw)
    with pytest.raises(emu.AmxFault, match=message):
        emu.parse_tile_config(bytes(raw))


def _definition_tdpbsud(c, a, b):
    """Intel SDM, TDPBSUD: for m, n: c[m][n] += sum over k, i of
    SignExtend(a.row[m].byte[4k+i]) * ZeroExtend(b.row[k].byte[4n+i]), int32 wrapping."""
    out = c.astype(np.int64).copy()
    for m in range(a.shape[0]):
        for n in range(c.shape[1]):
            for k in range(b.shape[0]):
                for i in range(4):
                    out[m, n] += int(a[m, 4 * k + i]) * int(b[k, 4 * n + i])
    return ((out + 2**31) % 2**32 - 2**31).astype(np.int32)


def test_emulated_instructions_match_their_definitions():
    rng = np.random.default_rng()
    rows_a, k4, n = 5, 3, 4  # a: 5 x 12 bytes, b: 3 x 16 bytes, c: 5 x 4 int32
    emu.ldtilecfg(_ptr(np.frombuffer(tile_config(
        ((rows_a, 4 * n), (rows_a, 4 * k4), (k4, 4 * n))), np.uint8).copy()))
    a = rng.integers(-128, 128, (rows_a, 4 * k4)).astype(np.int8)
    b = rng.integers(0, 256, (k4, 4 * n)).astype(np.uint8)
    c = rng.integers(-(2**31), 2**31, (rows_a, n)).astype(np.int32)
    c[0, 0] = 2**31 - 5  # wraps
    a[0], b[:, 0:4] = 127, 255
    # strided loads: every operand in a bigger buffer, rows apart by more than their bytes
    big_a = np.zeros((rows_a, 40), np.int8)
    big_a[:, :4 * k4] = a
    big_c = np.zeros((rows_a, 9), np.int32)
    big_c[:, :n] = c
    emu.tileloadd64(0, _ptr(big_c), 36)
    emu.tileloadd64(1, _ptr(big_a), 40)
    emu.tileloadd64(2, _ptr(b), 4 * n)
    emu.tdpbsud(0, 1, 2)
    result = np.full((rows_a, 7), -1, np.int32)
    emu.tilestored64(0, _ptr(result), 28)
    np.testing.assert_array_equal(result[:, :n], _definition_tdpbsud(c, a, b))
    assert (result[:, n:] == -1).all()  # the store wrote its tile's bytes only
    with pytest.raises(emu.AmxFault, match="shapes"):
        emu.tdpbsud(0, 2, 1)
    emu.tilerelease()
    with pytest.raises(emu.AmxFault, match="before ldtilecfg"):
        emu.tileloadd64(0, _ptr(big_c), 36)


# ---------------------------------------------------------------------------------------------
# the kernel
# ---------------------------------------------------------------------------------------------
def test_pack_weight_layout():
    w = np.arange(20 * 70 * 3 * 3).reshape(20, 70, 3, 3).astype(np.int8)
    p = amx.pack_conv_weight_amx(w, nb=2)
    assert p.shape == (32, 3, 3, 32, 4)  # 20 -> 32 channels out, 70 -> 128 in
    for o, c, kh, kw in [(0, 0, 0, 0), (19, 69, 2, 1), (7, 33, 1, 2)]:
        assert p[o, kh, kw, c // 4, c % 4] == w[o, c, kh, kw]
    assert not p[20:].any() and not p[:, :, :, 17:, 2:].any()
    with pytest.raises(ValueError, match="int8 OIHW"):
        amx.pack_conv_weight_amx(w.astype(np.int32), 1)


def test_tiles_and_choice():
    assert amx.amx_tiles(80, 24) == (1, 2)  # 96 pixels would pad a fifth; 32 channels do not
    assert amx.amx_tiles(64, 16) == (2, 1)
    assert amx.amx_tiles(8, 96) == (1, 2)
    assert amx.prefer_amx(96, 24, 80, 3, 3)  # det's FPN 3x3: 96 -> 128 deep, 24 -> 32 wide
    assert not amx.prefer_amx(3, 16, 80, 3, 3)  # 3 of 64 channels deep
    assert not amx.prefer_amx(16, 16, 4, 1, 1)  # a quarter of 64 deep, a quarter of 16 wide
    assert not amx.prefer_amx(96, 24, 80, 1, 3)  # 1 x k: not in the intrinsic's two forms
    with pytest.raises(ValueError, match="1x1"):
        amx.int8_conv2d_amx(1, 16, 4, 20, 16, 1, 3, backend="emulate")


def _build(case, backend="emulate", **kw):
    n, c, h, w, o, k, pad = case
    return amx.build_int8_conv2d_amx(n, c, h, w, o, k, k, pad=pad, backend=backend, **kw)


CASES = [
    # n, c, h, w, o, k, pad (top, left, bottom, right)
    (1, 70, 5, 19, 37, 3, (1, 1, 1, 1)),  # C past one tile's 64, O prime, OW past 16
    (2, 13, 4, 7, 5, 1, (0, 0, 0, 0)),  # batch 2, 1x1, a row shorter than a tile
    (1, 24, 4, 33, 24, 5, (2, 0, 1, 3)),  # asymmetric padding, 5x5
    (1, 64, 3, 32, 16, 3, (1, 1, 1, 1)),  # exact tiles: 2 pixel blocks x 1 channel block
]


def _operands(case, rng):
    n, c, h, w, o, k, _ = case
    x = rng.integers(0, 256, (n, c, h, w), dtype=np.uint8)
    wt = rng.integers(-128, 128, (o, c, k, k), dtype=np.int8)
    x[0, :, 0, :] = 255  # the largest products
    wt[0] = -128
    return x, wt


def _run(ex, args, shape, dtype):
    _need_avx512_vnni()
    out = tvm.runtime.tensor(np.zeros(shape, dtype))
    ex["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: "n{}c{}_{}x{}_o{}_k{}".format(*c[:6]))
def test_conv_exact_emulated(case):
    rng = np.random.default_rng()
    n, c, _, _, o, k, pad = case
    x, wt = _operands(case, rng)
    value = int(rng.integers(0, 256))
    top, left, bottom, right = pad
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=value)
    ref = conv.conv2d_reference(xp, wt, 1)
    mb, nb = amx.amx_tiles(ref.shape[3], o)
    before = dict(emu.counts)
    ex = _build(case, pad_value=value)
    got = _run(ex, [x, amx.pack_conv_weight_amx(wt, nb)], ref.shape, np.int32)
    np.testing.assert_array_equal(got, ref)
    # one tile configuration per (channel block, image, row); the tile multiplies it needs
    oh, ow = ref.shape[2:]
    calls = -(-o // (16 * nb)) * n * oh
    steps = -(-ow // (16 * mb))
    dots = calls * steps * k * k * -(-c // 64) * nb * mb
    assert emu.counts["ldtilecfg"] - before.get("ldtilecfg", 0) == calls
    assert emu.counts["tdpbsud"] - before.get("tdpbsud", 0) == dots


@pytest.mark.parametrize("mb,nb", [(1, 1), (2, 2)])
def test_conv_exact_emulated_any_register_tile(mb, nb):
    case = CASES[0]
    rng = np.random.default_rng()
    x, wt = _operands(case, rng)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = conv.conv2d_reference(xp, wt, 1)
    ex = _build(case, mb=mb, nb=nb)
    got = _run(ex, [x, amx.pack_conv_weight_amx(wt, nb)], ref.shape, np.int32)
    np.testing.assert_array_equal(got, ref)


def _epilogue_operands(rng, channels: int, rq):
    """Random bias, dyadic ``m0``/``shift`` spreading the sums over the output range, and a
    lookup table or gate where ``rq`` has one."""
    bias = rng.integers(-(2**20), 2**20, channels).astype(np.int32)
    d = dyadic(rng.uniform(1e-5, 3e-3, channels))
    m0, sh = d.m0.astype(np.int32), d.shift.astype(np.int32) - 4
    return bias, m0, sh, epilogue_operand(rng, rq)


def _epilogue_case(rq, rng):
    case = CASES[0]
    w, o = case[3], case[4]
    x, wt = _operands(case, rng)
    bias, m0, sh, table = _epilogue_operands(rng, o, rq)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    acc = conv.conv2d_reference(xp, wt, 1).astype(np.int32)
    ref = dense.epilogue_reference(acc, bias, m0, sh, rq, axis=1, lut=table)
    _, nb = amx.amx_tiles(w, o)
    args = [x, amx.pack_conv_weight_amx(wt, nb), bias, m0, sh] + \
        ([table] if table is not None else [])
    return case, args, ref


REQUANTS = [
    dense.Requant(3, 0, 255, "uint8"),
    dense.Requant(-5, -100, 90, "int8"),
    dense.Requant(-40, -300, 500, "int16", lut_size=301, lut_offset=-50, lut_dtype="int8"),
    dense.Requant(-40, -300, 500, "int16", gate=dense.Gate("int8", -100, 90)),
]
REQUANT_IDS = ["u8", "i8-clamp", "lut-i8-301", "gate-i8-clamp"]


@pytest.mark.parametrize("rq", REQUANTS, ids=REQUANT_IDS)
def test_conv_epilogue_exact_emulated(rq):
    case, args, ref = _epilogue_case(rq, np.random.default_rng())
    ex = _build(case, bias=True, requant=rq)
    np.testing.assert_array_equal(_run(ex, args, ref.shape, ref.dtype), ref)


def _amx_instructions(ex) -> Counter:
    return Counter(re.findall(
        r"^\s+(tdpbsud|tdpbusd|tileloadd|tilestored|ldtilecfg|tilerelease)\b",
        ex.mod.inspect_source("asm"), re.M))


def test_asm_is_amx():
    ops = _amx_instructions(_build(CASES[0], backend="amx"))
    # 3 x 3 positions x 2 tiles deep (70 -> 128 channels) x (mb, nb) = (2, 1): 36 multiplies
    # per row step; the configuration once per call
    assert ops["tdpbsud"] == 36 and ops["ldtilecfg"] == 1 and ops["tilerelease"] == 1
    assert ops["tileloadd"] >= 36 + 2 and ops["tilestored"] == 2
    assert not _amx_instructions(_build(CASES[0]))  # emulated: calls instead


@pytest.mark.parametrize("case", CASES[:3], ids=["o37", "n2k1", "k5"])
def test_conv_exact_on_amx(case):
    _need_amx()
    rng = np.random.default_rng()
    x, wt = _operands(case, rng)
    o, pad = case[4], case[6]
    top, left, bottom, right = pad
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ref = conv.conv2d_reference(xp, wt, 1)
    _, nb = amx.amx_tiles(ref.shape[3], o)
    got = _run(_build(case, backend="amx"), [x, amx.pack_conv_weight_amx(wt, nb)],
               ref.shape, np.int32)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("rq", REQUANTS[1:], ids=REQUANT_IDS[1:])
def test_conv_epilogue_exact_on_amx(rq):
    _need_amx()
    case, args, ref = _epilogue_case(rq, np.random.default_rng())
    ex = _build(case, backend="amx", bias=True, requant=rq)
    np.testing.assert_array_equal(_run(ex, args, ref.shape, ref.dtype), ref)


# ---------------------------------------------------------------------------------------------
# the matmul kernel
# ---------------------------------------------------------------------------------------------
def test_dense_pack_and_tiles():
    w = np.arange(50 * 70).reshape(50, 70).astype(np.int8)
    p = damx.pack_weight_amx(w, "NK", nb=2)
    assert p.shape == (4, 32, 16, 4)  # 50 -> 4 blocks of 16, 70 -> 128 deep
    for n, k in [(0, 0), (49, 69), (17, 33)]:
        assert p[n // 16, k // 4, n % 16, k % 4] == w[n, k]
    assert not p[3, :, 2:].any() and not p[:, 18:].any() and not p[:, 17, :, 2:].any()
    assert damx.pack_weight_amx(w[:20], "NK", nb=2).shape == (2, 32, 16, 4)
    np.testing.assert_array_equal(damx.pack_weight_amx(w.T, "KN", nb=2), p)
    assert damx.amx_dense_tiles(40, 96) == (1, 2) and damx.amx_dense_tiles(64, 16) == (2, 1)
    assert damx.prefer_amx_dense(40, 96, 120)
    assert not damx.prefer_amx_dense(1, 16, 64)  # one row of a tile's 16


DENSE_CASES = [
    # m, n, k, requant
    (37, 50, 70, None),  # every side ragged
    (1, 16, 64, None),  # one row, one block
    (40, 96, 120, dense.Requant(3, 0, 255, "uint8")),
    (64, 64, 128, dense.Requant(-40, -300, 500, "int16", lut_size=301, lut_offset=-50,
                                lut_dtype="int8")),  # 2 x 2 tiles, a lookup table
    (20, 40, 64, dense.Requant(-3000, -32768, 32767, "int16",
                               gate=dense.Gate("uint8", 0, 255))),  # an integer gate
]


def _dense_case(case, rng):
    m, n, k, rq = case
    a = rng.integers(0, 256, (m, k), dtype=np.uint8)
    w = rng.integers(-128, 128, (n, k), dtype=np.int8)
    a[0], w[0] = 255, -128
    acc = (a.astype(np.int64) @ w.T.astype(np.int64)).astype(np.int32)
    _, nb = damx.amx_dense_tiles(m, n)
    args = [a, damx.pack_weight_amx(w, "NK", nb)]
    if rq is None:
        return args, acc
    bias, m0, sh, table = _epilogue_operands(rng, n, rq)
    args += [bias, m0, sh] + ([table] if table is not None else [])
    return args, dense.epilogue_reference(acc, bias, m0, sh, rq, axis=1, lut=table)


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "{}x{}x{}".format(*c[:3]))
def test_dense_exact_emulated(case):
    m, n, k, rq = case
    args, ref = _dense_case(case, np.random.default_rng())
    before = emu.counts.get("tdpbusd", 0)
    ex = damx.build_int8_dense_amx(m, n, k, bias=rq is not None, requant=rq,
                                   backend="emulate")
    np.testing.assert_array_equal(_run(ex, args, ref.shape, ref.dtype), ref)
    mb, nb = damx.amx_dense_tiles(m, n)
    blocks = -(-m // (16 * mb)) * -(-n // (16 * nb))
    assert emu.counts["tdpbusd"] - before == blocks * mb * nb * -(-k // 64)


def test_dense_asm_is_amx():
    m, n, k, rq = DENSE_CASES[3]
    ops = _amx_instructions(damx.build_int8_dense_amx(m, n, k, bias=True, requant=rq))
    assert ops["tdpbusd"] == 2 * 2 * 2 and ops["ldtilecfg"] == 1 and ops["tilestored"] == 4


@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "{}x{}x{}".format(*c[:3]))
def test_dense_exact_on_amx(case):
    _need_amx()
    m, n, k, rq = case
    args, ref = _dense_case(case, np.random.default_rng())
    ex = damx.build_int8_dense_amx(m, n, k, bias=rq is not None, requant=rq)
    np.testing.assert_array_equal(_run(ex, args, ref.shape, ref.dtype), ref)


# ---------------------------------------------------------------------------------------------
# in the graph
# ---------------------------------------------------------------------------------------------
def test_amx_targets_and_pipeline():
    assert target_isa(resolve_target("x86-amx")) == "amx"
    assert target_isa(resolve_target("x86-vnni")) == "avx512_vnni"
    phases = fusion_phases(resolve_target("x86-amx"))
    assert any(getattr(p, "isa", None) == "amx" for p in phases)
    with pytest.raises(ValueError, match="amx_backend"):
        DispatchX86Int8(isa="amx", amx_backend="simulate")


def _packed_ndims(mod):
    return sorted(const_value(b.value.args[1].fields[1]).ndim
                  for b in mod["main"].body.blocks[0].bindings
                  if getattr(getattr(b.value, "op", None), "name", "") == "relax.call_tir")


@pytest.mark.parametrize("c,o,width,stride,on_amx", [
    (64, 24, 40, 1, True),
    (8, 24, 40, 1, False),  # 8 of a tile's 64 channels deep: the VNNI kernels
    (64, 24, 40, 2, False),  # stride 2: the VNNI kernels
])
def test_dispatch_picks_amx_and_stays_exact(c, o, width, stride, on_amx):
    mod = conv_requant_chain(c, o, width, stride, shift=41)
    after = DispatchX86Int8(isa="amx", amx_backend="emulate")(mod)
    relax.analysis.well_formed(after)
    assert _packed_ndims(after) == [5 if on_amx else 3 if stride == 1 else 4]
    target = dense.default_target()
    before = emu.counts.get("tdpbsud", 0)
    _need_avx512_vnni()
    vm_a = relax.VirtualMachine(tvm.compile(after, target), tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng().integers(0, 256, (1, c, 6, width))
                           .astype("uint8"))
    np.testing.assert_array_equal(vm_a["main"](x).numpy(), vm_b["main"](x).numpy())
    assert (emu.counts.get("tdpbsud", 0) > before) == on_amx




def test_dispatch_puts_a_matmul_on_amx_and_stays_exact():
    rng = np.random.default_rng(5)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((40, 120), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.matmul(x, relax.const(rng.integers(
                -127, 128, (120, 96)).astype("int8")), out_dtype="int32"))
            y = bb.emit(relax.op.add(y, relax.const(
                rng.integers(-9999, 9999, (96,)).astype("int32"))))
            out = bb.emit_output(emit_requant(bb, y, rng, 96, shift=41, zero_point=-3,
                                              dtype="int8", shape=(96,)))
        bb.emit_func_output(out)
    mod = bb.get()
    after = DispatchX86Int8(isa="amx", amx_backend="emulate")(mod)
    assert list(_amx_layers(after)) == [(0, 1)]
    target = dense.default_target()
    _need_avx512_vnni()
    vm_a = relax.VirtualMachine(tvm.compile(after, target), tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    a = tvm.runtime.tensor(rng.integers(0, 256, (40, 120)).astype("uint8"))
    np.testing.assert_array_equal(vm_a["main"](a).numpy(), vm_b["main"](a).numpy())


def _amx_layers(mod) -> tuple[int, int]:
    """(convs, matmuls) whose kernels multiply on AMX tiles (``tdpbsud``, ``tdpbusd``)."""
    kinds = {}
    for b in mod["main"].body.blocks[0].bindings:
        if getattr(getattr(b.value, "op", None), "name", "") == "relax.call_tir":
            gv = b.value.args[0]
            if gv not in kinds:
                text = mod[gv].script()
                kinds[gv] = (0, 1) if "tdpbusd" in text else (1, 0) if "tdpbsud" in text \
                    else (0, 0)
            yield kinds[gv]


@pytest.mark.parametrize("kind,layers", [
    ("cls", (13, 0)),
    pytest.param("det", (26, 0), marks=pytest.mark.slow),
    pytest.param("rec", (17, 9), marks=pytest.mark.slow),
])
def test_ppocr_on_emulated_amx_equals_vnni_build(kind, layers):
    """A real PP-OCR model, calibrated on its real data, built for an AMX CPU with the AMX
    instructions emulated: as many of its convs and matmuls as expected go on AMX (rec's
    SVTR matmuls), and its outputs on a real input equal the AVX-512 VNNI build's bit for
    bit."""
    from tvmquant import datasets
    from tvmquant.frontend import load_onnx
    from tvmquant.zoo import PPOCR_INPUT_SHAPES, ppocr_model_path

    mod, _, _ = load_onnx(ppocr_model_path(kind), PPOCR_INPUT_SHAPES[kind])
    q = tvmquant.quantize(mod, datasets.calibration_samples(kind, 4), "int8", progress=False)
    on_amx = DispatchX86Int8(isa="amx", amx_backend="emulate")(q.mod)
    assert tuple(map(sum, zip(*_amx_layers(on_amx)))) == layers
    x = tvm.runtime.tensor(datasets.model_inputs(kind, n=1)[0])
    target = dense.default_target()
    _need_avx512_vnni()
    got = relax.VirtualMachine(tvm.compile(on_amx, target), tvm.cpu())["main"](x).numpy()
    vnni = DispatchX86Int8()(q.mod)
    want = relax.VirtualMachine(tvm.compile(vnni, target), tvm.cpu())["main"](x).numpy()
    np.testing.assert_array_equal(got, want)


def test_amx_permission_matches_the_cpu():
    """Linux grants the tile state where the CPU has AMX; elsewhere the request says no
    without asking."""
    if not cpu_has_amx():
        assert request_amx_permission() is False
        return
    if not request_amx_permission():
        pytest.skip("this CPU has AMX but Linux refused the tile state (a kernel before 5.16?)")


def test_building_for_an_amx_cpu_here_warns():
    if cpu_has_amx():
        pytest.skip("this CPU has AMX: an AMX build runs here")
    from tvmquant.testing import random_inputs, small_convnet

    q = tvmquant.quantize(small_convnet(), random_inputs(2), "int8", progress=False)
    with pytest.warns(UserWarning, match="amx-int8"):
        tvmquant.build(q, "x86-amx")
