"""FuseLayerNorm: decomposed layer normalization back to R.nn.layer_norm."""

import numpy as np
import tvm
from helpers import run_module, run_pass
from tvm import relax
from tvmquant.passes.fuse_layer_norm import FuseLayerNorm

RNG = np.random.default_rng(0)
GAMMA = RNG.uniform(0.5, 1.5, 8).astype("float32")
BETA = RNG.normal(0, 0.1, 8).astype("float32")


def _decomposed(square="power", affine=True, extra_use=False):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 5, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            m = bb.emit(relax.op.mean(x, axis=[-1], keepdims=True))
            d = bb.emit(relax.op.subtract(x, m))
            if square == "power":
                p = bb.emit(relax.op.power(d, relax.const(2.0, "float32")))
            else:
                p = bb.emit(relax.op.multiply(d, d))
            v = bb.emit(relax.op.mean(p, axis=[-1], keepdims=True))
            e = bb.emit(relax.op.add(v, relax.const(1e-5, "float32")))
            s = bb.emit(relax.op.sqrt(e))
            y = bb.emit(relax.op.divide(d, s))
            if affine:
                y = bb.emit(relax.op.multiply(y, relax.const(GAMMA)))
                y = bb.emit(relax.op.add(y, relax.const(BETA)))
            if extra_use:
                y = bb.emit(relax.op.add(y, s))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _expected(affine=True):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 5, 8), "float32"))
    gamma = GAMMA if affine else np.ones(8, "float32")
    beta = BETA if affine else np.zeros(8, "float32")
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.layer_norm(x, relax.const(gamma), relax.const(beta),
                                               axes=[-1], epsilon=float(np.float32(1e-5))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def test_structure_power_form_with_affine():
    after = run_pass(FuseLayerNorm(), _decomposed())
    tvm.ir.assert_structural_equal(after, _expected())


def test_structure_multiply_form_without_affine():
    after = run_pass(FuseLayerNorm(), _decomposed("multiply", affine=False))
    tvm.ir.assert_structural_equal(after, _expected(affine=False))


def test_leaves_alone_when_statistics_have_other_users():
    before = _decomposed(extra_use=True)
    after = run_pass(FuseLayerNorm(), before)
    tvm.ir.assert_structural_equal(after, before)


def test_numerics_match():
    x = RNG.normal(0, 3, (2, 5, 8)).astype("float32")
    np.testing.assert_allclose(run_module(FuseLayerNorm()(_decomposed()), x),
                               run_module(_decomposed(), x), rtol=1e-4, atol=1e-5)
