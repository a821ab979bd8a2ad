"""DispatchX86Int8: integer-only graphs onto the VNNI kernels, bit-exact with the default ones."""

from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvmquant.schedules.x86.dispatch import DispatchX86Int8, target_has_vnni

import tvmquant
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
    # conv2d_0 and conv2d_1 (regular, requantized) go to the kernels; the depthwise conv and
    # the final dense (float output: no requantization to fuse) stay on the defaults.
    assert _call_tir_count(after) == 2
    text = after["main"].script()
    assert text.count("R.nn.conv2d") == 1 and "groups=8" in text
    assert text.count("R.matmul") == 1
    assert "R.right_shift" in text  # only the depthwise conv's requantization remains


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


def _upsample_head(o: int, requant_dtype: str):
    """conv2d_transpose(k=2, s=2) + dyadic requantization, as LowerToIntegerOnly writes it."""
    rng = np.random.default_rng(o)
    lo, hi = (0, 255) if requant_dtype == "uint8" else (-32768, 32767)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 24, 9, 13), "uint8"))
    w = rng.integers(-127, 128, (24, o, 2, 2)).astype("int8")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d_transpose(x, relax.const(w), strides=2,
                                                     out_dtype="int32"))
            y = bb.emit(relax.op.add(y, relax.const(
                rng.integers(-9999, 9999, (1, o, 1, 1)).astype("int32"))))
            y = bb.emit(relax.op.astype(y, "int64"))
            y = bb.emit(relax.op.multiply(y, relax.const(
                rng.integers(2**30, 2**31, (1, o, 1, 1)), "int64")))
            y = bb.emit(relax.op.add(y, relax.const(1 << 39, "int64")))
            y = bb.emit(relax.op.right_shift(y, relax.const(40, "int64")))
            y = bb.emit(relax.op.add(y, relax.const(5, "int64")))
            y = bb.emit(relax.op.clip(y, lo, hi))
            out = bb.emit_output(bb.emit(relax.op.astype(y, requant_dtype)))
        bb.emit_func_output(out)
    return bb.get()


@pytest.mark.parametrize("o,dtype", [(24, "uint8"), (1, "int16"), (5, "uint8")])
def test_upsampling_conv_transpose_runs_as_one_matmul(o, dtype):
    mod = _upsample_head(o, dtype)
    after = DispatchX86Int8()(mod)
    relax.analysis.well_formed(after)
    text = after["main"].script()
    assert "conv2d_transpose" not in text and _call_tir_count(after) == 1
    assert "R.permute_dims" in text  # the depth-to-space after the matmul
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
