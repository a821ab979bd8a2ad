"""Sensitivity: Hutchinson against an exact Hessian trace, the ZeroQ divergence, caching,
and the DifferentiableForm rewrite that lets Relax's Gradient pass run on real models."""

import numpy as np
import pytest
import tvm
from helpers import one_input_module, run_module, run_pass
from tvm import relax
from tvmquant.passes import DifferentiableForm, canonicalize_pipeline

import tvmquant
from tvmquant.mixed_precision import sensitivity as S
from tvmquant.mixed_precision.layers import anchor_layers
from tvmquant.testing import mlp, random_inputs, small_convnet


def _exact_traces(w1, w2, x):
    """Diagonal of the Hessian of 0.5 * mean((f(W) - f(W0))^2), f = relu(x W1) W2, at W0."""
    ref = np.maximum(x @ w1, 0) @ w2

    def loss(a, b):
        return 0.5 * np.mean((np.maximum(x @ a, 0) @ b - ref) ** 2)

    out = []
    for idx in (0, 1):
        ws, t, d = [w1, w2], 0.0, 1e-4
        for i in np.ndindex(ws[idx].shape):
            plus = [w.copy() for w in ws]
            minus = [w.copy() for w in ws]
            plus[idx][i] += d
            minus[idx][i] -= d
            t += (loss(*plus) - 2 * loss(*ws) + loss(*minus)) / d**2
        out.append(t)
    return out


def test_hutchinson_matches_exact_hessian_trace():
    mod = canonicalize_pipeline()(mlp((6, 5, 3), seed=1))
    sources = anchor_layers(mod)
    rng = np.random.default_rng(0)
    samples = [{"x": rng.normal(0, 1, (1, 6)).astype("float32")} for _ in range(3)]
    est = S.hutchinson_traces(mod, sources, samples, vectors=1500, step=1e-3, progress=False)
    x = np.concatenate([s["x"] for s in samples]).astype(np.float64)
    exact = _exact_traces(*[s.weight.astype(np.float64) for s in sources], x)
    for src, ref in zip(sources, exact):
        assert est[src.info.name] == pytest.approx(ref, rel=0.12), (est, exact)


def test_hessian_sensitivity_orders_precisions():
    mod = canonicalize_pipeline()(mlp((6, 5, 3), seed=1))
    sources = anchor_layers(mod)
    sens = S.hessian_sensitivity({s.info.name: 1.0 for s in sources}, sources,
                                 ["float", "int8", "int4"])
    for row in sens.values():
        assert row["float"] == 0.0 < row["int8"] < row["int4"]


def test_output_divergence_branches():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1, (2, 7))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    sig = 1 / (1 + np.exp(-logits))
    for ref in (probs, sig, logits):
        assert S.output_divergence([ref], [ref]) == pytest.approx(0.0, abs=1e-9)
        u = rng.uniform(-1, 1, ref.shape)
        near = S.output_divergence([ref], [ref * (1 + 0.01 * u)])
        far = S.output_divergence([ref], [ref * (1 + 0.3 * u)])
        assert 0 < near < far
    # pooled features (N, C, 1, 1): compared over the channels, not a softmax of one value
    pooled = logits[..., None, None]
    flat = S.output_divergence([logits], [logits * 1.3])
    assert flat > 0
    assert S.output_divergence([pooled], [pooled * 1.3]) == pytest.approx(flat)


@pytest.fixture(scope="module")
def convnet():
    from tvmquant.mixed_precision.layers import attach_qparams

    q8 = tvmquant.quantize(small_convnet(), random_inputs(4), "int8", progress=False)
    return q8.float_mod, attach_qparams(anchor_layers(q8.float_mod), q8), random_inputs(2)


def test_lifted_weights_compute_the_same(convnet):
    mod, sources, samples = convnet
    lifted = run_pass(lambda m: S.lift_weights(m, sources), mod)
    assert len(lifted["main"].params) == 1 + len(sources)
    x = samples[0]["x"]
    np.testing.assert_allclose(run_module(lifted, x, *[s.weight for s in sources]),
                               run_module(mod, x), rtol=1e-5, atol=1e-6)


def test_activation_switches(convnet):
    """Switched off, the lifted module is the float model exactly; switching one layer on
    quantizes that layer's output on its int8 grid."""
    mod, sources, samples = convnet
    lifted = S.lift_weights(mod, sources, activations=True)
    x = samples[0]["x"]
    ws = [s.weight for s in sources]
    off = [np.array([0, 1, 0, 0], np.float32)] * len(sources)
    np.testing.assert_array_equal(run_module(lifted, x, *ws, *off),
                                  run_module(S.lift_weights(mod, sources), x, *ws))
    scale, zp, _ = sources[0].output_qparams
    on = list(off)
    on[0] = np.array([1, scale, zp, 0], np.float32)
    assert np.abs(run_module(lifted, x, *ws, *on) - run_module(lifted, x, *ws, *off)).max() > 0


def test_kl_sensitivity_and_its_cache(convnet, tmp_path, monkeypatch):
    mod, sources, samples = convnet
    cache = S.SensitivityCache(tmp_path / "sens.json")
    sens = S.kl_sensitivity(mod, sources, samples, ["float", "int8", "int4"],
                            progress=False, cache=cache)
    assert set(sens) == {s.info.name for s in sources}
    for row in sens.values():
        assert row["float"] == 0.0 < row["int8"] < row["int4"]
    # a second run with the same model and data comes from the cache, without building
    monkeypatch.setattr(tvmquant.api, "build", lambda *a, **k: pytest.fail("rebuilt"))
    again = S.kl_sensitivity(mod, sources, samples, ["float", "int8", "int4"],
                             progress=False, cache=S.SensitivityCache(tmp_path / "sens.json"))
    assert again == sens


def test_differentiable_form_structure():
    def function(body):
        return one_input_module(body, (1, 4, 6))

    def before(bb, x):
        c = bb.emit(relax.op.clip(x, 0, 6))
        return relax.op.strided_slice(c, axes=[2], begin=[1], end=[5], strides=[2])

    def expected(bb, x):
        lo = bb.emit(relax.op.maximum(x, relax.const(0.0, "float32")))
        c = bb.emit(relax.op.minimum(lo, relax.const(6.0, "float32")))
        return relax.op.take(c, relax.const(np.array([1, 3], np.int64), "int64"), axis=2,
                             mode="clip")

    after = run_pass(DifferentiableForm(), function(before))
    tvm.ir.assert_structural_equal(after, function(expected))
    x = np.random.default_rng().normal(0, 4, (1, 4, 6)).astype("float32")
    np.testing.assert_array_equal(run_module(after, x), run_module(function(before), x))


@pytest.mark.parametrize("kind", ["det", "rec"])
def test_differentiable_form_on_real_models(kind):
    """Same outputs on a real image, and Relax's Gradient pass now runs on the model."""
    from tvmquant import datasets as D
    from tvmquant.frontend import load_onnx
    from tvmquant.zoo import PPOCR_INPUT_SHAPES

    mod = canonicalize_pipeline()(load_onnx(D.model_path(kind), PPOCR_INPUT_SHAPES[kind])[0])
    after = run_pass(DifferentiableForm(), mod)
    x = D.calibration_samples(kind, 1)[0]["x"]
    got = tvmquant.run(tvmquant.build(after, "llvm"), [x])[0]
    ref = tvmquant.run(tvmquant.build(mod, "llvm"), [x])[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    adjoint = S.loss_module(mod, anchor_layers(mod))
    assert "main_loss_adjoint" in [gv.name_hint for gv in adjoint.functions]


def test_differentiable_form_conv_transpose_and_resize():
    """Before/Expected: an upsampling conv_transpose (stride = kernel) becomes a matmul and a
    depth-to-space; a nearest resize becomes two takes. Same values on fresh inputs."""
    w = np.random.default_rng(3).normal(0, 1, (4, 3, 2, 2)).astype("float32")

    def before(bb, x):
        y = bb.emit(relax.op.nn.conv2d_transpose(x, relax.const(w), strides=2))
        return relax.op.image.resize2d(y, (10, 10), method="nearest_neighbor",
                                       coordinate_transformation_mode="asymmetric",
                                       rounding_method="floor")

    def expected(bb, x):
        rows = bb.emit(relax.op.reshape(relax.op.permute_dims(x, [0, 2, 3, 1]), (16, 4)))
        cols = bb.emit(relax.op.reshape(relax.const(w), (4, 12)))
        y = bb.emit(relax.op.matmul(rows, cols))
        y = bb.emit(relax.op.reshape(y, (1, 4, 4, 3, 2, 2)))
        y = bb.emit(relax.op.permute_dims(y, [0, 3, 1, 4, 2, 5]))
        y = bb.emit(relax.op.reshape(y, (1, 3, 8, 8)))
        idx = relax.const(np.floor(np.arange(10) * 0.8).astype(np.int64), "int64")
        y = bb.emit(relax.op.take(y, idx, axis=2, mode="clip"))
        return relax.op.take(y, idx, axis=3, mode="clip")

    mod = one_input_module(before, (1, 4, 4, 4))
    after = run_pass(DifferentiableForm(), mod)
    tvm.ir.assert_structural_equal(after, one_input_module(expected, (1, 4, 4, 4)))
    x = np.random.default_rng().normal(0, 1, (1, 4, 4, 4)).astype("float32")
    np.testing.assert_allclose(run_module(after, x), run_module(mod, x), rtol=1e-5, atol=1e-6)


def test_differentiable_form_squeeze_and_layer_norm():
    gamma = np.random.default_rng(4).uniform(0.5, 1.5, 6).astype("float32")
    beta = np.random.default_rng(5).normal(0, 0.1, 6).astype("float32")

    def before(bb, x):
        s = bb.emit(relax.op.squeeze(x, axis=[0]))
        return relax.op.nn.layer_norm(s, relax.const(gamma), relax.const(beta), axes=[-1],
                                      epsilon=1e-5)

    def expected(bb, x):
        s = bb.emit(relax.op.reshape(x, (3, 6)))
        mean = bb.emit(relax.op.mean(s, axis=[-1], keepdims=True))
        xm = bb.emit(relax.op.subtract(s, mean))
        var = bb.emit(relax.op.mean(relax.op.multiply(xm, xm), axis=[-1], keepdims=True))
        std = bb.emit(relax.op.sqrt(relax.op.add(var, relax.const(np.float32(1e-5)))))
        y = bb.emit(relax.op.divide(xm, std))
        y = bb.emit(relax.op.multiply(y, relax.const(gamma)))
        return relax.op.add(y, relax.const(beta))

    mod = one_input_module(before, (1, 3, 6))
    after = run_pass(DifferentiableForm(), mod)
    tvm.ir.assert_structural_equal(after, one_input_module(expected, (1, 3, 6)))
    x = np.random.default_rng().normal(0, 2, (1, 3, 6)).astype("float32")
    np.testing.assert_allclose(run_module(after, x), run_module(mod, x), rtol=1e-5, atol=1e-5)


def test_measured_sensitivity_goes_through_the_real_pipeline(tmp_path, monkeypatch):
    """``measured``: each value is the divergence of the really quantized and built model
    (that layer changed, the rest int8) minus uniform int8's; cached."""
    mod, calib, samples = small_convnet(), random_inputs(4), random_inputs(2, seed=7)
    names, precisions = ["conv2d_0", "matmul_0"], ["float", "int8", "int4"]
    cache = S.SensitivityCache(tmp_path / "sens.json")
    sens = S.measured_sensitivity(mod, names, calib, samples, precisions, progress=False,
                                  cache=cache)
    assert set(sens) == set(names) and all(row["int8"] == 0.0 for row in sens.values())
    from tvmquant.passes import canonicalize_pipeline

    from tvmquant.mixed_precision.layers import assignment_config

    float_ex = tvmquant.build(canonicalize_pipeline()(mod), "llvm")

    def divergence(assignment):
        ex = tvmquant.build(tvmquant.quantize(mod, calib, assignment_config(assignment),
                                              progress=False), "llvm")
        return np.mean([S.output_divergence(tvmquant.run(float_ex, [x["x"]]),
                                            tvmquant.run(ex, [x["x"]])) for x in samples])

    assert sens["conv2d_0"]["int4"] == pytest.approx(
        divergence({"conv2d_0": "int4"}) - divergence({}), rel=1e-6, abs=1e-12)
    assert sens["matmul_0"]["float"] < 0  # the output layer in float: closer to float
    monkeypatch.setattr(tvmquant.api, "build", lambda *a, **k: pytest.fail("rebuilt"))
    assert S.measured_sensitivity(mod, names, calib, samples, precisions, progress=False,
                                  cache=S.SensitivityCache(tmp_path / "sens.json")) == sens
