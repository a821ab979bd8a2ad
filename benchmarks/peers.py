"""Peer engines for the fidelity benchmark: ONNX Runtime and OpenVINO, FP32 and INT8.

Each factory returns a callable ``run(x) -> numpy.ndarray`` (the model's first output) for a
single pre-processed input ``x`` of the given static shape, running on the CPU with
``threads`` intra-op threads (2 by default).

* :func:`ort_fp32`: ONNX Runtime on the original model (the reference of the benchmark).
* :func:`ort_int8`: ONNX Runtime ``quantize_static``: QDQ format, per-channel int8 weights,
  uint8 activations, MinMax calibration over the given samples. The model is first given
  static input shapes, upgraded to opset 13 if older (per-channel QDQ needs it) and
  pre-processed with ``quant_pre_process`` (shape inference and graph optimisation), as
  ONNX Runtime's quantization guide recommends.
* :func:`openvino_fp32` / :func:`openvino_int8`: OpenVINO on the ONNX model reshaped to the
  static shape; int8 is ``nncf.quantize`` with its defaults over the same samples. Both are
  compiled with ``INFERENCE_PRECISION_HINT=f32`` so that the float parts really run in FP32
  (OpenVINO otherwise picks bf16 on CPUs that have it).

OpenVINO and NNCF are optional: without them the OpenVINO factories raise
:class:`PeerUnavailable` with an installation hint.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "PEERS",
    "PeerUnavailable",
    "openvino_fp32",
    "openvino_int8",
    "ort_fp32",
    "ort_int8",
    "static_onnx_model",
]

Runner = Callable[[np.ndarray], np.ndarray]

MIN_QDQ_OPSET = 13
"""Per-channel ``QuantizeLinear``/``DequantizeLinear`` (``axis`` attribute) need opset 13."""


class PeerUnavailable(RuntimeError):
    """A peer engine cannot run here (package missing); the message says how to fix it."""


def _ort_session(model: str | os.PathLike | bytes, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def _ort_runner(session) -> Runner:
    input_name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return run


def ort_fp32(model_path: str | os.PathLike, input_shape: Sequence[int] | None = None,
             threads: int = 2) -> Runner:
    """ONNX Runtime FP32 on the unmodified model (``input_shape`` is accepted for symmetry)."""
    del input_shape
    return _ort_runner(_ort_session(model_path, threads))


def static_onnx_model(model_path: str | os.PathLike, input_shape: Sequence[int],
                      min_opset: int = MIN_QDQ_OPSET):
    """The model with a static first input and its default-domain opset raised to ``min_opset``.

    Returns
    -------
    onnx.ModelProto
    """
    import onnx
    from onnx import version_converter

    model = onnx.load(str(model_path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and opset < min_opset:
        logger.info("converting %s from opset %d to %d", Path(model_path).name, opset, min_opset)
        model = version_converter.convert_version(model, min_opset)
    inputs = [i for i in model.graph.input
              if i.name not in {t.name for t in model.graph.initializer}]
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) != len(input_shape):
        raise ValueError(f"input {inputs[0].name!r} has rank {len(dims)}, "
                         f"shape {tuple(input_shape)} given")
    for d, v in zip(dims, input_shape, strict=True):
        d.ClearField("dim_param")
        d.dim_value = int(v)
    # Drop stale (dynamic) intermediate shapes; quant_pre_process infers them again.
    del model.graph.value_info[:]
    return model


class _Reader:
    """``CalibrationDataReader`` over a list of arrays (defined lazily to import ORT late)."""

    def __new__(cls, input_name: str, samples: Sequence[np.ndarray]):
        from onnxruntime.quantization import CalibrationDataReader

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self._it = iter([{input_name: np.ascontiguousarray(s, np.float32)}
                                 for s in samples])

            def get_next(self):
                return next(self._it, None)

        return Reader()


def ort_int8(model_path: str | os.PathLike, input_shape: Sequence[int],
             calib: Sequence[np.ndarray], threads: int = 2) -> Runner:
    """ONNX Runtime static INT8 (QDQ, per-channel, U8 activations / S8 weights, MinMax).

    Parameters
    ----------
    model_path : path-like
        The FP32 ONNX model.
    input_shape : sequence of int
        Static shape of the single input (the calibration samples' shape).
    calib : sequence of numpy.ndarray
        Calibration inputs, each of ``input_shape``.
    threads : int
        Intra-op threads of the inference session.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model = static_onnx_model(model_path, input_shape)
    input_name = model.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="tvmquant-ort-int8-") as tmp:
        static_path = Path(tmp) / "static.onnx"
        pre_path = Path(tmp) / "pre.onnx"
        q_path = Path(tmp) / "int8.onnx"
        onnx.save(model, str(static_path))
        try:
            quant_pre_process(str(static_path), str(pre_path))
        except Exception as exc:  # symbolic shape inference rejects some Paddle exports
            logger.info("quant_pre_process failed (%s: %s); retrying without symbolic shape "
                        "inference", type(exc).__name__, exc)
            quant_pre_process(str(static_path), str(pre_path), skip_symbolic_shape=True)
        quantize_static(
            str(pre_path), str(q_path), _Reader(input_name, calib),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
        data = q_path.read_bytes()
    return _ort_runner(_ort_session(data, threads))


def _import_openvino():
    try:
        import openvino as ov
    except ImportError as exc:
        raise PeerUnavailable(
            "OpenVINO is not installed: pip install openvino nncf (into the project's venv)"
        ) from exc
    return ov


def _ov_model(model_path: str | os.PathLike, input_shape: Sequence[int]):
    ov = _import_openvino()
    model = ov.Core().read_model(str(model_path))
    model.reshape({model.inputs[0].any_name: ov.PartialShape([int(v) for v in input_shape])})
    return model


def _ov_runner(model, threads: int) -> Runner:
    ov = _import_openvino()
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": 1,
    })
    request = compiled.create_infer_request()
    output = compiled.outputs[0]

    def run(x: np.ndarray) -> np.ndarray:
        result = request.infer([np.ascontiguousarray(x, dtype=np.float32)])
        return np.array(result[output], copy=True)

    return run


def openvino_fp32(model_path: str | os.PathLike, input_shape: Sequence[int],
                  threads: int = 2) -> Runner:
    """OpenVINO CPU FP32 on the ONNX model reshaped to ``input_shape``."""
    return _ov_runner(_ov_model(model_path, input_shape), threads)


def openvino_int8(model_path: str | os.PathLike, input_shape: Sequence[int],
                  calib: Sequence[np.ndarray], threads: int = 2) -> Runner:
    """OpenVINO CPU INT8: ``nncf.quantize`` with default settings over ``calib``."""
    model = _ov_model(model_path, input_shape)
    try:
        import nncf
    except ImportError as exc:
        raise PeerUnavailable(
            "NNCF is not installed: pip install nncf (into the project's venv)") from exc
    dataset = nncf.Dataset([np.ascontiguousarray(c, dtype=np.float32) for c in calib])
    quantized = nncf.quantize(model, dataset)
    return _ov_runner(quantized, threads)


PEERS: dict[str, str] = {
    "ort-int8": "ORT int8 (QDQ)",
    "ov-fp32": "OpenVINO fp32",
    "ov-int8": "OpenVINO int8 (NNCF)",
}
"""Peer engine keys and their column titles in the benchmark tables."""
