"""InsertFakeQuant: structure (Before/Expected) and numerics."""

import numpy as np
import pytest
import tvm
from helpers import run_module, run_pass
from tvm import relax
from tvmquant.passes import InsertFakeQuant
from tvmquant.passes.insert_fake_quant import quantize_weight

from tvmquant.config import QuantConfig, get_preset
from tvmquant.numerics import compute_qparams, dequantize, quantize
from tvmquant.spec import QuantSpec

RNG = np.random.default_rng(0)
W0 = RNG.normal(0, 0.3, (4, 3, 3, 3)).astype("float32")
B0 = RNG.normal(0, 0.1, (1, 4, 1, 1)).astype("float32")
W1 = RNG.normal(0, 0.3, (2, 4, 1, 1)).astype("float32")
RANGES = {"x": (np.float64(-1.0), np.float64(1.0)), "conv2d_0": (np.float64(0.0), np.float64(2.0))}


def _before():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            c = bb.emit(relax.op.nn.conv2d(x, relax.const(W0), padding=1))
            a = bb.emit(relax.op.add(c, relax.const(B0)))
            r = bb.emit(relax.op.nn.relu(a))
            o = bb.emit_output(relax.op.nn.conv2d(r, relax.const(W1)))
        bb.emit_func_output(o)
    return bb.get()


def _act_qdq(bb, x, lo, hi, spec):
    scale, zp = compute_qparams(spec, lo, hi)
    s, z = relax.const(np.float32(scale), "float32"), relax.const(np.int32(zp), "int32")
    if spec.is_binary:
        sign = bb.emit(relax.op.greater_equal(x, relax.const(0.0, "float32")))
        q = bb.emit(relax.op.where(sign, relax.const(1, "int8"), relax.const(-1, "int8")))
        return bb.emit(relax.op.dequantize(q, s, z, axis=-1, out_dtype="float32"))
    q = bb.emit(relax.op.quantize(x, s, z, axis=-1, out_dtype=spec.storage_dtype))
    if spec.bits < 8:
        q = bb.emit(relax.op.clip(q, spec.qmin, spec.qmax))
    return bb.emit(relax.op.dequantize(q, s, z, axis=-1, out_dtype="float32"))


def _weight_dq(bb, w, spec):
    q, scale, zp, axis = quantize_weight(w, spec, "conv2d")
    if np.ndim(scale) == 0:
        s, z = relax.const(np.float32(scale), "float32"), relax.const(np.int32(zp), "int32")
    else:
        s = relax.const(scale.astype("float32"), "float32")
        z = relax.const(zp.astype("int32"), "int32")
    return bb.emit(relax.op.dequantize(relax.const(q, spec.storage_dtype), s, z, axis=axis,
                                       out_dtype="float32"))


def _expected(config: QuantConfig):
    act, wspec = config.activation, config.weight
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            xd = _act_qdq(bb, x, -1.0, 1.0, act)
            w0 = _weight_dq(bb, W0, wspec)
            c = bb.emit(relax.op.nn.conv2d(xd, w0, padding=1))
            a = bb.emit(relax.op.add(c, relax.const(B0)))
            r = bb.emit(relax.op.nn.relu(a))
            rd = _act_qdq(bb, r, 0.0, 2.0, act)
            w1 = _weight_dq(bb, W1, wspec)
            o = bb.emit_output(relax.op.nn.conv2d(rd, w1))
        bb.emit_func_output(o)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("tvmquant.fake_quant", True)
    return mod


@pytest.mark.parametrize("preset", ["int8", "int8-per-tensor"])
def test_structure_conv_bias_relu_conv(preset):
    config = get_preset(preset)
    after = run_pass(InsertFakeQuant(config, RANGES), _before())
    tvm.ir.assert_structural_equal(after, _expected(config))


def test_structure_four_bit_activations_get_a_clamp():
    config = QuantConfig(weight=get_preset("int8").weight,
                         activation=QuantSpec(bits=4, signed=False, symmetric=False))
    after = run_pass(InsertFakeQuant(config, RANGES), _before())
    tvm.ir.assert_structural_equal(after, _expected(config))


def test_structure_binary_weights_and_activations():
    """XNOR-Net: activation codes are signs, ``where(x >= 0, 1, -1)``, scaled by the
    calibrated mean magnitude; weights are sign codes with per-channel ``mean |W|``."""
    config = QuantConfig(weight=QuantSpec.binary(granularity="per_channel"),
                         activation=QuantSpec.binary())
    after = run_pass(InsertFakeQuant(config, RANGES), _before())
    tvm.ir.assert_structural_equal(after, _expected(config))
    q, scale, zp, axis = quantize_weight(W0, config.weight, "conv2d")
    assert axis == 0 and set(np.unique(q)) <= {-1, 1} and not zp.any()
    np.testing.assert_allclose(scale, np.abs(W0).mean(axis=(1, 2, 3)), rtol=1e-6)


def test_ternary_weights_use_the_twn_threshold():
    """TWN: zero below 0.7 mean |W| per channel, the scale is the mean |W| above it."""
    w = RNG.normal(0, 1, (6, 8, 3, 3)).astype("float32")
    q, scale, _, _ = quantize_weight(w, QuantSpec.ternary(), "conv2d")
    for c in range(6):
        a = np.abs(w[c])
        keep = a > 0.7 * a.mean()
        np.testing.assert_array_equal(q[c], np.sign(w[c]) * keep)
        np.testing.assert_allclose(scale[c], a[keep].mean(), rtol=1e-6)
    with pytest.raises(ValueError, match="per tensor or per channel"):
        quantize_weight(w, QuantSpec.binary(granularity="per_group", group_size=8), "conv2d")


def test_per_group_weights_are_scaled_codes():
    config = get_preset("w4a8")
    w = RNG.normal(0, 1, (8, 64, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 64, 2, 2), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(relax.op.nn.conv2d(x, relax.const(w)))
        bb.emit_func_output(o)
    after = run_pass(InsertFakeQuant(config, {"x": (-1.0, 1.0)}), bb.get())
    text = after.script()
    assert "R.multiply(R.astype(" in text.replace("\n", "") or "R.astype" in text
    # numerically: the effective weight is the per-group dequantized weight
    q, scale, _, _ = quantize_weight(w, config.weight, "conv2d")
    assert scale.shape == (8, 2)
    assert q.min() >= -8 and q.max() <= 7
    deq = q.astype("float32").reshape(8, 2, 32) * scale[:, :, None]
    assert np.max(np.abs(deq.reshape(8, 64) - w[:, :, 0, 0])) <= scale.max() / 2 + 1e-6


def test_skipped_layer_keeps_float_weights_and_output():
    config = QuantConfig(weight=get_preset("int8").weight,
                         activation=get_preset("int8").activation, skip=("conv2d_0",))
    after = run_pass(InsertFakeQuant(config, RANGES), _before())
    text = after.script()
    assert text.count("R.dequantize") == 1  # only conv2d_1's weight
    assert "R.quantize" not in text  # conv2d_1's input comes from a skipped layer


def test_leaves_alone_graph_without_quantizable_ops():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 10), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(relax.op.nn.softmax(x))
        bb.emit_func_output(o)
    before = bb.get()
    after = run_pass(InsertFakeQuant(get_preset("int8"), {}), before)
    tvm.ir.assert_structural_equal(after, before)


def test_leaves_alone_already_fake_quantized_module():
    once = InsertFakeQuant(get_preset("int8"), RANGES)(_before())
    twice = run_pass(InsertFakeQuant(get_preset("int8"), RANGES), once)
    tvm.ir.assert_structural_equal(twice, once)


def test_missing_range_is_a_clear_error():
    with pytest.raises(ValueError, match="no calibrated range for tensor 'conv2d_0'"):
        InsertFakeQuant(get_preset("int8"), {"x": (-1.0, 1.0)})(_before())


def test_dynamic_activations_compute_scale_at_run_time():
    after = run_pass(InsertFakeQuant(get_preset("int8-dynamic")), _before())
    text = after.script()
    assert "R.min(" in text and "R.max(" in text
    x = RNG.uniform(-3, 3, (1, 3, 8, 8)).astype("float32")
    ref = run_module(_before(), x)
    got = run_module(after, x)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.05


def test_numerics_match_numpy_quantize_dequantize():
    """The fake-quant first conv equals NumPy's conv of quantize-dequantized operands."""
    config = get_preset("int8")
    after = InsertFakeQuant(config, {"x": (-1.0, 1.0)})(_plain_conv(W0))
    xin = RNG.uniform(-1.2, 1.2, (1, 3, 8, 8)).astype("float32")
    got = run_module(after, xin)
    s, z = compute_qparams(config.activation, -1.0, 1.0)
    xq = dequantize(quantize(xin, s, z, 0, 255), s, z)
    wq, ws, wz, _ = quantize_weight(W0, config.weight, "conv2d")
    wd = dequantize(wq, ws, wz, axis=0)
    ref = run_module(_plain_conv(wd), xq)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _plain_conv(w):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 8, 8), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            o = bb.emit_output(relax.op.nn.conv2d(x, relax.const(w), padding=1))
        bb.emit_func_output(o)
    return bb.get()
