"""Per-layer error analysis: which layers are to blame for a quantized model's error.

Every quantized tensor of the plan is exposed as an output of both the float module and the
fake-quant module (the same instrumentation calibration uses); running both on the same
samples gives, per tensor, the signal-to-quantization-noise ratio (SQNR) of the fake-quant
network against float at that point. A layer's *drop* is how much SQNR it loses relative to
its worst input: large drops point at the layers to keep at higher precision or to skip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .api import QuantizedModel, build, run
from .calibration.runner import Sample, check_sample, input_signature
from .numerics import dequantize, quantize
from .passes.expose_observed_tensors import OBSERVED_ATTR, ExposeObservedTensors
from .passes.insert_fake_quant import InsertFakeQuant, activation_qparams


def _sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    if signal <= 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))


def layer_errors(result: QuantizedModel, samples: Sequence[Sample],
                 target: str | dict = "llvm") -> list[dict[str, Any]]:
    """SQNR (dB) of every quantized tensor, fake-quant against float, with per-layer drops.

    Each tensor is measured after its own quantization (as its consumers see it).

    Returns a list in graph order of ``{"tensor", "op", "kind", "sqnr_db", "drop_db"}``.
    """
    if result.config.dynamic:
        raise ValueError("per-layer errors need static (calibrated) activation ranges")
    inst_float = ExposeObservedTensors(result.config)(result.float_mod)
    names = [str(n) for n in inst_float["main"].attrs[OBSERVED_ATTR]]
    inst_fq = InsertFakeQuant(result.config, result.ranges)(inst_float)
    ex_f, ex_q = build(inst_float, target), build(inst_fq, target)
    signature = input_signature(result.float_mod)
    qparams = activation_qparams(result.plan, result.config, result.ranges)
    signal = np.zeros(len(names))
    noise = np.zeros(len(names))
    for i, sample in enumerate(samples):
        arrays = check_sample(sample, signature, i)
        outs_f = run(ex_f, arrays)
        outs_q = run(ex_q, arrays)
        for k in range(len(names)):
            f = outs_f[k + 1].astype(np.float64)
            scale, zp, spec = qparams[names[k]]
            q = dequantize(quantize(outs_q[k + 1], scale, zp, spec.qmin, spec.qmax), scale, zp)
            q = q.astype(np.float64)
            signal[k] += float(np.sum(f * f))
            noise[k] += float(np.sum((f - q) ** 2))
    sqnr = {n: _sqnr_db(s, e) for n, s, e in zip(names, signal, noise, strict=True)}
    layers = {layer.name: layer for layer in result.plan.layers}
    tensor_of = {}
    for v, n in result.plan.quantized.items():
        src = v
        while src in result.plan.inherits:  # movement ops share their input's grid
            src = result.plan.inherits[src]
        tensor_of[v] = result.plan.quantized[src]
    rows = []
    for name in names:
        layer = layers.get(name)
        inputs = [tensor_of[v] for v in (layer.inputs if layer else []) if v in tensor_of]
        worst_in = min((sqnr[n] for n in inputs if n in sqnr), default=float("inf"))
        drop = max(0.0, worst_in - sqnr[name]) if np.isfinite(worst_in) else 0.0
        rows.append({"tensor": name, "op": layer.op if layer else "input",
                     "kind": layer.kind if layer else "input", "sqnr_db": sqnr[name],
                     "drop_db": drop})
    return rows


def format_layer_errors(rows: list[dict[str, Any]], top: int = 10) -> str:
    """The ``top`` layers with the largest SQNR drop, as a Markdown table."""
    worst = sorted(rows, key=lambda r: r["drop_db"], reverse=True)[:top]
    lines = ["| tensor | op | SQNR (dB) | drop (dB) |", "|---|---|---:|---:|"]
    lines += [f"| {r['tensor']} | {r['op']} | {r['sqnr_db']:.1f} | {r['drop_db']:.1f} |"
              for r in worst]
    return "\n".join(lines)


__all__ = ["format_layer_errors", "layer_errors"]
