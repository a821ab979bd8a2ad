"""The whole mixed-precision loop on a small model with really measured latencies, and its
command line."""

import json

import numpy as np
import pytest

import tvmquant
from tvmquant import mixed_precision as mp
from tvmquant.testing import random_inputs, small_convnet

TARGET = "x86-avx2"


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mp")
    return mp.search(small_convnet(channels=16, size=24), random_inputs(4, shape=(1, 3, 24, 24)),
                     TARGET, size_budget="0.7x-int8", latency_budget="1.5x-int8",
                     latency_table=folder / "lat.json", cache=folder / "sens.json",
                     progress=False, pareto_points=8), folder


def test_choice_meets_the_budgets(result):
    r, _ = result
    budgets = {b["kind"]: b["limit"] for b in r.report["budgets"]}
    assert r.report["size_bytes"] <= budgets["size"] + 1e-6
    assert r.predicted_ms <= budgets["latency"] + 1e-9
    assert r.report["size_bytes"] < r.uniform["int8"]["size"]  # some int4 was needed
    assert r.report["counts"]["int4"] >= 1


def test_chosen_config_is_what_was_compiled(result):
    r, _ = result
    float_layers = {item["name"] for item in r.quantized.report["float_layers"]}
    for name, precision in r.assignment.items():
        assert (name in float_layers) == (precision == "float")
        if precision != "float":
            assert r.config.weight_spec(name, name.split("_")[0]).bits == \
                (4 if precision == "int4" else 8)
    x = random_inputs(1, shape=(1, 3, 24, 24), seed=9)[0]["x"]
    out = tvmquant.run(r.executable, [x])[0]
    ref = tvmquant.run(tvmquant.build(r.quantized.float_mod, TARGET), [x])[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 0.2


def test_report_has_prediction_and_measurement(result):
    r, _ = result
    lat = r.report["latency_ms"]
    assert lat["predicted"] > 0 and lat["measured"] > 0
    assert lat["error"] == pytest.approx((lat["predicted"] - lat["measured"]) / lat["measured"])
    json.dumps(r.report)  # serialisable
    costs = [p["latency_ms"] for p in r.report["pareto"]]
    assert costs == sorted(costs) and len(costs) >= 1  # (the size budget holds along it)


def test_plots(result):
    r, folder = result
    paths = mp.write_plots(r, folder, "small")
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sensitivity_bars_show_gains_below_zero(tmp_path, monkeypatch):
    """A change from uniform int8 is negative where float helps: those bars are drawn
    below zero (symmetric log), with every precision that is not zero everywhere."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from tvmquant.mixed_precision.plots import sensitivity_bars

    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(fig, *args, **kwargs):
        ax = fig.axes[0]
        seen["scale"] = ax.get_yscale()
        seen["labels"] = [t.get_text() for t in ax.get_legend().get_texts()]
        seen["heights"] = sorted(b.get_height() for b in ax.patches)
        return real_savefig(fig, *args, **kwargs)

    sens = {"a": {"float": -0.3, "int8": 0.0, "int4": 0.1},
            "b": {"float": -0.001, "int8": 0.0, "int4": 0.02}}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    path = sensitivity_bars(sens, tmp_path / "bars.png")
    plt.close("all")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen["scale"] == "symlog" and seen["labels"] == ["float", "int4"]
    assert seen["heights"] == [-0.3, -0.001, 0.02, 0.1]


def test_never_beaten_by_a_feasible_random_assignment(result):
    """Same tables: a random assignment within the budgets never has less sensitivity."""
    r, _ = result
    rows = {layer["name"]: layer for layer in r.report["layers"]}
    budgets = {b["kind"]: b["limit"] for b in r.report["budgets"]}
    bits = {"float": 32, "int8": 8, "int4": 4}

    def cost(a, kind):
        if kind == "latency":
            return r.rest_ms + sum(r.latency[n][p] for n, p in a.items())
        return sum(np.prod(rows[n]["weight_shape"]) * bits[p] / 8 for n, p in a.items())

    best = r.report["total_sensitivity"]
    feasible = 0
    for a in mp.random_assignments(list(r.assignment), list(bits), 200, seed=3):
        if all(cost(a, k) <= budgets[k] for k in budgets):
            feasible += 1
            assert sum(r.sensitivity[n][p] for n, p in a.items()) >= best - 1e-12
    assert feasible >= 1


def test_search_errors():
    with pytest.raises(ValueError, match="give at least one budget"):
        mp.search(small_convnet(), random_inputs(1), TARGET)
    with pytest.raises(ValueError, match="sensitivity must be"):
        mp.search(small_convnet(), random_inputs(1), TARGET, latency_budget=1,
                  sensitivity="fisher")
    with pytest.raises(mp.InfeasibleBudget, match="least any assignment reaches"):
        mp.search(small_convnet(), random_inputs(2), TARGET, size_budget=10,
                  progress=False)



def test_int8_context_search_under_a_latency_budget(result):
    """``kl-int8`` on the simulator; under a latency budget alone, int4 is taken only where
    it is measurably faster than int8 (beyond the noise tolerance); the whole choice is
    simulated next to uniform int8."""
    _, folder = result
    r = mp.search(small_convnet(channels=16, size=24), random_inputs(4, shape=(1, 3, 24, 24)),
                  TARGET, latency_budget="1.3x-int8", sensitivity="kl-int8",
                  latency_table=folder / "lat.json", cache=folder / "sens.json",
                  progress=False, pareto_points=4)
    assert r.report["sensitivity_measure"] == "kl-int8"
    assert all(row["int8"] == 0.0 for row in r.sensitivity.values())
    for name, precision in r.assignment.items():
        if precision == "int4":
            assert r.latency[name]["int4"] < r.latency[name]["int8"] / (1 + mp.LATENCY_NOISE)
        row = r.sensitivity[name]
        assert row["float"] <= row["int8"] <= row["int4"]  # monotone
    sim = r.report["simulated_divergence"]
    assert sim["uniform_int8"] > 0 and sim["chosen"] >= 0
    if all(p == "int8" for p in r.assignment.values()):
        assert sim["chosen"] == sim["uniform_int8"]


def test_effective_assignment_takes_the_pipelines_float_layers():
    """A float conv2d_0 takes conv2d_1 with it (their residual add loses its integer rule):
    the prediction counts conv2d_1 as the pipeline runs it, in float."""
    names = ["conv2d_0", "conv2d_1", "conv2d_2", "matmul_0"]
    a = dict.fromkeys(names, "int8") | {"conv2d_0": "float"}
    q = tvmquant.quantize(small_convnet(), random_inputs(2), mp.assignment_config(a),
                          progress=False)
    lat = {n: {"float": 2.0, "int8": 1.0} for n in names}
    assert mp.effective_assignment(a, q, lat) == a | {"conv2d_1": "float"}
    # without a float time for it, the layer keeps its nominal precision
    assert mp.effective_assignment(a, q, lat | {"conv2d_1": {"int8": 1.0}}) == a


def test_prediction_is_of_the_effective_assignment(result):
    r, _ = result
    lat = r.report["latency_ms"]
    eff = dict(r.assignment)
    for n in r.report["knock_on_float"]:
        assert r.assignment[n] != "float"
        eff[n] = "float"
    fell = {f["name"] for f in r.quantized.report["float_layers"]}
    assert set(r.report["knock_on_float"]) == {n for n in fell & set(eff)
                                               if r.assignment[n] != "float"}
    assert lat["predicted"] == pytest.approx(
        lat["rest"] + sum(r.latency[n][p] for n, p in eff.items()))
