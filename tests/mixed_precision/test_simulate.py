"""The assignment simulator against the spine's own fake-quantized models, and the
``kl-int8`` sensitivity built on it."""

import dataclasses

import numpy as np
import pytest
import tvm
from helpers import run_module
from tvmquant.passes.analysis import plan_quantization

import tvmquant
from tvmquant.mixed_precision.layers import anchor_layers, assignment_config, attach_qparams
from tvmquant.mixed_precision.sensitivity import SensitivityCache, output_divergence
from tvmquant.mixed_precision.simulate import AssignmentSimulator, assignment_sensitivity
from tvmquant.testing import random_inputs, small_convnet


def _tensor(x):
    return tvm.runtime.tensor(np.ascontiguousarray(x))


CALIBRATION = random_inputs(4, shape=(1, 3, 16, 16))
SAMPLES = random_inputs(3, shape=(1, 3, 16, 16), seed=7)


@pytest.fixture(scope="module")
def model():
    mod = small_convnet(channels=8, size=16)
    q8 = tvmquant.quantize(mod, CALIBRATION, "int8", progress=False)
    sources = attach_qparams(anchor_layers(q8.float_mod), q8)
    return mod, q8, sources, AssignmentSimulator(q8.float_mod, q8.config, q8.ranges, sources)


ASSIGNMENTS = [
    {},
    {"conv2d_1": "float"},
    {"conv2d_0": "float", "conv2d_2": "int4"},
    {"conv2d_0": "int4", "conv2d_1": "int4", "matmul_0": "float"},
    {"conv2d_0": "float", "conv2d_1": "float", "conv2d_2": "float", "matmul_0": "float"},
]


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=lambda a: ",".join(
    f"{k}={v}" for k, v in a.items()) or "int8")
def test_simulator_is_the_pipelines_fake_quant_model(model, assignment):
    """Any assignment, simulated on the one compiled module, computes what the spine's
    fake-quantized model of that assignment's config computes (calibrated anew)."""
    mod, _, _, sim = model
    q = tvmquant.quantize(mod, CALIBRATION, assignment_config(assignment), progress=False)
    for sample in SAMPLES:
        x = sample["x"]
        expected = run_module(q.fake_quant_mod, x)
        got = sim.outputs([_tensor(x)], assignment)[0]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    if assignment:  # and differs from uniform int8
        assert not np.allclose(sim.outputs([_tensor(SAMPLES[0]["x"])], {})[0],
                               run_module(q.fake_quant_mod, SAMPLES[0]["x"]), atol=1e-6)


def test_switches_follow_the_plan(model):
    """One switch per quantized read; a float layer's reads are off, its input stays
    quantized for the integer layers that also read it."""
    _, q8, _, sim = model
    plan = q8.plan
    assert {t for t, _ in sim.switches} == set(plan.quantized)
    assert sim.enable_vector({}).tolist() == [1.0] * len(sim.switches)
    on = sim.enable_vector({"conv2d_1": "float"})
    members = {m for layer in plan.layers if layer.name == "conv2d_1" for m in layer.members}
    for (tensor, reader), e in zip(sim.switches, on):
        if reader in members:
            assert e == 0.0
    skipped = plan_quantization(q8.float_mod["main"], assignment_config({"conv2d_1": "float"}))
    assert sum(on) == sum(1 for t, r in sim.switches
                          if t in skipped.quantized and r not in skipped.float_users)
    assert 0 < sum(on) < len(sim.switches)
    with pytest.raises(ValueError, match="unknown layers"):
        sim.arguments({"conv2d_99": "float"})


def test_reference_is_the_float_model(model):
    _, q8, _, sim = model
    _, refs = sim.prepare(SAMPLES)
    for x, ref in zip(SAMPLES, refs):
        np.testing.assert_allclose(ref[0], run_module(q8.float_mod, x["x"]), rtol=1e-5,
                                   atol=1e-6)


def test_int8_context_sensitivity_is_the_pipelines_change(model, tmp_path):
    """``kl-int8``: each layer moved off int8 alone, as the change in divergence from
    uniform int8, equals that change computed on the pipeline's fake-quantized models."""
    mod, q8, _, sim = model
    cache = SensitivityCache(tmp_path / "sens.json")
    sens = assignment_sensitivity(sim, SAMPLES, ["float", "int8", "int4"], progress=False,
                                  cache=cache, key="k")
    refs = [[run_module(q8.float_mod, s["x"])] for s in SAMPLES]

    def divergence(fq_mod):
        return np.mean([output_divergence(r, [run_module(fq_mod, s["x"])])
                        for s, r in zip(SAMPLES, refs)])

    uniform = divergence(q8.fake_quant_mod)
    assert uniform > 0
    for name in ("conv2d_0", "matmul_0"):
        for p in ("float", "int4"):
            q = tvmquant.quantize(mod, CALIBRATION, assignment_config({name: p}),
                                  progress=False)
            assert sens[name][p] == pytest.approx(divergence(q.fake_quant_mod) - uniform,
                                                  rel=1e-3, abs=1e-7)
    assert all(row["int8"] == 0.0 for row in sens.values())
    # cached under its key: a second call does not run the model
    sim_none = object.__new__(AssignmentSimulator)
    sim_none.sources = sim.sources
    assert assignment_sensitivity(sim_none, SAMPLES, ["float", "int8", "int4"],
                                  progress=False, cache=SensitivityCache(tmp_path / "sens.json"),
                                  key="k") == sens


def test_dynamic_config_is_refused(model):
    _, q8, sources, _ = model
    with pytest.raises(ValueError, match="static"):
        AssignmentSimulator(q8.float_mod, tvmquant.config.get_preset("int8-dynamic"), {},
                            sources)


def test_layers_not_named_stay_int8(model):
    """A simulator over some of the layers: the others keep their int8 weights."""
    _, q8, sources, sim = model
    part = AssignmentSimulator(q8.float_mod, q8.config, q8.ranges, sources[:2])
    x = [_tensor(SAMPLES[0]["x"])]
    for a in ({}, {"conv2d_0": "float"}):
        np.testing.assert_allclose(part.outputs(x, a)[0], sim.outputs(x, a)[0], rtol=1e-6,
                                   atol=1e-7)
    with pytest.raises(ValueError, match="unknown layers"):
        part.arguments({"matmul_0": "int4"})
    renamed = dataclasses.replace(sources[0], info=dataclasses.replace(sources[0].info,
                                                                       name="conv2d_9"))
    with pytest.raises(ValueError, match="not anchors"):
        AssignmentSimulator(q8.float_mod, q8.config, q8.ranges, [renamed])
