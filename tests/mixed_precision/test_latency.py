"""The latency table: per-layer modules, keying, caching and reuse across models."""

import json
import re
import sys

import numpy as np
import pytest
from tvmquant.passes import canonicalize_pipeline
from tvmquant.passes.lower_to_integer_only import FALLBACK_ATTR

import tvmquant
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
    # and so are other kernels (an edited schedule, another TVM): measured again
    assert len(L.kernels_fingerprint()) == 12
    monkeypatch.setattr(L, "kernels_fingerprint", lambda: "newkernels00")
    L.measure_latencies(sources[:1], ["int8"], TARGET, L.LatencyTable(path), progress=False)
    assert len(calls) == 14


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


@pytest.fixture(scope="module")
def quantized_sources():
    from tvmquant.mixed_precision.layers import attach_qparams
    from tvmquant.testing import random_inputs

    q8 = tvmquant.quantize(small_convnet(), random_inputs(4), "int8", progress=False)
    return attach_qparams(anchor_layers(q8.float_mod), q8)


def test_activation_region_joins_its_layer(quantized_sources):
    """The depthwise conv's hard-swish (which alone reads it) is timed with it; the first
    conv's output feeds a residual add too, so it has none."""
    by_name = {s.info.name: s for s in quantized_sources}
    dw = by_name["conv2d_2"]
    assert dw.info.activation == "add(3),clip(0/6),multiply,divide(6)"
    assert "act=add(3)" in dw.info.key()
    assert len(dw.activation) == 4 and dw.activation_qparams[2] in ("uint8", "int8")
    assert dw.output_qparams[2] == "int16"  # a lookup table's input grid
    assert by_name["conv2d_0"].info.activation is None and not by_name["conv2d_0"].activation


def test_layer_with_activation_is_integer_when_integer(quantized_sources):
    from helpers import run_module

    dw = {s.info.name: s for s in quantized_sources}["conv2d_2"]
    integer = L.layer_module(dw, "int8")["main"].script()
    # hard-swish on the layer's 16-bit codes: the integer gate (a product of the codes and
    # their clip), not a lookup table
    assert "R.take" not in integer and "R.dequantize" not in integer
    assert "float32" not in integer.split("def main")[1].split("->")[1]
    assert re.search(r"R.multiply\(lv\d+, lv\d+\)", integer)
    floating = L.layer_module(dw, "float")["main"].script()
    assert "R.take" not in floating and "R.multiply" in floating
    # the lowered gate computes what the quantize/dequantize form computes (to a code)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, dw.info.input_shape).astype(dw.input_qparams[2])
    got = run_module(L.layer_module(dw, "int8"), x).astype(np.int32)
    ref = run_module(L.layer_module(dw, "int8", lower=False), x).astype(np.int32)
    assert np.abs(got - ref).max() <= 1 and np.mean(got != ref) < 0.01
    assert len(np.unique(got)) > 8
