"""The public API: ``quantize`` a float Relax module, ``build`` the result for a target.

>>> qmod = tvmquant.quantize(mod, calibration_data, config="int8")
>>> ex = tvmquant.build(qmod, target="x86-vnni")
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tvm
from tvm import relax

from .calibration.runner import (
    CalibrationDataError,
    Sample,
    calibrate,
    check_sample,
    input_signature,
)
from .config import QuantConfig, resolve_config
from .passes.analysis import QuantPlan, plan_quantization
from .passes.pipeline import canonicalize_pipeline, quantize_pipeline
from .report import build_report
from .targets import request_amx_permission, resolve_target

logger = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """The result of :func:`quantize`.

    Attributes
    ----------
    mod : IRModule
        The integer-only module (float only in the input quantize and output dequantize, and
        in layers listed in ``report["float_layers"]``).
    fake_quant_mod : IRModule
        Simulated quantization (quantize/dequantize pairs around float ops).
    float_mod : IRModule
        The canonicalized float module the quantization started from.
    config : QuantConfig
    ranges : dict of tensor name to (min, max)
        Calibrated ranges (empty for dynamic configs).
    report : dict
        JSON-serialisable report (see :func:`tvmquant.report.build_report`).
    """

    mod: tvm.IRModule
    fake_quant_mod: tvm.IRModule
    float_mod: tvm.IRModule
    config: QuantConfig
    ranges: dict
    plan: QuantPlan
    report: dict[str, Any] = field(default_factory=dict)


def _as_irmodule(mod) -> tvm.IRModule:
    if isinstance(mod, tvm.IRModule):
        return mod
    if isinstance(mod, relax.Function):
        return tvm.IRModule({"main": mod})
    raise TypeError(f"expected a Relax IRModule or Function, got {type(mod).__name__}")


def quantize(
    mod: tvm.IRModule,
    calibration_data: Iterable[Sample] | None = None,
    config: QuantConfig | str = "int8",
    *,
    progress: bool = True,
    fidelity_samples: int = 0,
) -> QuantizedModel:
    """Quantize a float Relax module.

    Parameters
    ----------
    mod : IRModule
        Float model; weights must be constants (``tvmquant.frontend.load_onnx`` does that).
    calibration_data : iterable of {input_name: ndarray}
        Samples for calibrating activation ranges (not needed for dynamic configs).
    config : QuantConfig or str
        A config or a preset name (``int8``, ``int8-per-tensor``, ``int8-dynamic``, ``w4a8``).
    progress : bool
        Show a progress bar during calibration.
    fidelity_samples : int
        If positive, run that many calibration samples through the float, fake-quant and
        integer modules and put the output errors into ``report["fidelity"]``.
    """
    config = resolve_config(config)
    mod = _as_irmodule(mod)
    if "main" not in mod:
        raise ValueError("the module has no 'main' function to quantize")
    float_mod = canonicalize_pipeline()(mod)
    samples: list[Sample] = []
    if not config.dynamic:
        if calibration_data is None:
            raise CalibrationDataError(
                "static quantization needs calibration data; give calibration_data or use a "
                "dynamic preset such as 'int8-dynamic'"
            )
        samples = list(calibration_data)
        ranges = calibrate(float_mod, samples, config, progress=progress)
    else:
        ranges = {}
        samples = list(calibration_data or [])
    plan = plan_quantization(float_mod["main"], config)
    fake = quantize_pipeline(config, ranges, integer_only=False)(float_mod)
    integer = quantize_pipeline(config, ranges, integer_only=True)(float_mod)
    report = build_report(plan, config, ranges, integer)
    result = QuantizedModel(integer, fake, float_mod, config, ranges, plan, report)
    if fidelity_samples and samples:
        report["fidelity"] = measure_fidelity(result, samples[:fidelity_samples])
    return result


def build(
    qmod: QuantizedModel | tvm.IRModule,
    target: str | dict | tvm.target.Target = "llvm",
    *,
    kernels: bool = True,
    schedules: bool = True,
    database=None,
    fast_math: bool = True,
) -> tvm.runtime.Executable:
    """Compile a quantized (or any Relax) module for a target.

    ``target`` is a friendly name (``x86-vnni``, ``x86-avx2``, ``native``, ...), a TVM target
    dict, or a ``tvm.target.Target``. With ``kernels`` (the default), integer convolutions and
    matmuls run on tvmquant's scheduled kernels where the target has them (AVX-512 VNNI on
    x86, see :mod:`tvmquant.schedules.x86`). With ``schedules`` (the default), operators are
    fused and every other kernel gets tvmquant's default CPU schedule (parallel, vectorized;
    :mod:`tvmquant.schedules.cpu`), or its tuned schedule from ``database`` (a MetaSchedule
    database or its directory, see ``tvmquant tune``). ``fast_math`` (with ``schedules``)
    computes the float ``exp``/softmax, ``erf`` and ``tanh`` that remain with TVM's
    vectorizable approximations (about 1e-7 relative error). ``kernels=False,
    schedules=False`` is TVM's plain ``tvm.compile``.
    """
    from .schedules.pipeline import build as _build
    from .targets import missing_host_features

    mod = qmod.mod if isinstance(qmod, QuantizedModel) else _as_irmodule(qmod)
    tgt = resolve_target(target)
    missing = missing_host_features(tgt)
    if missing:
        warnings.warn(f"building for a CPU with {', '.join(missing)}, which this machine's "
                      "CPU lacks: run the result on such a machine (here it would stop on an "
                      "illegal instruction)", stacklevel=2)
    return _build(mod, tgt, kernels=kernels, schedules=schedules, database=database,
                  fast_math=fast_math)


def run(ex, inputs: Sequence[np.ndarray], device=None) -> list[np.ndarray]:
    """Run a compiled module's ``main`` on NumPy inputs; returns NumPy outputs."""
    request_amx_permission()  # (a module built for AMX needs it; a no-op elsewhere)
    vm = relax.VirtualMachine(ex, device or tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
    return _flatten(out)


def _flatten(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result = []
    for item in out:
        result.extend(_flatten(item))
    return result


def output_errors(ref: list[np.ndarray], test: list[np.ndarray]) -> dict[str, float]:
    """Relative L2 error, max absolute error and cosine similarity over all outputs."""
    r = np.concatenate([np.ravel(a).astype(np.float64) for a in ref])
    t = np.concatenate([np.ravel(a).astype(np.float64) for a in test])
    diff = np.linalg.norm(r - t)
    norm = np.linalg.norm(r)
    cos = float(r @ t / (norm * np.linalg.norm(t))) if norm and np.linalg.norm(t) else 0.0
    return {"rel_l2": float(diff / norm) if norm else float(diff),
            "max_abs": float(np.max(np.abs(r - t))) if r.size else 0.0, "cosine": cos}


def measure_fidelity(result: QuantizedModel, samples: Sequence[Sample],
                     target: str | dict = "llvm") -> dict[str, Any]:
    """Output errors of the fake-quant and integer modules against float, per sample mean."""
    signature = input_signature(result.float_mod)
    exes = {name: build(m, target) for name, m in
            (("float", result.float_mod), ("fake_quant", result.fake_quant_mod),
             ("integer", result.mod))}
    errs: dict[str, list[dict[str, float]]] = {"fake_quant": [], "integer": []}
    for i, sample in enumerate(samples):
        arrays = check_sample(sample, signature, i)
        ref = run(exes["float"], arrays)
        for key in errs:
            errs[key].append(output_errors(ref, run(exes[key], arrays)))
    return {
        key: {metric: float(np.mean([e[metric] for e in vals])) for metric in vals[0]}
        for key, vals in errs.items() if vals
    } | {"samples": len(samples)}
