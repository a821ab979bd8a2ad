"""The precision ILP against brute force, budgets, infeasibility and the Pareto sweep."""

import itertools

import numpy as np
import pytest

from tvmquant.mixed_precision.ilp import (
    Budget,
    InfeasibleBudget,
    monotone,
    pareto_sweep,
    parse_budget,
    prune_dominated,
    solve,
    total,
)

P = ("float", "int8", "int4")


def _instance(rng, layers=5):
    names = [f"l{i}" for i in range(layers)]
    sens = {n: {"float": 0.0, "int8": float(rng.uniform(0, 1)),
                "int4": float(rng.uniform(1, 5))} for n in names}
    lat = {n: {"float": float(rng.uniform(3, 6)), "int8": float(rng.uniform(1, 2)),
               "int4": float(rng.uniform(0.4, 1.2))} for n in names}
    size = {n: {"float": 32.0 * (i + 1), "int8": 8.0 * (i + 1), "int4": 4.0 * (i + 1)}
            for i, n in enumerate(names)}
    return names, sens, {"latency": lat, "size": size}


def _brute_force(names, sens, costs, budgets, offsets):
    best = None
    for combo in itertools.product(P, repeat=len(names)):
        a = dict(zip(names, combo))
        if all(total(a, costs[b.kind], offsets.get(b.kind, 0.0)) <= b.limit + 1e-9
               for b in budgets):
            s = total(a, sens)
            if best is None or s < best - 1e-12:
                best = s
    return best


def test_hand_solvable_instance():
    # two layers; 3 ms: only one of them can stay float (float 2 ms, int8 1 ms each), and
    # layer b is the more sensitive one, so b keeps float.
    sens = {"a": {"float": 0, "int8": 1.0}, "b": {"float": 0, "int8": 5.0}}
    lat = {"a": {"float": 2.0, "int8": 1.0}, "b": {"float": 2.0, "int8": 1.0}}
    got = solve(sens, {"latency": lat}, [Budget("latency", 3.0)])
    assert got == {"a": "int8", "b": "float"}
    # with an offset of 1 ms nothing fits but all-int8
    got = solve(sens, {"latency": lat}, [Budget("latency", 3.0)], {"latency": 1.0})
    assert got == {"a": "int8", "b": "int8"}


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    names, sens, costs = _instance(rng)
    offsets = {"latency": 0.5}
    budgets = [Budget("latency", 0.5 + float(rng.uniform(4, 14))),
               Budget("size", float(rng.uniform(60, 300)))]
    try:
        got = solve(sens, costs, budgets, offsets)
    except InfeasibleBudget:
        assert _brute_force(names, sens, costs, budgets, offsets) is None
        return
    for b in budgets:
        assert total(got, costs[b.kind], offsets.get(b.kind, 0.0)) <= b.limit + 1e-9
    assert total(got, sens) == pytest.approx(_brute_force(names, sens, costs, budgets,
                                                          offsets), abs=1e-9)


def test_infeasible_budget_is_a_clear_error():
    sens = {"a": {"int8": 1.0, "int4": 2.0}}
    lat = {"a": {"int8": 1.0, "int4": 0.8}}
    with pytest.raises(InfeasibleBudget, match=r"least any assignment reaches is 1\.3"):
        solve(sens, {"latency": lat}, [Budget("latency", 1.0)], {"latency": 0.5})


def test_ties_go_to_the_cheaper_assignment():
    sens = {"a": {"int8": 0.0, "int4": 0.0}}
    lat = {"a": {"int8": 1.0, "int4": 0.5}}
    assert solve(sens, {"latency": lat}, [Budget("latency", 10.0)]) == {"a": "int4"}


def test_parse_budget():
    ref = {"int8": 10.0, "float": 40.0}
    assert parse_budget("latency", "0.8x-int8", ref).limit == pytest.approx(8.0)
    assert parse_budget("latency", "0.5x-float", ref).limit == pytest.approx(20.0)
    assert parse_budget("latency", "12ms", ref).limit == 12.0
    assert parse_budget("latency", "0.5s", ref).limit == 500.0
    assert parse_budget("size", "4MB", ref).limit == 4e6
    assert parse_budget("size", "2KiB", ref).limit == 2048
    assert parse_budget("bops", "2G", ref).limit == 2e9
    assert parse_budget("bops", 7, ref).limit == 7.0
    with pytest.raises(ValueError, match="relative budgets name one of"):
        parse_budget("latency", "0.8x-int2", ref)
    with pytest.raises(ValueError, match="cannot read latency budget 'fast'"):
        parse_budget("latency", "fast", ref)
    with pytest.raises(ValueError, match="budget kind"):
        Budget("energy", 1.0)


def test_pareto_front_is_monotone():
    rng = np.random.default_rng(7)
    _, sens, costs = _instance(rng, layers=6)
    front = pareto_sweep(sens, costs, "latency", np.linspace(2, 40, 30))
    assert len(front) >= 3
    cost = [p["cost"] for p in front]
    s = [p["sensitivity"] for p in front]
    assert cost == sorted(cost) and all(a > b for a, b in itertools.pairwise(s))
    assert front[-1]["sensitivity"] == 0.0  # everything float once the budget allows it


def test_monotone_sensitivity():
    """Anchored at int8: int4 costs at least int8's, float at most int8's."""
    sens = {"a": {"float": -0.1, "int8": 0.0, "int4": -0.05},  # int4 "better": noise
            "b": {"float": 0.02, "int8": 0.0, "int4": 0.3},  # float "worse": noise
            "c": {"int8": 0.5, "int4": 0.2},
            "d": {"float": 0.1, "int4": 0.05}}  # no int8: running max from float
    assert monotone(sens, P) == {"a": {"float": -0.1, "int8": 0.0, "int4": 0.0},
                                 "b": {"float": 0.0, "int8": 0.0, "int4": 0.3},
                                 "c": {"int8": 0.5, "int4": 0.5},
                                 "d": {"float": 0.1, "int4": 0.1}}


def test_prune_dominated_keeps_real_savings_only():
    sens = {"a": {"float": -0.1, "int8": 0.0, "int4": 0.0},
            "b": {"float": -0.1, "int8": 0.0, "int4": 0.2}}
    lat = {"a": {"float": 2.0, "int8": 1.0, "int4": 0.98},  # 2% faster: noise
           "b": {"float": 2.0, "int8": 1.0, "int4": 0.6}}  # 40% faster: a saving
    size = {n: {"float": 32.0, "int8": 8.0, "int4": 4.0} for n in sens}
    costs = {"latency": lat, "size": size}
    assert prune_dominated(sens, costs, ["latency"], {"latency": 0.05}, P) == {
        "a": {"float": -0.1, "int8": 0.0}, "b": sens["b"]}
    # with a size budget too, int4's bytes are a saving on every layer (on "a", with no
    # more error, int4 is the better of the two)
    assert prune_dominated(sens, costs, ["latency", "size"], {"latency": 0.05}, P) == {
        "a": {"float": -0.1, "int4": 0.0}, "b": sens["b"]}
    # without a tolerance, 2% is a saving (and at no more error, int4 beats int8 outright)
    assert prune_dominated(sens, costs, ["latency"], {}, P)["a"] == {"float": -0.1,
                                                                      "int4": 0.0}
    # a candidate as sensitive as and costlier than another goes, whatever its precision
    worse = {"a": {"float": 0.0, "int8": 0.0}}
    assert prune_dominated(worse, {"latency": {"a": {"float": 2.0, "int8": 1.0}}},
                           ["latency"], {}, P) == {"a": {"int8": 0.0}}
