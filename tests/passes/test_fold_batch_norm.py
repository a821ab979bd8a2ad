"""Tests of tvmquant.passes.fold_batch_norm.FoldBatchNorm.

Before/Expected modules are built with relax.BlockBuilder (constants written in TVMScript end up
in metadata, which is awkward to author) and compared with tvm.ir.assert_structural_equal.
Expected constants are computed here with the reference formulas in float64:
``s = gamma / sqrt(var + eps)``, ``W' = W * s`` (output-channel axis), ``b' = b * s + (beta -
mean * s)``.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
import tvm.relax.frontend.onnx  # registers relax.frontend.onnx
from tvm import relax
from tvmquant.passes.fold_batch_norm import FoldBatchNorm

EPS = 1e-5
C = 4  # output channels of every convolution here
X_SHAPE = (1, 4, 6, 6)
TARGET = tvm.target.Target({"kind": "llvm"})


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _rng(seed=0):
    return np.random.default_rng(seed)


def bn_params(seed=1, channels=C):
    rng = _rng(seed)
    return {
        "gamma": rng.uniform(0.5, 1.5, channels).astype("float32"),
        "beta": rng.standard_normal(channels).astype("float32"),
        "mean": rng.standard_normal(channels).astype("float32"),
        "var": rng.uniform(0.5, 1.5, channels).astype("float32"),
    }


def conv_weight(groups=1, in_channels=X_SHAPE[1], seed=2):
    return _rng(seed).standard_normal((C, in_channels // groups, 3, 3)).astype("float32")


def bn_scale_shift(p):
    """Reference per-channel scale and shift of an inference batch norm (float64)."""
    s = p["gamma"].astype(np.float64) / np.sqrt(p["var"].astype(np.float64) + EPS)
    t = p["beta"].astype(np.float64) - p["mean"].astype(np.float64) * s
    return s, t


def folded_weight_bias(weight, s, t, bias=None):
    """Reference folded conv weight (OIHW) and bias (1, C, 1, 1)."""
    w = (weight.astype(np.float64) * s.reshape(-1, 1, 1, 1)).astype("float32")
    b = np.zeros(len(s)) if bias is None else bias.astype(np.float64).reshape(-1)
    return w, (b * s + t).astype("float32").reshape(1, -1, 1, 1)


def chan(vec):
    """A per-channel vector as an NCHW-broadcastable (1, C, 1, 1) float32 array."""
    return np.asarray(vec).astype("float32").reshape(1, -1, 1, 1)


def make_module(body, x_shape=X_SHAPE, extra_params=(), dataflow=True):
    """A module ``main(x, *extra_params)`` whose body is ``body(bb, x, *extra_params)``."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(x_shape, "float32"))
    with bb.function("main", [x, *extra_params]):
        if dataflow:
            with bb.dataflow():
                out = body(bb, x, *extra_params)
                gv = bb.emit_output(out)
        else:
            gv = body(bb, x, *extra_params)
        bb.emit_func_output(gv)
    return bb.get()


def emit_conv(bb, x, weight, groups=1):
    w = weight if isinstance(weight, relax.Expr) else relax.const(weight)
    return bb.emit(relax.op.nn.conv2d(x, w, padding=(1, 1), groups=groups))


def emit_bn(bb, y, p, training=False, index=0, axis=1):
    args = [relax.const(p[k]) for k in ("gamma", "beta", "mean", "var")]
    bn = bb.emit(relax.op.nn.batch_norm(y, *args, axis=axis, epsilon=EPS, training=training))
    return bb.emit(relax.TupleGetItem(bn, index))


def emit_affine(bb, y, scale, shift):
    m = bb.emit(relax.op.multiply(y, relax.const(scale)))
    return bb.emit(relax.op.add(m, relax.const(shift)))


def run_pass(mod):
    relax.analysis.well_formed(mod)
    after = FoldBatchNorm()(mod)
    relax.analysis.well_formed(after)
    return after


def assert_unchanged(mod):
    after = run_pass(mod)
    tvm.ir.assert_structural_equal(after, mod)


def ops_in(mod):
    """Names of the operators called in ``main``."""
    names = []

    @relax.expr_functor.visitor
    class _Collect(relax.expr_functor.PyExprVisitor):
        def visit_call_(self, op):
            if isinstance(op.op, tvm.ir.Op):
                names.append(op.op.name)
            super().visit_call_(op)

    _Collect().visit_expr(mod["main"])
    return names


def run_module(mod, *inputs):
    ex = tvm.compile(mod, TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*(tvm.runtime.tensor(a) for a in inputs)).numpy()


# ---------------------------------------------------------------------------------------------
# Structural tests: what is folded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 4], ids=["regular", "grouped", "depthwise"])
def test_conv_bn_folds_into_conv(groups):
    weight, p = conv_weight(groups), bn_params()

    def before(bb, x):
        return emit_bn(bb, emit_conv(bb, x, weight, groups), p)

    w, b = folded_weight_bias(weight, *bn_scale_shift(p))

    def expected(bb, x):
        return bb.emit(relax.op.add(emit_conv(bb, x, w, groups), relax.const(b)))

    after = run_pass(make_module(before))
    tvm.ir.assert_structural_equal(after, make_module(expected))
    assert b.shape == (1, C, 1, 1)


@pytest.mark.parametrize("bias_first", [False, True], ids=["conv+bias", "bias+conv"])
def test_conv_bias_bn_folds_into_conv(bias_first):
    weight, p = conv_weight(), bn_params()
    bias = _rng(3).standard_normal((1, C, 1, 1)).astype("float32")

    def before(bb, x):
        y = emit_conv(bb, x, weight)
        args = (relax.const(bias), y) if bias_first else (y, relax.const(bias))
        return emit_bn(bb, bb.emit(relax.op.add(*args)), p)

    w, b = folded_weight_bias(weight, *bn_scale_shift(p), bias=bias)

    def expected(bb, x):
        return bb.emit(relax.op.add(emit_conv(bb, x, w), relax.const(b)))

    tvm.ir.assert_structural_equal(run_pass(make_module(before)), make_module(expected))


def test_conv_reshaped_bias_bn_folds_into_conv():
    """ONNX imports a Conv bias as add(conv, reshape(const)); that folds as well."""
    weight, p = conv_weight(), bn_params()
    bias = _rng(3).standard_normal(C).astype("float32")

    def before(bb, x):
        y = emit_conv(bb, x, weight)
        r = bb.emit(relax.op.reshape(relax.const(bias), (1, C, 1, 1)))
        return emit_bn(bb, bb.emit(relax.op.add(y, r)), p)

    w, b = folded_weight_bias(weight, *bn_scale_shift(p), bias=bias)

    def expected(bb, x):
        return bb.emit(relax.op.add(emit_conv(bb, x, w), relax.const(b)))

    tvm.ir.assert_structural_equal(run_pass(make_module(before)), make_module(expected))


def test_bn_moving_stats_outputs_become_constants():
    """Outputs [1] and [2] of an inference BN (dead in ONNX imports) do not keep it alive."""
    weight, p = conv_weight(), bn_params()

    def before(bb, x):
        y = emit_conv(bb, x, weight)
        bn = bb.emit(
            relax.op.nn.batch_norm(
                y, *[relax.const(p[k]) for k in ("gamma", "beta", "mean", "var")],
                axis=1, epsilon=EPS, training=False,
            )
        )
        out = bb.emit(relax.TupleGetItem(bn, 0))
        bb.emit(relax.TupleGetItem(bn, 1))  # unused, as from_onnx leaves them
        var = bb.emit(relax.TupleGetItem(bn, 2))
        return bb.emit(relax.Tuple([out, var]))

    w, b = folded_weight_bias(weight, *bn_scale_shift(p))

    def expected(bb, x):
        out = bb.emit(relax.op.add(emit_conv(bb, x, w), relax.const(b)))
        var = bb.emit(relax.const(p["var"]))
        return bb.emit(relax.Tuple([out, var]))

    after = run_pass(make_module(before))
    tvm.ir.assert_structural_equal(after, make_module(expected))
    assert "relax.nn.batch_norm" not in ops_in(after)


@pytest.mark.parametrize("where", ["graph_input", "after_add"])
def test_separate_bn_becomes_affine(where):
    p = bn_params()
    other = _rng(4).standard_normal(X_SHAPE).astype("float32")

    def producer(bb, x):
        if where == "graph_input":
            return x
        return bb.emit(relax.op.add(x, relax.const(other)))

    def before(bb, x):
        return emit_bn(bb, producer(bb, x), p)

    s, t = bn_scale_shift(p)

    def expected(bb, x):
        return emit_affine(bb, producer(bb, x), chan(s), chan(t))

    tvm.ir.assert_structural_equal(run_pass(make_module(before)), make_module(expected))


def test_separate_bn_on_nhwc_axis():
    """A BN on the last axis gets constants shaped (1, 1, 1, C)."""
    p = bn_params()
    shape = (1, 6, 6, C)

    def before(bb, x):
        return emit_bn(bb, x, p, axis=-1)

    s, t = bn_scale_shift(p)

    def expected(bb, x):
        return emit_affine(
            bb, x, s.astype("float32").reshape(1, 1, 1, C), t.astype("float32").reshape(1, 1, 1, C)
        )

    after = run_pass(make_module(before, x_shape=shape))
    tvm.ir.assert_structural_equal(after, make_module(expected, x_shape=shape))


@pytest.mark.parametrize("with_bias", [False, True], ids=["conv", "conv+bias"])
@pytest.mark.parametrize("groups", [1, 4], ids=["regular", "depthwise"])
def test_explicit_affine_after_conv_folds(with_bias, groups):
    weight = conv_weight(groups)
    rng = _rng(5)
    scale = chan(rng.uniform(0.5, 1.5, C))
    shift = chan(rng.standard_normal(C))
    bias = chan(rng.standard_normal(C))

    def before(bb, x):
        y = emit_conv(bb, x, weight, groups)
        if with_bias:
            y = bb.emit(relax.op.add(y, relax.const(bias)))
        return emit_affine(bb, y, scale, shift)

    w, b = folded_weight_bias(
        weight, scale.astype(np.float64).reshape(-1), shift.astype(np.float64).reshape(-1),
        bias=bias if with_bias else None,
    )

    def expected(bb, x):
        return bb.emit(relax.op.add(emit_conv(bb, x, w, groups), relax.const(b)))

    tvm.ir.assert_structural_equal(run_pass(make_module(before)), make_module(expected))


def test_fold_outside_dataflow_block():
    weight, p = conv_weight(), bn_params()

    def before(bb, x):
        return emit_bn(bb, emit_conv(bb, x, weight), p)

    w, b = folded_weight_bias(weight, *bn_scale_shift(p))

    def expected(bb, x):
        return bb.emit(relax.op.add(emit_conv(bb, x, w), relax.const(b)))

    after = run_pass(make_module(before, dataflow=False))
    tvm.ir.assert_structural_equal(after, make_module(expected, dataflow=False))


def test_idempotent():
    weight, p = conv_weight(), bn_params()

    def before(bb, x):
        y = emit_bn(bb, emit_conv(bb, x, weight), p)
        return emit_bn(bb, bb.emit(relax.op.nn.relu(y)), bn_params(seed=7))

    once = run_pass(make_module(before))
    tvm.ir.assert_structural_equal(run_pass(once), once)


# ---------------------------------------------------------------------------------------------
# Structural tests: what is left alone
# ---------------------------------------------------------------------------------------------


def test_training_mode_bn_unchanged():
    weight, p = conv_weight(), bn_params()

    def before(bb, x):
        return emit_bn(bb, emit_conv(bb, x, weight), p, training=True)

    assert_unchanged(make_module(before))


def test_bn_with_nonconstant_params_unchanged():
    gamma = relax.Var("gamma", relax.TensorType((C,), "float32"))
    p = bn_params()

    def before(bb, x, gamma):
        args = [gamma] + [relax.const(p[k]) for k in ("beta", "mean", "var")]
        bn = bb.emit(relax.op.nn.batch_norm(x, *args, axis=1, epsilon=EPS, training=False))
        return bb.emit(relax.TupleGetItem(bn, 0))

    assert_unchanged(make_module(before, extra_params=[gamma]))


def test_conv_with_nonconstant_weight_keeps_conv():
    """The conv is left alone; its BN (constant parameters) becomes the affine form."""
    wvar = relax.Var("w", relax.TensorType((C, X_SHAPE[1], 3, 3), "float32"))
    p = bn_params()

    def before(bb, x, w):
        return emit_bn(bb, emit_conv(bb, x, w), p)

    s, t = bn_scale_shift(p)

    def expected(bb, x, w):
        return emit_affine(bb, emit_conv(bb, x, w), chan(s), chan(t))

    after = run_pass(make_module(before, extra_params=[wvar]))
    tvm.ir.assert_structural_equal(after, make_module(expected, extra_params=[wvar]))


def test_affine_after_nonconstant_weight_conv_unchanged():
    wvar = relax.Var("w", relax.TensorType((C, X_SHAPE[1], 3, 3), "float32"))

    def before(bb, x, w):
        return emit_affine(bb, emit_conv(bb, x, w), chan(np.full(C, 2.0)), chan(np.ones(C)))

    assert_unchanged(make_module(before, extra_params=[wvar]))


@pytest.mark.parametrize("shared", ["conv", "bias_add"])
def test_bn_after_conv_with_other_users_becomes_affine(shared):
    """Folding would change what the other user sees: the BN is folded separately instead."""
    weight, p = conv_weight(), bn_params()
    bias = chan(_rng(3).standard_normal(C))

    def producer(bb, x):
        y = emit_conv(bb, x, weight)
        z = bb.emit(relax.op.add(y, relax.const(bias)))
        return (y if shared == "conv" else z), z

    def before(bb, x):
        shared_var, z = producer(bb, x)
        out = emit_bn(bb, z, p)
        return bb.emit(relax.Tuple([out, shared_var]))

    s, t = bn_scale_shift(p)

    def expected(bb, x):
        shared_var, z = producer(bb, x)
        out = emit_affine(bb, z, chan(s), chan(t))
        return bb.emit(relax.Tuple([out, shared_var]))

    tvm.ir.assert_structural_equal(run_pass(make_module(before)), make_module(expected))


def test_affine_after_conv_with_other_users_unchanged():
    weight = conv_weight()

    def before(bb, x):
        y = emit_conv(bb, x, weight)
        out = emit_affine(bb, y, chan(np.full(C, 2.0)), chan(np.ones(C)))
        return bb.emit(relax.Tuple([out, y]))

    assert_unchanged(make_module(before))


@pytest.mark.parametrize(
    "scale_shape", [(1, 1, 1, 6), (1, C, 6, 6), (2, C, 1, 1)], ids=["per-column", "full", "batch"]
)
def test_affine_not_per_channel_unchanged(scale_shape):
    """Be conservative: a multiplier that varies along N, H or W cannot go into the weight."""
    weight = conv_weight()
    scale = _rng(6).uniform(0.5, 1.5, scale_shape).astype("float32")

    def before(bb, x):
        return emit_affine(bb, emit_conv(bb, x, weight), scale, chan(np.ones(C)))

    assert_unchanged(make_module(before))


def test_module_without_bn_unchanged():
    weight = conv_weight()

    def before(bb, x):
        return bb.emit(relax.op.nn.relu(emit_conv(bb, x, weight)))

    assert_unchanged(make_module(before))


# ---------------------------------------------------------------------------------------------
# Numeric tests: folded == unfolded
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("groups", [1, 2, 4], ids=["regular", "grouped", "depthwise"])
def test_numeric_equivalence(groups):
    """conv+bias->BN->relu->BN (folded into conv, then separate) and conv->affine, run on llvm."""
    weight, weight2 = conv_weight(groups), conv_weight(groups, seed=8)
    p1, p2 = bn_params(1), bn_params(9)
    bias = chan(_rng(3).standard_normal(C))

    def before(bb, x):
        y = bb.emit(relax.op.add(emit_conv(bb, x, weight, groups), relax.const(bias)))
        y = bb.emit(relax.op.nn.relu(emit_bn(bb, y, p1)))
        y = emit_bn(bb, y, p2)  # after relu: left separate
        y = emit_conv(bb, y, weight2, groups)
        return emit_affine(bb, y, chan(np.linspace(0.5, 2.0, C)), chan(np.arange(C)))

    mod = make_module(before)
    after = run_pass(mod)
    assert "relax.nn.batch_norm" not in ops_in(after)
    assert ops_in(after).count("relax.multiply") == 1  # only the separate BN's affine is left

    x = _rng(10).standard_normal(X_SHAPE).astype("float32")
    np.testing.assert_allclose(run_module(after, x), run_module(mod, x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ONNX: Conv -> BatchNormalization -> Relu imported with from_onnx
# ---------------------------------------------------------------------------------------------


def _onnx_conv_bn_relu(with_bias: bool):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    p = bn_params()
    weight = conv_weight()
    inits = [numpy_helper.from_array(weight, "W")]
    conv_inputs = ["x", "W"]
    if with_bias:
        inits.append(numpy_helper.from_array(_rng(3).standard_normal(C).astype("float32"), "B"))
        conv_inputs.append("B")
    inits += [numpy_helper.from_array(p[k], k) for k in ("gamma", "beta", "mean", "var")]
    nodes = [
        helper.make_node("Conv", conv_inputs, ["c"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=EPS
        ),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(X_SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, *X_SHAPE[2:]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_onnx_conv_bn_relu(with_bias):
    model = _onnx_conv_bn_relu(with_bias)
    mod = relax.frontend.onnx.from_onnx(model, keep_params_in_input=False)
    assert "relax.nn.batch_norm" in ops_in(mod)

    after = run_pass(mod)
    ops = ops_in(after)
    assert "relax.nn.batch_norm" not in ops
    assert ops == ["relax.nn.conv2d", "relax.add", "relax.nn.relu"]

    x = _rng(11).standard_normal(X_SHAPE).astype("float32")
    np.testing.assert_allclose(run_module(after, x), run_module(mod, x), rtol=1e-4, atol=1e-5)
