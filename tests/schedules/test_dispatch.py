"""DispatchX86Int8: integer-only graphs onto the VNNI kernels, bit-exact with the default ones."""

import re
from pathlib import Path

import numpy as np
import pytest
import tvm
from helpers import emit_requant, one_input_module
from tvm import relax
from tvmquant.schedules.pipeline import fusion_phases
from tvmquant.schedules.x86.dispatch import DispatchX86Int8, target_has_vnni, target_isa

import tvmquant
from tvmquant._compat import const_value
from tvmquant.testing import random_inputs, small_convnet

TARGET = tvm.target.Target({"kind": "llvm", "mcpu": "cascadelake", "num-cores": 2})


def _cpu_has_vnni() -> bool:
    try:
        return "avx512_vnni" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def quantized():
    return tvmquant.quantize(small_convnet(), random_inputs(4), "int8", progress=False)


def _call_tir_count(mod):
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.call_tir":
            calls.append(e)

    relax.analysis.post_order_visit(mod["main"], visit)
    return len(calls)


def test_structure_regular_convs_and_dense_are_dispatched(quantized):
    after = DispatchX86Int8()(quantized.mod)
    relax.analysis.well_formed(after)
    # conv2d_0, conv2d_1 (regular) and the depthwise conv, requantized, go to the kernels;
    # so does the final dense, whose int32 sum (and bias) the graph then dequantizes
    assert _call_tir_count(after) == 4
    text = after["main"].script()
    assert "R.nn.conv2d" not in text and "R.matmul" not in text
    assert text.count("R.right_shift") == 2  # the residual add's and the mean's remain
    tail = text[text.index("R.call_tir", text.rindex("R.right_shift")):]
    assert 'R.Tensor((1, 4), dtype="int32")' in tail and 'dtype="float32"' in tail


def test_leaves_alone_float_module():
    mod = small_convnet()
    assert DispatchX86Int8()(mod).same_as(mod)


def test_target_feature_check():
    assert target_has_vnni(TARGET)
    assert not target_has_vnni(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))


def test_dispatched_module_is_bit_exact(quantized):
    if not _cpu_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni not in /proc/cpuinfo)")
    after = DispatchX86Int8()(quantized.mod)
    vm_a = relax.VirtualMachine(tvm.compile(after, TARGET), tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(quantized.mod, TARGET), tvm.cpu())
    for sample in random_inputs(3, seed=21):
        x = tvm.runtime.tensor(sample["x"])
        np.testing.assert_array_equal(vm_a["main"](x).numpy(), vm_b["main"](x).numpy())


AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell", "num-cores": 2})


def test_avx2_target_dispatches_regular_convs_and_dense(quantized):
    """On an AVX2-only CPU the regular and depthwise convs and the dense run on the
    kernels' exact AVX2 form."""
    assert target_isa(TARGET) == "avx512_vnni" and target_isa(AVX2) == "avx2"
    assert target_isa(tvm.target.Target({"kind": "llvm", "mcpu": "core2"})) is None
    phases = fusion_phases(AVX2)
    assert any(getattr(p, "isa", None) == "avx2" for p in phases)
    after = DispatchX86Int8(isa="avx2")(quantized.mod)
    relax.analysis.well_formed(after)
    assert _call_tir_count(after) == 4
    assert after["main"].script().count("R.nn.conv2d") == 0  # the depthwise one too
    with pytest.raises(ValueError, match="isa"):
        DispatchX86Int8(isa="avx512")
    ex = tvm.compile(after, AVX2)
    asm = ex.mod.imports[0].inspect_source("asm")
    assert "vpmaddwd" in asm
    assert "vpdpbusd" not in asm and "zmm" not in asm
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX2 (avx2 not in /proc/cpuinfo)")
    vm_a = relax.VirtualMachine(ex, tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(quantized.mod, AVX2), tvm.cpu())
    for sample in random_inputs(3, seed=22):
        x = tvm.runtime.tensor(sample["x"])
        np.testing.assert_array_equal(vm_a["main"](x).numpy(), vm_b["main"](x).numpy())


def _padded_conv_with_table(lut_dtype: str = "uint8", shared_pad: bool = False,
                            depthwise: bool = False):
    """pad(zero point) -> conv2d -> requantize to int16 -> 16-bit lookup table,
    as LowerToIntegerOnly writes a convolution followed by hard-swish."""
    rng = np.random.default_rng(11)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 12, 11, 14), "uint8"))
    info = np.iinfo(lut_dtype)
    table = rng.integers(info.min, int(info.max) + 1, 65536).astype(lut_dtype)
    with bb.function("main", [x]):
        with bb.dataflow():
            p = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 1, 1, 2, 0], pad_value=131.0))
            if depthwise:
                y = bb.emit(relax.op.nn.conv2d(p, relax.const(rng.integers(
                    -127, 128, (12, 1, 3, 3)).astype("int8")), strides=(1, 2), groups=12,
                    out_dtype="int32"))
            else:
                y = bb.emit(relax.op.nn.conv2d(p, relax.const(rng.integers(
                    -127, 128, (20, 12, 3, 3)).astype("int8")), out_dtype="int32"))
            o = 12 if depthwise else 20
            y = bb.emit(relax.op.add(y, relax.const(
                rng.integers(-9999, 9999, (1, o, 1, 1)).astype("int32"))))
            y = bb.emit(relax.op.astype(y, "int64"))
            y = bb.emit(relax.op.multiply(y, relax.const(
                rng.integers(2**30, 2**31, (1, o, 1, 1)), "int64")))
            y = bb.emit(relax.op.add(y, relax.const(1 << 32, "int64")))
            y = bb.emit(relax.op.right_shift(y, relax.const(33, "int64")))
            y = bb.emit(relax.op.add(y, relax.const(-1000, "int64")))
            y = bb.emit(relax.op.clip(y, -32768, 32767))
            y = bb.emit(relax.op.astype(y, "int16"))
            y = bb.emit(relax.op.astype(y, "int32"))
            y = bb.emit(relax.op.subtract(y, relax.const(-32768, "int32")))
            y = bb.emit(relax.op.take(relax.const(table), y, axis=0, mode="clip"))
            out = bb.emit_output(relax.Tuple([y, p]) if shared_pad else y)
        bb.emit_func_output(out)
    return bb.get()


def _assert_same_on_fresh_inputs(after, before, shape):
    """The dispatched module computes what the original computes, on fresh uint8 inputs."""
    if not _cpu_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni not in /proc/cpuinfo)")
    vm_a = relax.VirtualMachine(tvm.compile(after, TARGET), tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(before, TARGET), tvm.cpu())
    for _ in range(2):
        x = tvm.runtime.tensor(np.random.default_rng().integers(0, 256, shape).astype("uint8"))
        np.testing.assert_array_equal(vm_a["main"](x).numpy(), vm_b["main"](x).numpy())


@pytest.mark.parametrize("lut_dtype", ["uint8", "int8"])
def test_pad_and_lookup_table_join_the_kernel(lut_dtype):
    mod = _padded_conv_with_table(lut_dtype)
    after = DispatchX86Int8()(mod)
    relax.analysis.well_formed(after)
    text = after["main"].script()
    assert _call_tir_count(after) == 1
    for gone in ("R.nn.pad", "R.take", "R.nn.conv2d", "R.subtract", "int16"):
        assert gone not in text, gone
    call = next(b.value for b in after["main"].body.blocks[0].bindings
                if getattr(b.value.op, "name", "") == "relax.call_tir")
    x, _w, _b, _m0, _sh, table = call.args[1].fields
    assert x.same_as(after["main"].params[0])  # the unpadded input
    assert const_value(table).shape == (65536,)
    assert str(call.ty.dtype) == lut_dtype
    _assert_same_on_fresh_inputs(after, mod, (1, 12, 11, 14))


@pytest.mark.parametrize("lut_dtype", ["uint8", "int8"])
def test_depthwise_conv_joins_its_kernel_with_pad_and_table(lut_dtype):
    """A depthwise conv (stride 1 x 2) with its requantization and table is one call of the
    depthwise kernel; its zero-point pad, widened by the rows and columns the kernel reads
    past it, is the one pad left."""
    mod = _padded_conv_with_table(lut_dtype, depthwise=True)
    after = DispatchX86Int8()(mod)
    relax.analysis.well_formed(after)
    text = after["main"].script()
    assert _call_tir_count(after) == 1
    for gone in ("R.take", "R.nn.conv2d", "R.subtract", "int16"):
        assert gone not in text, gone
    bindings = after["main"].body.blocks[0].bindings
    pad = next(b for b in bindings if getattr(b.value.op, "name", "") == "relax.nn.pad")
    call = next(b.value for b in bindings if getattr(b.value.op, "name", "") == "relax.call_tir")
    assert pad.value.args[0].same_as(after["main"].params[0])
    assert call.args[1].fields[0].same_as(pad.var)
    # 11x14 padded (1, 1) rows and (2, 0) columns is 13x16; output 11x7: one vector of 16
    # pixels at stride 2 and a group of 4 kernel columns read 34 columns, 1 row more below
    # keeps the last 64-byte load inside the buffer
    assert [int(v) for v in pad.value.attrs.pad_width] == [0, 0, 0, 0, 1, 2, 2, 18]
    assert float(pad.value.attrs.pad_value) == 131.0
    assert str(call.ty.dtype) == lut_dtype
    _assert_same_on_fresh_inputs(after, mod, (1, 12, 11, 14))


def test_a_shared_pad_stays_for_its_other_users():
    """The kernel pads for itself; a pad that something else reads too is still computed."""
    after = DispatchX86Int8()(_padded_conv_with_table(shared_pad=True))
    text = after["main"].script()
    assert _call_tir_count(after) == 1 and "R.nn.conv2d" not in text
    assert text.count("R.nn.pad") == 1


def _upsample_head(o: int, requant_dtype: str):
    """conv2d_transpose(k=2, s=2) + dyadic requantization, as LowerToIntegerOnly writes it."""
    rng = np.random.default_rng(o)
    w = rng.integers(-127, 128, (24, o, 2, 2)).astype("int8")

    def body(bb, x):
        y = bb.emit(relax.op.nn.conv2d_transpose(x, relax.const(w), strides=2,
                                                 out_dtype="int32"))
        y = bb.emit(relax.op.add(y, relax.const(
            rng.integers(-9999, 9999, (1, o, 1, 1)).astype("int32"))))
        return emit_requant(bb, y, rng, o, shift=40, zero_point=5, dtype=requant_dtype)

    return one_input_module(body, (1, 24, 9, 13), "uint8")


@pytest.mark.parametrize("o,dtype", [(24, "uint8"), (1, "int16"), (5, "uint8")])
def test_upsampling_conv_transpose_runs_as_one_1x1_conv(o, dtype):
    mod = _upsample_head(o, dtype)
    after = DispatchX86Int8()(mod)
    relax.analysis.well_formed(after)
    text = after["main"].script()
    assert "conv2d_transpose" not in text and _call_tir_count(after) == 1
    assert "R.permute_dims" in text  # the depth-to-space after the conv
    assert text.count("R.permute_dims") == 1  # and no transpose of the input before it
    if not _cpu_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni not in /proc/cpuinfo)")
    vm_a = relax.VirtualMachine(tvm.compile(after, TARGET), tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    x = tvm.runtime.tensor(np.random.default_rng().integers(0, 256, (1, 24, 9, 13))
                           .astype("uint8"))
    got, want = vm_a["main"](x).numpy(), vm_b["main"](x).numpy()
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, want)


def test_overlapping_conv_transpose_is_left_alone():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 5, 5), "uint8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d_transpose(
                x, relax.const(np.ones((4, 4, 3, 3), "int8")), strides=2, out_dtype="int32"))
            y = bb.emit(relax.op.astype(y, "int64"))
            y = bb.emit(relax.op.right_shift(relax.op.add(relax.op.multiply(
                y, relax.const(1 << 30, "int64")), relax.const(1 << 39, "int64")),
                relax.const(40, "int64")))
            y = bb.emit(relax.op.astype(relax.op.clip(relax.op.add(
                y, relax.const(0, "int64")), 0, 255), "uint8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    mod = bb.get()
    assert "conv2d_transpose" in DispatchX86Int8()(mod)["main"].script()


def _grouped_chain(groups: int, c: int, o: int, table: bool):
    """pad(zero point) -> grouped conv2d -> requantization (to uint8, or to int16 and a
    lookup table), as LowerToIntegerOnly writes them."""
    rng = np.random.default_rng(groups)

    def body(bb, x):
        p = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, 1, 1, 1, 1], pad_value=17.0))
        y = bb.emit(relax.op.nn.conv2d(p, relax.const(rng.integers(
            -127, 128, (o, c // groups, 3, 3)).astype("int8")), groups=groups,
            out_dtype="int32"))
        y = bb.emit(relax.op.add(y, relax.const(
            rng.integers(-9999, 9999, (1, o, 1, 1)).astype("int32"))))
        y = emit_requant(bb, y, rng, o, shift=37, zero_point=-5 if table else 7,
                         dtype="int16" if table else "uint8")
        if table:
            y = bb.emit(relax.op.astype(y, "int32"))
            y = bb.emit(relax.op.subtract(y, relax.const(-32768, "int32")))
            y = bb.emit(relax.op.take(relax.const(rng.integers(
                0, 256, 65536).astype("uint8")), y, axis=0, mode="clip"))
        return y

    return one_input_module(body, (1, c, 9, 13), "uint8")


@pytest.mark.parametrize("groups,c,o,table", [(2, 16, 24, False), (4, 32, 8, True)])
def test_grouped_conv_runs_per_group_on_the_kernel(groups, c, o, table):
    mod = _grouped_chain(groups, c, o, table)
    after = DispatchX86Int8()(mod)
    relax.analysis.well_formed(after)
    text = after["main"].script()
    assert _call_tir_count(after) == groups and "R.concat" in text
    assert "R.nn.conv2d" not in text and "R.take" not in text and "R.nn.pad" not in text
    assert len([gv for gv in after.get_global_vars() if gv.name_hint != "main"]) == 1
    if not _cpu_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni not in /proc/cpuinfo)")
    vm_a = relax.VirtualMachine(tvm.compile(after, TARGET), tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    for seed in (1, 2):
        x = tvm.runtime.tensor(np.random.default_rng(seed).integers(0, 256, (1, c, 9, 13))
                               .astype("uint8"))
        np.testing.assert_array_equal(vm_a["main"](x).numpy(), vm_b["main"](x).numpy())


@pytest.mark.parametrize("groups,c,on_kernels", [
    (4, 8, True),  # few groups: on the kernels whatever their size
    (8, 64, False),  # 8 groups of 8 channels: per-group calls cost more than they save
    (8, 128, True),  # 8 groups of 16
    (64, 1024, False),  # too many groups
])
def test_grouped_conv_choice(groups, c, on_kernels):
    after = DispatchX86Int8()(_grouped_chain(groups, c, c, False))
    assert ("R.nn.conv2d" not in after["main"].script()) == on_kernels
    assert _call_tir_count(after) == (groups if on_kernels else 0)


def _hswish_convnet():
    """conv 3x3 (8 -> 24 on rows of 80: the pixel-lane kernel) -> hard-swish -> depthwise
    3x3 at stride 2 -> hard-swish -> conv 1x1 (24 -> 32 on rows of 40: the channel-lane
    kernel) -> hard-swish -> conv 1x1 (a float output), in float."""
    rng = np.random.default_rng(5)

    def conv(bb, y, o, c, k, **kw):
        w = rng.normal(0, 2 / np.sqrt(c * k * k), (o, c, k, k)).astype("float32")
        y = bb.emit(relax.op.nn.conv2d(y, relax.const(w), **kw))
        return bb.emit(relax.op.add(y, relax.const(
            rng.normal(0, 0.3, (1, o, 1, 1)).astype("float32"))))

    def hswish(bb, y):
        h = bb.emit(relax.op.add(y, relax.const(3.0)))
        h = bb.emit(relax.op.clip(h, 0, 6))
        h = bb.emit(relax.op.divide(h, relax.const(6.0)))
        return bb.emit(relax.op.multiply(y, h))

    def body(bb, x):
        y = hswish(bb, conv(bb, x, 24, 8, 3, padding=1))
        y = hswish(bb, conv(bb, y, 24, 1, 3, padding=1, strides=(2, 2), groups=24))
        y = hswish(bb, conv(bb, y, 32, 24, 1))
        return conv(bb, y, 16, 32, 1)

    return one_input_module(body, (1, 8, 10, 80))


def test_integer_hard_swish_joins_each_kernel():
    """A float model's hard-swishes, lowered to integer gates, run in the epilogues of the
    pixel-lane, depthwise and channel-lane kernels, bit-exact with the default kernels."""
    samples = [{"x": np.random.default_rng(s).normal(0, 1, (1, 8, 10, 80)).astype("float32")}
               for s in range(4)]
    q = tvmquant.quantize(_hswish_convnet(), samples, "int8", progress=False)
    lowered = q.mod["main"].script()
    assert "R.take" not in lowered and len(re.findall(r'astype\([^)]*"int16"', lowered)) == 3
    after = DispatchX86Int8()(q.mod)
    relax.analysis.well_formed(after)
    text = after["main"].script()
    assert _call_tir_count(after) == 4 and "int16" not in text and "R.clip" not in text
    kernels = {gv.name_hint: after[gv] for gv in after.get_global_vars()
               if gv.name_hint != "main"}
    gates = [f for f in kernels.values() if any(p.name == "gate" for p in f.params)]
    assert len(gates) == 3
    if not _cpu_has_vnni():
        pytest.skip("this CPU has no AVX-512 VNNI (avx512_vnni not in /proc/cpuinfo)")
    vm_a = relax.VirtualMachine(tvm.compile(after, TARGET), tvm.cpu())
    vm_b = relax.VirtualMachine(tvm.compile(q.mod, TARGET), tvm.cpu())
    for seed in (7, 8):
        x = tvm.runtime.tensor(np.random.default_rng(seed).normal(0, 1.5, (1, 8, 10, 80))
                               .astype("float32"))
        np.testing.assert_array_equal(vm_a["main"](x).numpy(), vm_b["main"](x).numpy())
