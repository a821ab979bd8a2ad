"""ONNX front end: load an ONNX model into a Relax ``IRModule`` ready for quantization.

:func:`load_onnx` wraps TVM's ONNX importer (``tvm.relax.frontend.onnx.from_onnx``) with the
steps that real exported models need, and turns every failure into a :class:`FrontendError`
whose message names the file, the input or the operator at fault:

1. Load the file (a missing, malformed or truncated file is a clear error, not a protobuf
   traceback) and run ``onnx.checker``.
2. Refuse operators TVM's importer does not convert, listing them all at once.
3. Make every graph input static (dynamic dimensions need ``input_shapes``).
4. Fix the input shapes and fold the shape arithmetic with onnxslim. TVM's importer rejects
   e.g. ``Reshape`` whose target shape is computed by ``Shape``/``Gather``/``Concat`` at run
   time, which exported models (PP-OCR, ``torch.onnx.export``) are full of.
5. Import with the weights embedded as constants (``keep_params_in_input=False``).
   ``Clip`` with constant bounds is imported as ``R.clip`` (see :class:`_ConstantBoundClip`).
6. ``FoldConstant`` and ``DeadCodeElimination``: e.g. ``reshape(const)`` of conv biases
   becomes a constant and unused helper ``PrimFunc``\\ s are dropped.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tvm
from tvm import relax
from tvm.relax.frontend.onnx import onnx_frontend as _onnx_frontend

__all__ = ["FrontendError", "InputInfo", "load_onnx", "parse_input_shapes"]

_SHAPES_SYNTAX = (
    "expected --input-shapes name:d0,d1,... with positive integer dimensions, several inputs "
    "separated by ';' (e.g. --input-shapes 'a:1,3,224,224;b:1,10')"
)


class FrontendError(ValueError):
    """An ONNX model cannot be loaded or imported; the message says which file, input or op."""


@dataclass(frozen=True)
class InputInfo:
    """One graph input of the imported model (initializers excluded), with its static shape.

    ``name`` is the ONNX name (what ``input_shapes`` and ``--input-shapes`` use). TVM may
    sanitize it for the Relax parameter (``input.1`` becomes ``input_1``); the parameters of
    ``mod["main"]`` are in the same order as the list :func:`load_onnx` returns.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str


# --------------------------------------------------------------------------------------------
# --input-shapes parsing
# --------------------------------------------------------------------------------------------


def parse_input_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """Parse ``"x:1,3,48,192"``, ``"a:1,3;b:1,10"`` or ``"a:1,3 b:1,10"`` into a dict.

    Spaces around the dimensions are allowed (``"a: 1, 3; b: 1, 10"``).
    The name is everything before the *last* colon, so TensorFlow-style names such as
    ``input:0`` work (``input:0:1,224,224,3``). Dimensions are positive integers. Blank text
    gives an empty dict.

    Raises
    ------
    FrontendError
        On bad syntax, a non-positive dimension or a repeated name.
    """
    if not isinstance(text, str):
        raise FrontendError(f"input shapes must be a string, got {type(text).__name__}")
    if not text.strip():
        return {}
    # Entries are separated by ';' or by whitespace that precedes a "name:" (so "a:1, 3" is
    # one entry); empty entries (a trailing ';') are ignored.
    entries = [
        entry.strip()
        for part in text.split(";")
        for entry in re.split(r"\s+(?=[^\s,]*:)", part.strip())
        if entry.strip()
    ]

    shapes: dict[str, tuple[int, ...]] = {}
    for entry in entries:
        name, sep, dims_text = entry.rpartition(":")
        name = name.strip()
        if not sep or not name:
            raise FrontendError(f"bad input shape {entry!r} in {text!r}: {_SHAPES_SYNTAX}")
        dims_items = [d.strip() for d in dims_text.split(",")]
        if not all(re.fullmatch(r"[0-9]+", d) for d in dims_items):
            raise FrontendError(
                f"bad dimensions {dims_text!r} for input {name!r} in {text!r}: {_SHAPES_SYNTAX}"
            )
        dims = tuple(int(d) for d in dims_items)
        if any(d <= 0 for d in dims):
            raise FrontendError(
                f"dimensions of input {name!r} must be positive, got {dims} in {text!r}"
            )
        if name in shapes:
            raise FrontendError(f"input {name!r} is given twice in {text!r}")
        shapes[name] = dims
    return shapes


# --------------------------------------------------------------------------------------------
# Clip canonicalization
# --------------------------------------------------------------------------------------------


class _ConstantBoundClip(_onnx_frontend.Clip):
    """TVM's ``Clip`` converter, except that constant bounds give ``relax.op.clip``.

    Upstream imports ``Clip`` as ``call_tir`` of generated ``maximum``/``minimum`` PrimFuncs
    (plus ``where(isnan(bound), ±inf, bound)`` for opset >= 11), which graph passes cannot
    pattern-match as a clip (ReLU6, hard-swish, ...). When both bounds are absent or scalar
    constants (always, in the models we know) this emits ``R.clip(x, lo, hi)`` instead, with
    the same semantics: a NaN bound means "unbounded", like ONNX Runtime. Anything else (a
    run-time bound, ``lo > hi`` where ONNX and ``topi.clip`` disagree) falls back upstream.
    """

    @classmethod
    def _impl_v1(cls, bb, inputs, attr, params):
        lo = float(attr.get("min", -np.inf))
        hi = float(attr.get("max", np.inf))
        out = cls._relax_clip(inputs[0], lo, hi)
        return out if out is not None else super()._impl_v1(bb, inputs, attr, params)

    @classmethod
    def _impl_v13(cls, bb, inputs, attr, params):  # upstream _impl_v11 calls cls._impl_v13
        bounds = []
        for bound in (inputs[1] if len(inputs) > 1 else None,
                      inputs[2] if len(inputs) > 2 else None):
            if bound is None:
                bounds.append(None)
            elif isinstance(bound, tvm.ir.GenericConst) and bound.value.numpy().size == 1:
                bounds.append(bound.value.numpy().reshape(()).item())
            else:
                return super()._impl_v13(bb, inputs, attr, params)
        out = cls._relax_clip(inputs[0], *bounds)
        return out if out is not None else super()._impl_v13(bb, inputs, attr, params)

    @staticmethod
    def _relax_clip(x: relax.Expr, lo: Any, hi: Any) -> relax.Expr | None:
        dtype = str(getattr(x.ty, "dtype", ""))  # x.ty.dtype is a PrimType: T.float32
        if re.fullmatch(r"u?int(8|16|32|64)", dtype):
            info = np.iinfo(dtype)
            lo = int(info.min) if lo is None else int(lo)
            hi = int(info.max) if hi is None else int(hi)
        elif re.fullmatch(r"(b?float)(16|32|64)", dtype):
            lo = -math.inf if lo is None or math.isnan(lo) else float(lo)
            hi = math.inf if hi is None or math.isnan(hi) else float(hi)
        else:
            return None
        if lo > hi:
            return None
        return relax.op.clip(x, lo, hi)


_CONVERT_MAP_LOCK = threading.Lock()


@contextlib.contextmanager
def _canonical_converters() -> Iterator[None]:
    """Temporarily make TVM's ONNX importer use :class:`_ConstantBoundClip` for ``Clip``.

    The importer looks its converters up through the module-level ``_get_convert_map()`` at
    every node, so replacing that function for the duration of one ``from_onnx`` call is
    enough; the original is restored afterwards. A lock serializes concurrent imports.
    """
    with _CONVERT_MAP_LOCK:
        original = _onnx_frontend._get_convert_map

        def convert_map() -> dict:
            table = original()
            table["Clip"] = _ConstantBoundClip
            return table

        _onnx_frontend._get_convert_map = convert_map
        try:
            yield
        finally:
            _onnx_frontend._get_convert_map = original


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _read_model(path_or_model: Any) -> tuple[onnx.ModelProto, str, Path | None]:
    """The model (a copy, never the caller's object), a label for messages, and its path."""
    if isinstance(path_or_model, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(path_or_model)
        label = f"ONNX model {model.graph.name!r}" if model.graph.name else "ONNX model"
        return model, label, None
    if not isinstance(path_or_model, (str, os.PathLike)):
        raise FrontendError(
            "load_onnx expects a path to an .onnx file or an onnx.ModelProto, got "
            f"{type(path_or_model).__name__}"
        )
    path = Path(path_or_model)
    label = f"ONNX file {str(path)!r}"
    if not path.exists():
        raise FrontendError(f"{label} does not exist")
    if not path.is_file():
        raise FrontendError(f"{label} is not a file")
    if path.stat().st_size == 0:
        raise FrontendError(f"{label} is empty")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # protobuf DecodeError, external-data errors, ...
        raise FrontendError(
            f"{label} is not a valid ONNX model (malformed or truncated file?): "
            f"{type(err).__name__}: {err}"
        ) from None
    return model, label, path


def _check_model(model: onnx.ModelProto, label: str, path: Path | None) -> None:
    if not model.graph.node and not model.graph.output:
        raise FrontendError(f"{label} is not a valid ONNX model: it has no graph")
    try:
        if path is not None and model.ByteSize() > onnx.checker.MAXIMUM_PROTOBUF:
            onnx.checker.check_model(str(path))
        else:
            onnx.checker.check_model(model)
    except Exception as err:
        msg = str(err).strip().splitlines()
        hint = " (malformed or truncated file?)" if path is not None else ""
        raise FrontendError(
            f"{label} is not a valid ONNX model{hint}: onnx.checker: "
            f"{msg[0] if msg else type(err).__name__}"
        ) from None


def _iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """All nodes, including those of subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _iter_nodes(sub)


def _check_supported_ops(model: onnx.ModelProto, label: str) -> None:
    supported = set(_onnx_frontend._get_convert_map()) | {"If", "Constant"}
    missing: dict[str, int] = {}
    for node in _iter_nodes(model.graph):
        if node.op_type not in supported:
            key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") \
                else node.op_type
            missing[key] = missing.get(key, 0) + 1
    if missing:
        listed = ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})"
                           for op, n in sorted(missing.items()))
        raise FrontendError(
            f"{label} uses ONNX operators that TVM's ONNX importer does not support: {listed}"
        )


def _dim_text(dim: int | str | None) -> str:
    return "?" if dim is None else str(dim)


def _graph_inputs(
    model: onnx.ModelProto, label: str
) -> list[tuple[str, list[int | str | None] | None, str]]:
    """(name, dims or None for unknown rank, dtype) of each input that is not an initializer.

    A dimension is an int when static, its symbolic name (``dim_param``) or ``None`` when not.
    """
    initializers = {t.name for t in model.graph.initializer}
    initializers |= {t.name for t in model.graph.sparse_initializer}
    result = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        if value.type.WhichOneof("value") != "tensor_type":
            raise FrontendError(
                f"{label}: input {value.name!r} is not a tensor "
                f"({value.type.WhichOneof('value')}); only tensor inputs are supported"
            )
        tensor_type = value.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)).name
        except Exception:
            raise FrontendError(
                f"{label}: input {value.name!r} has an unsupported element type "
                f"{tensor_type.elem_type}"
            ) from None
        dims: list[int | str | None] | None = None
        if tensor_type.HasField("shape"):
            dims = []
            for dim in tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    dims.append(int(dim.dim_value))
                elif dim.HasField("dim_param") and dim.dim_param:
                    dims.append(dim.dim_param)
                else:
                    dims.append(None)
        result.append((value.name, dims, dtype))
    return result


def _static_inputs(
    model: onnx.ModelProto, label: str, input_shapes: dict[str, tuple[int, ...]] | None
) -> list[InputInfo]:
    """Resolve every graph input to a static shape, or explain what is missing."""
    graph_inputs = _graph_inputs(model, label)
    names = [name for name, _, _ in graph_inputs]
    given: dict[str, tuple[int, ...]] = {}
    for name, shape in (input_shapes or {}).items():
        try:
            dims = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise FrontendError(
                f"shape for input {name!r} must be a sequence of integers, got {shape!r}"
            ) from None
        if any(d <= 0 for d in dims):
            raise FrontendError(f"shape for input {name!r} must be positive, got {dims}")
        given[name] = dims
    unknown = [name for name in given if name not in names]
    if unknown:
        raise FrontendError(
            f"{label} has no input named {', '.join(map(repr, unknown))}; its inputs are: "
            f"{', '.join(map(repr, names)) or '(none)'}"
        )

    infos: list[InputInfo] = []
    dynamic: list[str] = []
    for name, dims, dtype in graph_inputs:
        if name in given:
            shape = given[name]
            if dims is not None:
                if len(dims) != len(shape):
                    raise FrontendError(
                        f"{label}: input {name!r} has rank {len(dims)} "
                        f"[{', '.join(map(_dim_text, dims))}] but the given shape {shape} has "
                        f"rank {len(shape)}"
                    )
                for axis, (want, got) in enumerate(zip(dims, shape)):
                    if isinstance(want, int) and want != got:
                        raise FrontendError(
                            f"{label}: input {name!r} has dimension {axis} fixed to {want} "
                            f"but the given shape {shape} says {got}"
                        )
            infos.append(InputInfo(name, shape, dtype))
        elif dims is not None and all(isinstance(d, int) for d in dims):
            infos.append(InputInfo(name, tuple(dims), dtype))  # type: ignore[arg-type]
        else:
            if dims is None:
                example = f"{name}:d0,d1,..."
                dynamic.append(f"input {name!r} has unknown rank; give e.g. "
                               f"--input-shapes {example}")
            else:
                example = ",".join(str(d) if isinstance(d, int) else f"d{i}"
                                   for i, d in enumerate(dims))
                dynamic.append(
                    f"input {name!r} has dynamic dimensions "
                    f"[{', '.join(map(_dim_text, dims))}]; give e.g. "
                    f"--input-shapes {name}:{example}"
                )
    if dynamic:
        raise FrontendError(
            f"{label} needs static input shapes: " + "; ".join(dynamic)
            + f" ({_SHAPES_SYNTAX}; in Python: input_shapes={{name: (d0, d1, ...)}})"
        )
    return infos


def _slim(model: onnx.ModelProto, label: str, inputs: list[InputInfo]) -> onnx.ModelProto:
    """Fix the input shapes and fold shape arithmetic with onnxslim."""
    import onnxslim  # imported lazily: it is slow to import and only needed here

    shapes = [f"{info.name}:{','.join(map(str, info.shape))}" for info in inputs if info.shape]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    # onnxslim's shape inference returns None for opset < 7 and then crashes; such old models
    # are slimmed without it (shape-arithmetic folding is weaker, they rarely need it).
    options = {"no_shape_infer": True} if opset < 7 else {}
    try:
        slimmed = onnxslim.slim(model, input_shapes=shapes or None, **options)
    except Exception as err:
        raise FrontendError(
            f"{label}: onnxslim failed to fix the input shapes and fold the shape arithmetic: "
            f"{type(err).__name__}: {err}"
        ) from None
    if slimmed is None:
        raise FrontendError(f"{label}: onnxslim returned no model")
    return slimmed


_CONVERT_ERROR = re.compile(r"Error converting operator (\S+?),")


def _import(model: onnx.ModelProto, label: str, inputs: list[InputInfo]) -> tvm.IRModule:
    shape_dict = {info.name: list(info.shape) for info in inputs}
    dtype_dict = {info.name: info.dtype for info in inputs}
    captured = io.StringIO()  # the importer print()s the failing op before re-raising
    try:
        with _canonical_converters(), contextlib.redirect_stdout(captured):
            mod = relax.frontend.onnx.from_onnx(
                model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False
            )
    except tvm.error.OpNotImplemented as err:
        raise FrontendError(f"{label}: {err}") from None
    except Exception as err:
        found = _CONVERT_ERROR.findall(captured.getvalue())
        where = f" while converting a {found[-1]!r} node" if found else ""
        first = (str(err).strip().splitlines() or [""])[0]
        raise FrontendError(
            f"{label}: TVM's ONNX importer failed{where}: {type(err).__name__}: {first}"
        ) from err
    return mod


def load_onnx(
    path_or_model: str | os.PathLike | onnx.ModelProto,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
) -> tuple[tvm.IRModule, dict[str, np.ndarray], list[InputInfo]]:
    """Load an ONNX model into a Relax module with static shapes and embedded weights.

    Parameters
    ----------
    path_or_model : str, os.PathLike or onnx.ModelProto
        The ``.onnx`` file (external data next to it is loaded too) or a model in memory
        (which is copied, never modified).
    input_shapes : dict of str to tuple of int, optional
        Static shapes by ONNX input name (see :func:`parse_input_shapes`). Needed for every
        input with a dynamic dimension; optional for static inputs (must then agree).

    Returns
    -------
    mod : tvm.IRModule
        ``mod["main"]`` takes the graph inputs in order (initializers excluded); weights are
        constants (``tvm.ir.GenericConst``) in the graph; constants are folded; ``Clip``
        with constant bounds is ``R.clip``; no helper ``PrimFunc`` is left.
    params : dict of str to numpy.ndarray
        Always empty: the weights are embedded in ``mod``. Kept in the return value for API
        stability (a future option may keep weights as parameters).
    inputs : list of InputInfo
        Name, static shape and dtype of each graph input, in ``mod["main"]``'s order.

    Raises
    ------
    FrontendError
        For a missing, malformed or truncated file; an input shape that is missing, unknown
        or inconsistent; operators TVM does not support; or an importer failure.
    """
    model, label, path = _read_model(path_or_model)
    _check_model(model, label, path)
    _check_supported_ops(model, label)
    inputs = _static_inputs(model, label, input_shapes)

    model = _slim(model, label, inputs)
    _check_supported_ops(model, label)  # onnxslim's fusions must not leave us unsupported ops
    mod = _import(model, label, inputs)

    mod = relax.transform.FoldConstant()(mod)
    mod = relax.transform.DeadCodeElimination(["main"])(mod)
    try:
        relax.analysis.well_formed(mod)  # raises on the first violation (0.27: no bool)
    except Exception as err:
        raise FrontendError(f"{label}: the imported Relax module is not well formed: {err}") \
            from err
    return mod, {}, inputs
