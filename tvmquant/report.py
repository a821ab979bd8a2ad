"""The quantization report: every tensor's grid, the layers left in float, and fidelity."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import tvm

from .config import QuantConfig
from .passes.analysis import QuantPlan
from .passes.insert_fake_quant import activation_qparams, quantize_weight
from .passes.lower_to_integer_only import FALLBACK_ATTR
from .spec import QuantSpec


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["granularity"] = spec.granularity.value
    return d


def _num(a) -> Any:
    arr = np.asarray(a)
    return arr.item() if arr.size == 1 else arr.tolist()


def config_dict(config: QuantConfig) -> dict[str, Any]:
    return {
        "weight": _spec_dict(config.weight),
        "activation": _spec_dict(config.activation),
        "dynamic": config.dynamic,
        "overrides": [
            {"pattern": o.pattern,
             "weight": _spec_dict(o.weight) if o.weight else None,
             "activation": _spec_dict(o.activation) if o.activation else None}
            for o in config.overrides
        ],
        "skip": list(config.skip),
    }


def build_report(plan: QuantPlan, config: QuantConfig, ranges: dict,
                 integer_mod: tvm.IRModule | None) -> dict[str, Any]:
    """Assemble the JSON-serialisable report of one quantization."""
    qparams = {} if config.dynamic else activation_qparams(plan, config, ranges)
    tensors = []
    for var, name in plan.quantized.items():
        entry: dict[str, Any] = {"name": name}
        if name in qparams:
            scale, zp, spec = qparams[name]
            entry.update(scale=_num(scale), zero_point=_num(zp), dtype=spec.storage_dtype,
                         bits=spec.bits, observer=spec.observer)
        if name in ranges:
            entry["range"] = [_num(ranges[name][0]), _num(ranges[name][1])]
        if var in plan.inherits:
            entry["inherits"] = plan.quantized[plan.inherits[var]]
        tensors.append(entry)
    layers = []
    for layer in plan.layers:
        item: dict[str, Any] = {"name": layer.name, "op": layer.op, "kind": layer.kind,
                                "integer": layer.integer}
        if layer.skipped:
            item["reason"] = "skipped by config"
        elif layer.reason:
            item["reason"] = layer.reason
        if layer.kind == "anchor" and layer.weight is not None and not layer.skipped:
            spec = config.weight_spec(layer.name, layer.op)
            _, scale, zp, axis = quantize_weight(layer.weight.value.numpy(), spec, layer.op)
            item["weight"] = {"spec": spec.describe(), "axis": axis, "scale": _num(scale),
                              "zero_point": _num(zp)}
        layers.append(item)
    fallbacks: list[str] = []
    if integer_mod is not None:
        attrs = integer_mod["main"].attrs
        if attrs is not None and FALLBACK_ATTR in attrs:
            fallbacks = [str(s) for s in attrs[FALLBACK_ATTR]]
    # A quantized tensor whose producer the lowering left in float: that layer is float.
    lowered_in_float = dict(f.split(": ", 1) for f in fallbacks if ": " in f)
    for item in layers:
        if item["integer"] and item["name"] in lowered_in_float:
            item["integer"] = False
            item["reason"] = lowered_in_float[item["name"]]
    float_layers = [
        {"name": item["name"], "op": item["op"], "reason": item.get("reason", "")}
        for item in layers if not item["integer"]
    ]
    return {
        "config": config_dict(config),
        "tensors": tensors,
        "layers": layers,
        "float_layers": float_layers,
        "lowering_fallbacks": fallbacks,
        "summary": {
            "layers": len(layers),
            "integer_layers": sum(1 for item in layers if item["integer"]),
            "float_layers": len(float_layers),
            "quantized_tensors": len(tensors),
        },
    }
