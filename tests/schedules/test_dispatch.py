"""DispatchX86Int8: integer-only graphs onto the VNNI kernels, bit-exact with the default ones."""

from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax

import tvmquant
from tvmquant.schedules.x86.dispatch import DispatchX86Int8, target_has_vnni
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
