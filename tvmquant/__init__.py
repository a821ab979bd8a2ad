"""tvmquant: neural-network quantization as an Apache TVM (Relax) compiler plugin.

Quick start::

    import tvmquant
    from tvmquant.frontend import load_onnx

    mod, params, inputs = load_onnx("model.onnx", {"x": (1, 3, 224, 224)})
    qmod = tvmquant.quantize(mod, calibration_data, config="int8")
    ex = tvmquant.build(qmod, target="x86-vnni")
"""

from .api import QuantizedModel, build, measure_fidelity, quantize, run
from .calibration.runner import CalibrationDataError, calibrate
from .config import PRESETS, LayerOverride, QuantConfig, get_preset
from .spec import Granularity, QuantSpec
from .targets import TARGETS, resolve_target

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "TARGETS",
    "CalibrationDataError",
    "Granularity",
    "LayerOverride",
    "QuantConfig",
    "QuantSpec",
    "QuantizedModel",
    "build",
    "calibrate",
    "get_preset",
    "measure_fidelity",
    "quantize",
    "resolve_target",
    "run",
]
