"""LowerToIntegerOnly: structure (Before/Expected), fallbacks, and integer numerics."""

import numpy as np
import pytest
import tvm
from helpers import one_input_module, run_module, run_pass
from tvm import relax
from tvmquant.passes import LowerToIntegerOnly
from tvmquant.passes.lower_to_integer_only import FALLBACK_ATTR, INTEGER_ATTR

from tvmquant.numerics import dyadic


def _c(v, dtype):
    return relax.const(np.asarray(v).astype(dtype), dtype)


def _qdq_function(build_body, in_dtype="uint8", shape=(1, 4, 6, 6)):
    return one_input_module(build_body, shape, in_dtype)


def _with_attrs(mod, fallbacks=()):
    f = mod["main"].with_attr(INTEGER_ATTR, True).with_attr(FALLBACK_ATTR, list(fallbacks))
    mod["main"] = f
    return mod


def test_requantize_with_equal_grids_is_identity():
    def before(bb, x):
        d = bb.emit(relax.op.dequantize(x, _c(0.5, "float32"), _c(3, "int32")))
        return relax.op.quantize(d, _c(0.5, "float32"), _c(3, "int32"), out_dtype="uint8")

    after = run_pass(LowerToIntegerOnly(), _qdq_function(before))
    expected = _with_attrs(_qdq_function(lambda bb, x: x))
    tvm.ir.assert_structural_equal(after, expected)


def test_requantize_between_grids_is_dyadic():
    s1, z1, s2, z2 = 0.05, 10, 0.03, 128

    def before(bb, x):
        d = bb.emit(relax.op.dequantize(x, _c(s1, "float32"), _c(z1, "int32")))
        return relax.op.quantize(d, _c(s2, "float32"), _c(z2, "int32"), out_dtype="uint8")

    def expected(bb, x):
        d = dyadic(np.float64(np.float32(s1)) / np.float64(np.float32(s2)))
        m0, sh = int(d.m0), int(d.shift)
        v = bb.emit(relax.op.astype(x, "int32"))
        v = bb.emit(relax.op.subtract(v, _c(z1, "int32")))
        v = bb.emit(relax.op.astype(v, "int64"))
        v = bb.emit(relax.op.multiply(v, _c(m0, "int64")))
        v = bb.emit(relax.op.add(v, _c(1 << (sh - 1), "int64")))
        v = bb.emit(relax.op.right_shift(v, _c(sh, "int64")))
        v = bb.emit(relax.op.add(v, _c(z2, "int64")))
        v = bb.emit(relax.op.clip(v, 0, 255))
        return bb.emit(relax.op.astype(v, "uint8"))

    after = run_pass(LowerToIntegerOnly(), _qdq_function(before))
    tvm.ir.assert_structural_equal(after, _with_attrs(_qdq_function(expected)))
    # and numerically: round(real value / s2) + z2 up to one step
    x = np.arange(0, 144, dtype="uint8").reshape(1, 4, 6, 6)
    got = run_module(after, x).astype(int)
    ref = np.clip(np.round((x.astype(float) - z1) * np.float32(s1) / np.float32(s2)) + z2, 0, 255)
    assert np.max(np.abs(got - ref)) <= 1


def test_int8_conv_with_bias_and_relu():
    rng = np.random.default_rng(0)
    wq = rng.integers(-127, 128, (4, 4, 3, 3)).astype("int8")
    ws = rng.uniform(0.01, 0.02, 4).astype("float32")
    bias = rng.normal(0, 0.1, (1, 4, 1, 1)).astype("float32")
    sx, so, zo = 0.1, 0.2, 0

    def before(bb, x):
        xd = bb.emit(relax.op.dequantize(x, _c(sx, "float32"), _c(0, "int32")))
        wd = bb.emit(relax.op.dequantize(relax.const(wq, "int8"), relax.const(ws, "float32"),
                                         _c(np.zeros(4), "int32"), axis=0))
        c = bb.emit(relax.op.nn.conv2d(xd, wd, padding=1))
        a = bb.emit(relax.op.add(c, relax.const(bias)))
        r = bb.emit(relax.op.nn.relu(a))
        return relax.op.quantize(r, _c(so, "float32"), _c(zo, "int32"), out_dtype="int8")

    def expected(bb, x):
        acc_scale = np.float32(sx) * ws.astype(np.float64)
        acc = bb.emit(relax.op.nn.conv2d(x, relax.const(wq, "int8"), padding=1,
                                         out_dtype="int32"))
        bq = np.round(bias.reshape(-1) / acc_scale).astype("int32").reshape(1, 4, 1, 1)
        acc = bb.emit(relax.op.add(acc, relax.const(bq, "int32")))
        d = dyadic(acc_scale / np.float32(so))
        m0 = d.m0.reshape(1, 4, 1, 1)
        sh = d.shift.reshape(1, 4, 1, 1)
        v = bb.emit(relax.op.astype(acc, "int64"))
        v = bb.emit(relax.op.multiply(v, relax.const(m0, "int64")))
        v = bb.emit(relax.op.add(v, relax.const(np.left_shift(1, sh - 1), "int64")))
        v = bb.emit(relax.op.right_shift(v, relax.const(sh, "int64")))
        v = bb.emit(relax.op.add(v, _c(zo, "int64")))
        v = bb.emit(relax.op.clip(v, 0, 127))  # ReLU: the low bound is the zero point
        return bb.emit(relax.op.astype(v, "int8"))

    before_mod = _qdq_function(before, "int8")
    after = run_pass(LowerToIntegerOnly(), before_mod)
    tvm.ir.assert_structural_equal(after, _with_attrs(_qdq_function(expected, "int8")))
    x = rng.integers(-128, 128, (1, 4, 6, 6)).astype("int8")
    # integer result within one step of the float (fake-quant) computation
    fq = _qdq_function(lambda bb, v: relax.op.dequantize(bb.emit(before(bb, v)),
                                                          _c(so, "float32"), _c(zo, "int32")),
                       "int8")
    ref = np.round(run_module(fq, x) / so).astype(int)
    got = run_module(after, x).astype(int)
    assert np.max(np.abs(got - ref)) <= 1


def test_op_without_rule_stays_float_and_is_reported():
    def before(bb, x):
        d = bb.emit(relax.op.dequantize(x, _c(0.1, "float32"), _c(0, "int32")))
        s = bb.emit(relax.op.nn.softmax(d), name_hint="sm")
        return relax.op.quantize(s, _c(1 / 255, "float32"), _c(0, "int32"), out_dtype="uint8")

    after = run_pass(LowerToIntegerOnly(), _qdq_function(before, shape=(1, 10)))
    assert "R.nn.softmax" in after.script()
    fallbacks = [str(s) for s in after["main"].attrs[FALLBACK_ATTR]]
    assert len(fallbacks) == 1 and "no integer rule for softmax" in fallbacks[0]


def test_hard_swish_becomes_a_lookup_table():
    sx, zx, so, zo = 0.05, 128, 0.04, 20

    def hswish(bb, d):
        h = bb.emit(relax.op.add(d, _c(3.0, "float32")))
        h = bb.emit(relax.op.clip(h, 0, 6))
        h = bb.emit(relax.op.multiply(d, h))
        return bb.emit(relax.op.divide(h, _c(6.0, "float32")))

    def before(bb, x):
        d = bb.emit(relax.op.dequantize(x, _c(sx, "float32"), _c(zx, "int32")))
        return relax.op.quantize(hswish(bb, d), _c(so, "float32"), _c(zo, "int32"),
                                 out_dtype="uint8")

    after = run_pass(LowerToIntegerOnly(), _qdq_function(before, shape=(1, 256)))
    text = after.script()
    assert "R.take" in text and "R.clip(lv" not in text.split("R.take")[1]
    assert "float32" not in text.split("def main")[1].split("R.take")[1]
    x = np.arange(256, dtype="uint8").reshape(1, 256)
    got = run_module(after, x)
    xs = (x.astype(np.float32) - zx) * np.float32(sx)
    ref = np.clip(np.rint(xs * np.clip(xs + 3, 0, 6) / 6 / np.float32(so)) + zo, 0, 255)
    assert np.max(np.abs(got.astype(int) - ref)) <= 1
    assert [str(s) for s in after["main"].attrs[FALLBACK_ATTR]] == []


def _hswish(bb, d, scale=None, shift=None):
    """Hard-swish as TVM's ONNX importer writes it, then optionally ``* scale + shift`` (the
    learnable affine blocks of PP-OCRv4)."""
    h = bb.emit(relax.op.add(d, _c(3.0, "float32")))
    h = bb.emit(relax.op.clip(h, 0, 6))
    h = bb.emit(relax.op.divide(h, _c(6.0, "float32")))
    h = bb.emit(relax.op.multiply(d, h))
    if scale is not None:
        h = bb.emit(relax.op.multiply(_c(scale, "float32"), h))
        h = bb.emit(relax.op.add(h, _c(shift, "float32")))
    return h


def _hswish_on_int16(sx, so, zo, scale=None, shift=None):
    def before(bb, x):
        d = bb.emit(relax.op.dequantize(x, _c(sx, "float32"), _c(0, "int32")))
        return relax.op.quantize(_hswish(bb, d, scale, shift), _c(so, "float32"),
                                 _c(zo, "int32"), out_dtype="uint8")

    return _qdq_function(before, "int16", shape=(1, 65536))


ALL_INT16 = np.arange(-32768, 32768).astype("int16").reshape(1, -1)


def test_hard_swish_on_16_bit_codes_becomes_an_integer_gate():
    """Scales that are powers of two make the gate's parameters easy to derive by hand."""
    sx, so, zo = 2.0**-12, 2.0**-5, 10

    def expected(bb, x):
        # x = q / 4096: x + 3 = (q + 12288) / 4096, clipped to [0, 24576] / 4096; the product
        # q * g (below 32768 * 24576 < 2^30) is rounded to 15 bits (>> 15, + 2^14 first);
        # its unit is 2^15 / 4096^2 / 6 / 2^-5 = 2^-4 / 6 = 21845.33 / 2^21
        v = bb.emit(relax.op.astype(x, "int32"))
        x1 = bb.emit(relax.op.add(v, _c(0, "int32")))
        g = bb.emit(relax.op.add(v, _c(12288, "int32")))
        g = bb.emit(relax.op.clip(g, 0, 24576))
        p = bb.emit(relax.op.multiply(x1, g))
        p = bb.emit(relax.op.add(p, _c(1 << 14, "int32")))
        p = bb.emit(relax.op.right_shift(p, _c(15, "int32")))
        p = bb.emit(relax.op.multiply(p, _c(21845, "int32")))
        p = bb.emit(relax.op.add(p, _c(1 << 20, "int32")))
        p = bb.emit(relax.op.right_shift(p, _c(21, "int32")))
        p = bb.emit(relax.op.add(p, _c(zo, "int32")))
        p = bb.emit(relax.op.clip(p, 0, 255))
        return bb.emit(relax.op.astype(p, "uint8"))

    after = run_pass(LowerToIntegerOnly(), _hswish_on_int16(sx, so, zo))
    tvm.ir.assert_structural_equal(
        after, _with_attrs(_qdq_function(expected, "int16", shape=(1, 65536))))


@pytest.mark.parametrize("sx,so,zo,scale,shift", [
    (20 / 32767, 0.04, 20, None, None),  # a pre-activation range of +-20
    (7.5 / 32767, 0.013, 3, None, None),
    (12 / 32767, 0.05, 200, -0.8, 1.5),  # a learnable affine block with a negative scale
    (30 / 32767, 0.1, 30, 1.3, -0.27),
], ids=["hswish", "hswish-narrow", "affine-negative", "affine"])
def test_integer_gate_is_within_one_step_of_the_float_activation(sx, so, zo, scale, shift):
    """On every one of the 65536 codes, against the float activation quantized to the
    output grid."""
    after = run_pass(LowerToIntegerOnly(), _hswish_on_int16(sx, so, zo, scale, shift))
    text = after.script()
    assert "R.take" not in text and "float32" not in text.split("def main")[1]
    got = run_module(after, ALL_INT16).astype(int)
    xs = ALL_INT16.astype(np.float64) * np.float32(sx)
    ys = xs * np.clip(xs + 3, 0, 6) / 6
    if scale is not None:
        ys = scale * ys + shift
    ref = np.clip(np.rint(ys / np.float32(so)) + zo, 0, 255)
    assert len(np.unique(got)) > 100  # (the output grid is really used)
    diff = np.abs(got - ref)
    assert diff.max() <= 1 and np.mean(diff) < 0.01


def test_tiny_pre_activation_range_keeps_its_table():
    """A range of +-0.5 puts the clip's bounds past 2^15 codes: the product would leave
    int32, so the region stays a lookup table (still exact to the float activation)."""
    after = run_pass(LowerToIntegerOnly(), _hswish_on_int16(0.5 / 32767, 0.003, 100))
    assert "R.take" in after.script()
    got = run_module(after, ALL_INT16).astype(int)
    xs = ALL_INT16.astype(np.float32) * np.float32(0.5 / 32767)
    ref = np.clip(np.rint(xs * np.clip(xs + 3, 0, 6) / 6 / np.float32(0.003)) + 100, 0, 255)
    assert np.max(np.abs(got - ref)) <= 1


def test_a_constant_term_on_a_rounding_tie_rounds_as_the_table():
    """``- 0.25 / 0.1`` is half an output step: on the flat part of hard-swish (45% of the
    codes) the gate must round that tie as the float32 table does (a nudge of its constant
    term), not half up."""
    sx, so, zo = 30 / 32767, 0.1, 30
    after = run_pass(LowerToIntegerOnly(), _hswish_on_int16(sx, so, zo, 1.3, -0.25))
    assert "R.take" not in after.script()
    got = run_module(after, ALL_INT16).astype(int)
    xs = ALL_INT16.astype(np.float32) * np.float32(sx)  # the table's own float32 arithmetic
    ys = np.float32(1.3) * (xs * (np.clip(xs + np.float32(3), 0, 6) / np.float32(6))) \
        + np.float32(-0.25)
    table = np.clip(np.rint(ys / np.float32(so)) + zo, 0, 255)
    assert np.max(np.abs(got - table)) <= 1 and np.mean(got != table) < 0.01


def test_sigmoid_on_16_bit_codes_keeps_its_table():
    def before(bb, x):
        d = bb.emit(relax.op.dequantize(x, _c(8 / 32767, "float32"), _c(0, "int32")))
        y = bb.emit(relax.op.sigmoid(d))
        return relax.op.quantize(y, _c(1 / 255, "float32"), _c(0, "int32"), out_dtype="uint8")

    after = run_pass(LowerToIntegerOnly(), _qdq_function(before, "int16", shape=(1, 64)))
    assert "R.take" in after.script()


def test_leaves_alone_float_module():
    def body(bb, x):
        return relax.op.nn.relu(x)

    before = _qdq_function(body, "float32")
    after = run_pass(LowerToIntegerOnly(), before)
    tvm.ir.assert_structural_equal(after, before)


def _group_scaled(bb, codes, scale):
    """Per-group weights as InsertFakeQuant spells them: codes times a full scale tensor."""
    f = bb.emit(relax.op.astype(relax.const(codes, "int8"), "float32"))
    return bb.emit(relax.op.multiply(f, relax.const(scale.astype("float32"))))


def test_per_group_matmul_is_grouped_partial_sums():
    rng = np.random.default_rng(5)
    k, n, gs = 8, 4, 4
    wq = rng.integers(-8, 8, (k, n)).astype("int8")
    gscale = rng.uniform(0.01, 0.04, (n, k // gs))  # (channels, groups)
    full = np.repeat(gscale, gs, axis=1).T  # (K, N), like InsertFakeQuant
    sx, zx, so, zo = 0.1, 3, 0.05, 7

    def before(bb, x):
        xd = bb.emit(relax.op.dequantize(x, _c(sx, "float32"), _c(zx, "int32")))
        m = bb.emit(relax.op.matmul(xd, _group_scaled(bb, wq, full)))
        return relax.op.quantize(m, _c(so, "float32"), _c(zo, "int32"), out_dtype="uint8")

    gs32 = full.T.astype(np.float32).astype(np.float64)[:, ::gs]  # the stored scales
    base = gs32.max(axis=1)
    t = np.round(gs32 / base[:, None] * 2**15).astype(np.int64)

    def expected(bb, x):
        d = bb.emit(relax.op.reshape(x, (2, 2, gs)))
        d = bb.emit(relax.op.permute_dims(d, [1, 0, 2]))
        p = bb.emit(relax.op.matmul(d, relax.const(wq.reshape(2, gs, n), "int8"),
                                    out_dtype="int32"))
        p = bb.emit(relax.op.astype(p, "int64"))
        p = bb.emit(relax.op.multiply(p, relax.const(t.T.reshape(2, 1, n), "int64")))
        acc = bb.emit(relax.op.sum(p, axis=[0]))
        acc = bb.emit(relax.op.reshape(acc, (2, n)))
        wsum = wq.astype(np.int64).reshape(2, gs, n).sum(axis=1)
        corr = (-zx * (t.T * wsum).sum(axis=0)).reshape(1, n)
        acc = bb.emit(relax.op.add(acc, relax.const(corr, "int64")))
        dd = dyadic(np.float32(sx) * base / 2**15 / np.float32(so))
        v = bb.emit(relax.op.astype(acc, "int64"))
        v = bb.emit(relax.op.multiply(v, relax.const(dd.m0.reshape(1, n), "int64")))
        v = bb.emit(relax.op.add(v, relax.const(
            np.left_shift(1, dd.shift - 1).reshape(1, n), "int64")))
        v = bb.emit(relax.op.right_shift(v, relax.const(dd.shift.reshape(1, n), "int64")))
        v = bb.emit(relax.op.add(v, _c(zo, "int64")))
        v = bb.emit(relax.op.clip(v, 0, 255))
        return bb.emit(relax.op.astype(v, "uint8"))

    after = run_pass(LowerToIntegerOnly(), _qdq_function(before, shape=(2, k)))
    tvm.ir.assert_structural_equal(after, _with_attrs(_qdq_function(expected, shape=(2, k))))


def test_per_group_numerics_match_fake_quant():
    """Grouped conv2d and matmul: integer codes within one step of the QDQ module's."""
    rng = np.random.default_rng(6)
    c, o, gs, hw = 16, 6, 4, 5
    wc = rng.integers(-8, 8, (o, c, 3, 3)).astype("int8")
    sc = np.repeat(rng.uniform(0.005, 0.05, (o, c // gs)), gs, axis=1)[:, :, None, None]
    sc = np.broadcast_to(sc, wc.shape)
    wm = rng.integers(-8, 8, (o * hw * hw, 8)).astype("int8")
    sm = np.repeat(rng.uniform(0.001, 0.01, (8, o * hw * hw // 30)), 30, axis=1).T
    sx, zx, s1, z1, s2, z2 = 0.02, 100, 0.05, 120, 0.2, 128

    def before(bb, x):
        xd = bb.emit(relax.op.dequantize(x, _c(sx, "float32"), _c(zx, "int32")))
        y = bb.emit(relax.op.nn.conv2d(xd, _group_scaled(bb, wc, sc), padding=1))
        y = bb.emit(relax.op.quantize(y, _c(s1, "float32"), _c(z1, "int32"), out_dtype="uint8"))
        y = bb.emit(relax.op.reshape(y, (1, o * hw * hw)))
        y = bb.emit(relax.op.dequantize(y, _c(s1, "float32"), _c(z1, "int32")))
        y = bb.emit(relax.op.matmul(y, _group_scaled(bb, wm, sm)))
        return relax.op.quantize(y, _c(s2, "float32"), _c(z2, "int32"), out_dtype="uint8")

    mod = _qdq_function(before, shape=(1, c, hw, hw))
    after = run_pass(LowerToIntegerOnly(), mod)
    assert [str(s) for s in after["main"].attrs[FALLBACK_ATTR]] == []
    text = after.script()
    assert "groups=4" in text and "float32" not in text.split("def main")[1].split("->")[1]
    for _ in range(3):  # fresh inputs
        x = rng.integers(0, 256, (1, c, hw, hw)).astype("uint8")
        got, ref = run_module(after, x).astype(int), run_module(mod, x).astype(int)
        assert np.max(np.abs(got - ref)) <= 1, np.max(np.abs(got - ref))
        assert np.mean(got != ref) < 0.05


def test_binary_codes_are_the_sign_of_the_accumulator():
    """``QuantSpec.binary()`` activations: ``where(conv + bias >= 0, 1, -1)`` becomes the sign
    of the int32 accumulator plus the integer bias, with no requantization."""
    rng = np.random.default_rng(0)
    wq = np.where(rng.random((4, 4, 3, 3)) < 0.5, -1, 1).astype("int8")
    ws = rng.uniform(0.5, 1.0, 4).astype("float32")
    bias = rng.normal(0, 2.0, (1, 4, 1, 1)).astype("float32")
    sx = 0.1

    def before(bb, x):
        xd = bb.emit(relax.op.dequantize(x, _c(sx, "float32"), _c(0, "int32")))
        wd = bb.emit(relax.op.dequantize(relax.const(wq, "int8"), relax.const(ws, "float32"),
                                         _c(np.zeros(4), "int32"), axis=0))
        c = bb.emit(relax.op.nn.conv2d(xd, wd, padding=1))
        a = bb.emit(relax.op.add(c, relax.const(bias)))
        sign = bb.emit(relax.op.greater_equal(a, _c(0.0, "float32")))
        return relax.op.where(sign, _c(1, "int8"), _c(-1, "int8"))

    def expected(bb, x):
        acc_scale = np.float32(sx) * ws.astype(np.float64)
        acc = bb.emit(relax.op.nn.conv2d(x, relax.const(wq, "int8"), padding=1,
                                         out_dtype="int32"))
        bq = np.round(bias.reshape(-1) / acc_scale).astype("int32").reshape(1, 4, 1, 1)
        acc = bb.emit(relax.op.add(acc, relax.const(bq, "int32")))
        sign = bb.emit(relax.op.greater_equal(acc, _c(0, "int32")))
        return relax.op.where(sign, _c(1, "int8"), _c(-1, "int8"))

    before_mod = _qdq_function(before, "int8")
    after = run_pass(LowerToIntegerOnly(), before_mod)
    tvm.ir.assert_structural_equal(after, _with_attrs(_qdq_function(expected, "int8")))
    # numerically: the signs of the float (fake-quant) computation, fresh inputs; a sign may
    # only differ where the float value is within half an accumulator step of 0
    x = np.random.default_rng().integers(-128, 128, (1, 4, 6, 6)).astype("int8")
    got, ref = run_module(after, x), run_module(before_mod, x)
    assert set(np.unique(got)) <= {-1, 1}
    assert np.mean(got != ref) < 0.01


def test_binary_codes_of_a_tensor_without_integer_rule_are_reported():
    def before(bb, x):
        d = bb.emit(relax.op.dequantize(x, _c(0.1, "float32"), _c(0, "int32")))
        s = bb.emit(relax.op.nn.softmax(d))
        sign = bb.emit(relax.op.greater_equal(s, _c(0.0, "float32")))
        return relax.op.where(sign, _c(1, "int8"), _c(-1, "int8"))

    after = run_pass(LowerToIntegerOnly(), _qdq_function(before, shape=(1, 10)))
    fallbacks = [str(s) for s in after["main"].attrs[FALLBACK_ATTR]]
    assert len(fallbacks) == 1 and "binary codes" in fallbacks[0]
