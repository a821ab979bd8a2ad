"""Real models for tests and benchmarks: the PP-OCR ONNX models shipped by rapidocr-onnxruntime.

The ``rapidocr-onnxruntime`` wheel (1.4.4) carries three ONNX models in its ``models`` folder.
They are located through the import system (without importing the package, whose
``__init__`` pulls OpenCV and ONNX Runtime), never through a hard-coded path.
"""

from __future__ import annotations

import importlib.util
import pathlib

PPOCR_PACKAGE = "rapidocr_onnxruntime"

PPOCR_FILES: dict[str, str] = {
    "cls": "ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "det": "ch_PP-OCRv4_det_infer.onnx",
    "rec": "ch_PP-OCRv4_rec_infer.onnx",
}
"""File name of each PP-OCR model inside the package's ``models`` folder."""

PPOCR_INPUT_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "cls": {"x": (1, 3, 48, 192)},
    "det": {"x": (1, 3, 320, 320)},
    "rec": {"x": (1, 3, 48, 320)},
}
"""Static input shapes we use for each model (the ONNX files have dynamic dimensions)."""


def ppocr_models_dir() -> pathlib.Path:
    """The ``models`` folder of the installed rapidocr-onnxruntime package.

    Raises
    ------
    ModuleNotFoundError
        If rapidocr-onnxruntime is not installed.
    """
    spec = importlib.util.find_spec(PPOCR_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the PP-OCR models come from the '{PPOCR_PACKAGE}' package, which is not "
            "installed: pip install 'rapidocr-onnxruntime==1.4.4' (or tvmquant[test])",
            name=PPOCR_PACKAGE,
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations))) / "models"


def ppocr_model_path(kind: str) -> pathlib.Path:
    """Path of a PP-OCR ONNX model: ``kind`` is ``"cls"``, ``"det"`` or ``"rec"``.

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    ModuleNotFoundError
        If rapidocr-onnxruntime is not installed.
    FileNotFoundError
        If the package is installed but the model file is not in it.
    """
    if kind not in PPOCR_FILES:
        raise ValueError(
            f"unknown PP-OCR model kind {kind!r}; expected one of {sorted(PPOCR_FILES)}"
        )
    path = ppocr_models_dir() / PPOCR_FILES[kind]
    if not path.is_file():
        raise FileNotFoundError(
            f"PP-OCR {kind} model not found at {path}; the installed {PPOCR_PACKAGE} is not "
            "the expected version (1.4.4)"
        )
    return path
