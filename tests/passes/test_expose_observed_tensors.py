"""ExposeObservedTensors (structure, values) and the registered "tvmquant" build pipeline."""

import numpy as np
import tvm
from helpers import run_module, run_pass
from tvm import relax
from tvmquant.passes import ExposeObservedTensors, InsertFakeQuant
from tvmquant.passes.expose_observed_tensors import OBSERVED_ATTR

from tvmquant.config import get_preset

RNG = np.random.default_rng(0)
W0 = RNG.normal(0, 0.3, (4, 3, 3, 3)).astype("float32")
W1 = RNG.normal(0, 0.3, (4, 4, 1, 1)).astype("float32")


def _before():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(W0), padding=1))
            r = bb.emit(relax.op.nn.relu(c))
            o = bb.emit_output(relax.op.nn.conv2d(r, relax.const(W1)))
        bb.emit_func_output(o)
    return bb.get()


def _expected():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        c = bb.emit(relax.op.nn.conv2d(x, relax.const(W0), padding=1))
        r = bb.emit(relax.op.nn.relu(c))
        o = bb.emit(relax.op.nn.conv2d(r, relax.const(W1)))
        bb.emit_func_output(relax.Tuple([o, x, r]))
    mod = bb.get()
    mod["main"] = mod["main"].with_attr(OBSERVED_ATTR, ["x", "conv2d_0"])
    return mod


def test_structure_observed_tensors_become_outputs():
    after = run_pass(ExposeObservedTensors(get_preset("int8")), _before())
    tvm.ir.assert_structural_equal(after, _expected())


def test_observed_values_are_the_float_tensors():
    after = ExposeObservedTensors(get_preset("int8"))(_before())
    x = RNG.normal(0, 1, (1, 3, 8, 8)).astype("float32")
    ex = tvm.compile(after, tvm.target.Target({"kind": "llvm"}))
    out, xin, relu = (t.numpy() for t in relax.VirtualMachine(ex, tvm.cpu())["main"](
        tvm.runtime.tensor(x)))
    np.testing.assert_array_equal(xin, x)
    assert relu.min() >= 0 and relu.shape == (1, 4, 8, 8)
    np.testing.assert_allclose(out, run_module(_before(), x), rtol=1e-5, atol=1e-5)


def test_skipped_layers_are_not_observed():
    config = get_preset("int8")
    from dataclasses import replace

    after = ExposeObservedTensors(replace(config, skip=("conv2d_0",)))(_before())
    assert [str(n) for n in after["main"].attrs[OBSERVED_ATTR]] == []


def test_registered_pipeline_lowers_and_builds():
    ranges = {"x": (-1.0, 1.0), "conv2d_0": (0.0, 3.0)}
    fq = InsertFakeQuant(get_preset("int8"), ranges)(_before())
    ex = tvm.compile(fq, tvm.target.Target({"kind": "llvm"}), relax_pipeline="tvmquant")
    x = RNG.uniform(-1, 1, (1, 3, 8, 8)).astype("float32")
    got = relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    ref = run_module(fq, x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02
