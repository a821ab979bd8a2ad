"""The latency table: per-layer modules, keying, caching and reuse across models."""

import json
import sys

import numpy as np
import pytest
from tvmquant.passes import canonicalize_pipeline
from tvmquant.passes.lower_to_integer_only import FALLBACK_ATTR

from tvmquant.mixed_precision import latency as L
from tvmquant.mixed_precision.layers import anchor_layers, assignment_config
from tvmquant.testing import mlp, small_convnet

TARGET = "x86-avx2"  # any x86-64 CPU runs it


@pytest.fixture(scope="module")
def sources():
    return anchor_layers(canonicalize_pipeline()(small_convnet()))


def test_anchor_layers_and_costs(sources):
    names = [s.info.name for s in sources]
    assert names == ["conv2d_0", "conv2d_1", "conv2d_2", "matmul_0"]
    conv0 = sources[0].info
    assert conv0.op == "conv2d" and conv0.has_bias and conv0.clamp == "relu"
    _, c, kh, kw = conv0.weight_shape
    assert conv0.macs == int(np.prod(conv0.output_shape)) * c * kh * kw
    assert conv0.size_bytes("int4") * 2 == conv0.size_bytes("int8") == conv0.weights
    assert conv0.bops("int8") == conv0.macs * 64
    assert conv0.key() != sources[1].info.key()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_layer_module_is_integer_only(sources, precision):
    mod = L.layer_module(sources[1], precision)
    assert list(mod["main"].attrs[FALLBACK_ATTR]) == []
    text = mod["main"].script()
    assert 'out_dtype="int32"' in text and "R.dequantize" not in text


def test_float_layer_module_stays_float(sources):
    text = L.layer_module(sources[1], "float")["main"].script()
    assert "R.dequantize" in text and 'out_dtype="int32"' not in text


def test_table_measures_only_what_it_lacks(sources, tmp_path, monkeypatch):
    calls = []

    def fake_measure(src, precision, target, **kw):
        calls.append((src.info.name, precision))
        return 1.0 + len(calls)

    monkeypatch.setattr(L, "measure_layer", fake_measure)
    path = tmp_path / "lat.json"
    table = L.LatencyTable(path)
    got = L.measure_latencies(sources, ["int8", "int4"], TARGET, table, progress=False)
    assert len(calls) == 8 and set(got) == {s.info.name for s in sources}
    saved = json.loads(path.read_text())
    (tkey,) = saved
    assert '"kind": "llvm"' in tkey and len(saved[tkey]) == 4
    # reloaded from the file: nothing to measure again
    again = L.measure_latencies(sources, ["int8", "int4"], TARGET, L.LatencyTable(path),
                                progress=False)
    assert again == got and len(calls) == 8
    # a new precision measures only that one
    L.measure_latencies(sources, ["int8", "float"], TARGET, L.LatencyTable(path),
                        progress=False)
    assert len(calls) == 12 and all(p == "float" for _, p in calls[8:])
    # another target is another table
    L.measure_latencies(sources[:1], ["int8"], "x86-avx512", L.LatencyTable(path),
                        progress=False)
    assert len(calls) == 13


def test_shapes_shared_across_models_are_measured_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(L, "measure_layer", lambda s, p, t, **k: calls.append(1) or 1.0)
    table = L.LatencyTable(tmp_path / "lat.json")
    a = anchor_layers(canonicalize_pipeline()(mlp((32, 32, 32, 8), seed=1)))
    b = anchor_layers(canonicalize_pipeline()(mlp((32, 32, 16), seed=2)))
    L.measure_latencies(a, ["int8"], TARGET, table, progress=False)
    assert len(calls) == 2  # matmul_0 and matmul_1 share a key (32x32, relu)
    L.measure_latencies(b, ["int8"], TARGET, table, progress=False)
    assert len(calls) == 3  # b's first layer is a's; its last layer is new


def test_measured_latency_is_positive_and_cached(sources, tmp_path):
    table = L.LatencyTable(tmp_path / "lat.json")
    got = L.measure_latencies(sources[:1], ["int8", "float"], TARGET, table, progress=False,
                              number=2, repeat=2)
    assert all(v > 0 for v in got["conv2d_0"].values())


def test_assignment_config():
    config = assignment_config({"conv2d_0": "float", "conv2d_1": "int4", "matmul_0": "int8"})
    assert config.is_skipped("conv2d_0", "conv2d")
    assert config.weight_spec("conv2d_1", "conv2d").bits == 4
    assert config.weight_spec("matmul_0", "matmul").bits == 8
    with pytest.raises(ValueError, match="unknown precision 'int3'"):
        assignment_config({"conv2d_0": "int3"})


@pytest.mark.skipif(sys.platform != "linux", reason="the loopback RPC setup uses Linux "
                    "process groups")
def test_latencies_through_rpc_tracker(sources, tmp_path):
    """Layers built here, uploaded to and timed on the device behind a (loopback) tracker;
    the table keys them by the device key too."""
    from tvmquant.testing import loopback_rpc
    from tvmquant.tuning import RPCDevice, connect_rpc

    table = L.LatencyTable(tmp_path / "lat.json")
    with loopback_rpc("tvmquant-mp") as tracker:
        remote = connect_rpc(RPCDevice(tracker, "tvmquant-mp"))
        got = L.measure_latencies(sources[:2], ["int8"], TARGET, table, progress=False,
                                  number=2, repeat=2, remote=remote, device_key="tvmquant-mp")
    assert all(row["int8"] > 0 for row in got.values())
    (tkey,) = table.data
    assert tkey.endswith("@tvmquant-mp")
