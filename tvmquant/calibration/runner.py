"""Calibration: run the float model on calibration batches and observe tensor ranges.

The graph is instrumented by :class:`~tvmquant.passes.ExposeObservedTensors`, built once for
the host CPU, and run through the Relax VM on every sample with a progress bar. Each exposed
tensor feeds an observer chosen by the activation spec of the layer that produces it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import tvm
from tqdm.auto import tqdm
from tvm import relax

from .._compat import llvm_target, static_shape
from ..config import QuantConfig
from ..passes.analysis import plan_quantization
from ..passes.expose_observed_tensors import OBSERVED_ATTR, ExposeObservedTensors
from .observers import Observer, make_observer

logger = logging.getLogger(__name__)

Sample = Mapping[str, np.ndarray]


class CalibrationDataError(ValueError):
    """Calibration data that does not fit the model (names, shapes, dtypes)."""


def input_signature(mod: tvm.IRModule, func_name: str = "main") -> dict[str, tuple]:
    """``{name: (shape, dtype)}`` of a Relax function's tensor parameters."""
    func = mod[func_name]
    num_input = func.attrs.get("num_input") if func.attrs is not None else None
    params = list(func.params)[: int(num_input)] if num_input is not None else func.params
    return {p.name: (static_shape(p), str(p.ty.dtype)) for p in params}


def check_sample(sample: Sample, signature: dict[str, tuple], index: int) -> list[np.ndarray]:
    """Validate one calibration sample; return its arrays in parameter order."""
    if not isinstance(sample, Mapping):
        raise CalibrationDataError(
            f"calibration sample {index} is a {type(sample).__name__}; expected a mapping "
            f"{{input_name: ndarray}} with inputs {sorted(signature)}"
        )
    unknown = set(sample) - set(signature)
    if unknown:
        raise CalibrationDataError(
            f"calibration sample {index} has unknown input(s) {sorted(unknown)}; the model's "
            f"inputs are {sorted(signature)}"
        )
    arrays = []
    for name, (shape, dtype) in signature.items():
        if name not in sample:
            raise CalibrationDataError(
                f"calibration sample {index} lacks input {name!r} (model inputs: "
                f"{sorted(signature)})"
            )
        arr = np.asarray(sample[name])
        if shape is not None and tuple(arr.shape) != tuple(shape):
            raise CalibrationDataError(
                f"calibration sample {index}: input {name!r} has shape {tuple(arr.shape)}, the "
                f"model expects {tuple(shape)}"
            )
        if str(arr.dtype) != dtype:
            if np.can_cast(arr.dtype, dtype, casting="same_kind") and arr.dtype.kind == "f":
                arr = arr.astype(dtype)
            else:
                raise CalibrationDataError(
                    f"calibration sample {index}: input {name!r} has dtype {arr.dtype}, the "
                    f"model expects {dtype}"
                )
        arrays.append(np.ascontiguousarray(arr))
    return arrays


def calibrate(
    mod: tvm.IRModule,
    calibration_data: Iterable[Sample],
    config: QuantConfig,
    *,
    func_name: str = "main",
    progress: bool = True,
    target: tvm.target.Target | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Observe the ranges of every tensor the plan quantizes.

    Parameters
    ----------
    mod : IRModule
        The float module, as it will be given to ``InsertFakeQuant``.
    calibration_data : iterable of {input_name: ndarray}
        One mapping per sample, each array with the model's input shape.
    config : QuantConfig
        Chooses the tensors (plan) and each tensor's observer (activation spec).

    Returns
    -------
    dict of tensor name to (min, max)
    """
    plan = plan_quantization(mod[func_name], config)
    layers = {layer.name: layer for layer in plan.layers}
    lut_only = {plan.quantized[v] for v in plan.lut_only}
    signature = input_signature(mod, func_name)
    inst = ExposeObservedTensors(config, func_name)(mod)
    names = [str(n) for n in inst[func_name].attrs[OBSERVED_ATTR]]
    observers: dict[str, Observer] = {}
    for name in names:
        layer = layers.get(name)
        if layer is None:
            spec = config.activation
        elif name in lut_only:
            spec = config.lut_input_spec(layer.name, layer.op)
        else:
            spec = config.activation_spec(layer.name, layer.op)
        observers[name] = make_observer(spec.observer, spec)
    ex = tvm.compile(inst, target=target or llvm_target())
    vm = relax.VirtualMachine(ex, tvm.cpu())
    count = 0
    samples = calibration_data
    total = len(samples) if hasattr(samples, "__len__") else None
    for i, sample in enumerate(tqdm(samples, total=total, desc="calibrating", unit="sample",
                                    disable=not progress)):
        arrays = check_sample(sample, signature, i)
        outs = vm[func_name](*[tvm.runtime.tensor(a) for a in arrays])
        for name, value in zip(names, list(outs)[1:], strict=True):
            observers[name].observe(value.numpy())
        count += 1
    if count == 0:
        raise CalibrationDataError("calibration data is empty: give at least one sample")
    logger.info("calibrated %d tensors on %d samples", len(names), count)
    return {name: obs.range() for name, obs in observers.items()}
