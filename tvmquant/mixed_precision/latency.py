"""Measured per-layer latencies: a lookup table keyed by target, layer shape and precision.

Each layer is rebuilt alone, the way it runs inside the integer graph: its input codes in
(with the int8 model's scale, zero point and dtype, see
:func:`~tvmquant.mixed_precision.layers.attach_qparams`),
``dequantize -> op (-> bias -> clamp) (-> activation) -> quantize`` lowered by
:class:`~tvmquant.passes.LowerToIntegerOnly` (for ``float``: left in float between the two),
compiled by :func:`tvmquant.build` for the target (so with the dispatched, scheduled kernels
and tuned records if given), and timed with ``time_evaluator``. The table is a JSON file,
written atomically after every measurement (an interrupted run keeps what it measured) and
reused by every model with a layer of the same key on the same target, as long as the
kernels are the same (:func:`kernels_fingerprint` is part of the target's key).

The end-to-end latency of an assignment is predicted as ``rest + sum of its layers`` where
``rest`` (the non-anchor ops: activations, pooling, resizes, ...) is measured once as the
uniform-int8 model's time minus the sum of its int8 layers; :func:`check_prediction`
compares that with a measured run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from ..io import atomic_write_json
from ..passes import LowerToIntegerOnly
from ..passes.insert_fake_quant import quantize_weight
from .layers import LayerSource, weight_spec

logger = logging.getLogger(__name__)


def kernels_fingerprint() -> str:
    """A digest of what a layer's latency depends on besides the target: TVM's version and
    the source of tvmquant's kernels and lowering (a table measured with older kernels is
    stale, and is not reused)."""
    import hashlib

    from .. import passes, schedules

    h = hashlib.sha256(tvm.__version__.encode())
    for package in (schedules, passes):
        for path in sorted(Path(p) for d in package.__path__ for p in Path(d).rglob("*.py")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def target_key(target: tvm.target.Target) -> str:
    """A stable string naming a target and the kernels in the table (kind, CPU, features,
    cores; :func:`kernels_fingerprint`)."""
    t = target.export() if hasattr(target, "export") else {}
    keep = {k: t[k] for k in ("kind", "mtriple", "mcpu", "mattr", "num-cores") if k in t}
    keep["kernels"] = kernels_fingerprint()
    return json.dumps(keep, sort_keys=True, default=str)


class LatencyTable:
    """``{target: {layer key: {precision: ms}}}``, persisted as JSON.

    Parameters
    ----------
    path : str or Path, optional
        The table file; loaded if it exists, written atomically on :meth:`save`. ``None``
        keeps the table in memory.
    """

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.data: dict[str, dict[str, dict[str, float]]] = {}
        if self.path is not None and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"latency table {self.path} is not valid JSON ({err}); "
                                 "delete it to measure again") from None

    def get(self, target: str, key: str, precision: str) -> float | None:
        return self.data.get(target, {}).get(key, {}).get(precision)

    def put(self, target: str, key: str, precision: str, ms: float) -> None:
        self.data.setdefault(target, {}).setdefault(key, {})[precision] = float(ms)

    def save(self) -> None:
        if self.path is not None:
            atomic_write_json(self.path, self.data)

    def __len__(self) -> int:
        return sum(len(p) for layers in self.data.values() for p in layers.values())


def layer_module(src: LayerSource, precision: str, *, lower: bool = True) -> tvm.IRModule:
    """The layer alone, 8-bit codes in and out, lowered like the integer graph lowers it;
    with the activation that alone reads it (``src.activation``), which is a lookup table
    of its codes when the layer is integer and float ops when it is float. ``lower=False``:
    the quantize/dequantize form before :class:`~tvmquant.passes.LowerToIntegerOnly`."""
    info = src.info
    (in_scale, in_zp, in_dtype), (out_scale, out_zp, out_dtype) = (src.input_qparams,
                                                                   src.output_qparams)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(info.input_shape, in_dtype))
    f32 = "float32"
    with bb.function("main", [x]):
        with bb.dataflow():
            xd = bb.emit(relax.op.dequantize(x, relax.const(in_scale, f32),
                                             relax.const(in_zp, "int32")))
            spec = weight_spec(precision)
            if spec is None:
                w = relax.const(src.weight.astype(np.float32))
            else:
                q, s, z, axis = quantize_weight(src.weight, spec, info.op)
                w = bb.emit(relax.op.dequantize(
                    relax.const(q, spec.storage_dtype), relax.const(np.asarray(s, np.float32)),
                    relax.const(np.asarray(z, np.int32)), axis=axis))
            y = bb.emit(relax.Call(src.call.op, [xd, w], src.call.attrs))
            if src.bias is not None:
                y = bb.emit(relax.op.add(y, src.bias))
            if src.clamp is not None:
                y = bb.emit(relax.Call(src.clamp.op, [y, *src.clamp.args[1:]],
                                       src.clamp.attrs))
            if src.activation:  # hard-swish & co.: a lookup table of the layer's codes
                if spec is not None:
                    y = bb.emit(relax.op.dequantize(relax.op.quantize(
                        y, relax.const(out_scale, f32), relax.const(out_zp, "int32"),
                        out_dtype=out_dtype), relax.const(out_scale, f32),
                        relax.const(out_zp, "int32")))
                remap = {src.output: y}
                for var, value in zip(src.activation, src.activation_values):
                    args = [remap.get(a, a) if isinstance(a, relax.Var) else a
                            for a in value.args]
                    remap[var] = bb.emit(relax.Call(value.op, args, value.attrs))
                y = remap[src.activation[-1]]
                out_scale, out_zp, out_dtype = src.activation_qparams
            out = bb.emit_output(relax.op.quantize(
                y, relax.const(out_scale, f32), relax.const(out_zp, "int32"),
                out_dtype=out_dtype))
        bb.emit_func_output(out)
    mod = LowerToIntegerOnly()(bb.get()) if lower else bb.get()
    return relax.transform.FoldConstant()(mod)


def time_module(ex, inputs: Sequence[np.ndarray], *, number: int = 10, repeat: int = 5,
                remote=None) -> float:
    """Median milliseconds of ``main`` (``time_evaluator``), here or on an RPC ``remote``
    (a session from :func:`tvmquant.tuning.connect_rpc`: the library is uploaded there)."""
    if remote is not None:
        # a fresh name per upload: overwriting a library the server has loaded crashes it
        name = f"tvmquant-{uuid.uuid4().hex[:12]}.so"
        with tempfile.TemporaryDirectory(prefix="tvmquant-latency-") as tmp:
            path = os.path.join(tmp, name)
            ex.export_library(path)
            remote.upload(path)
            lib = remote.load_module(name)
        dev = remote.cpu()
        vm = relax.VirtualMachine(lib, dev)
    else:
        dev = tvm.cpu()
        vm = relax.VirtualMachine(ex, dev)
    args = [tvm.runtime.tensor(np.ascontiguousarray(a), device=dev) for a in inputs]
    vm["main"](*args)
    f = vm.time_evaluator("main", dev, number=number, repeat=repeat)
    return float(f(*args).median * 1e3)


def measure_layer(src: LayerSource, precision: str, target, *, database=None,
                  number: int = 10, repeat: int = 5, remote=None) -> float:
    """Milliseconds of one layer at one precision on ``target`` (built with tvmquant.build),
    here or on an RPC ``remote``."""
    from ..api import build

    ex = build(layer_module(src, precision), target, database=database)
    rng = np.random.default_rng(0)
    dtype = np.dtype(src.input_qparams[2])
    info = np.iinfo(dtype)
    x = rng.integers(max(info.min, -128), min(info.max, 255) + 1,
                     src.info.input_shape).astype(dtype)
    return time_module(ex, [x], number=number, repeat=repeat, remote=remote)


def measure_latencies(sources: Sequence[LayerSource], precisions: Sequence[str], target,
                      table: LatencyTable, *, database=None, progress: bool = True,
                      number: int = 10, repeat: int = 5, remote=None,
                      device_key: str | None = None) -> dict[str, dict[str, float]]:
    """``{layer name: {precision: ms}}``, measuring only what ``table`` lacks.

    With an RPC ``remote`` the layers run on that device; ``device_key`` (the tracker key)
    then joins the target in the table's key, so that two boards of one target type that
    differ are not confused.
    """
    from ..targets import resolve_target

    tgt = resolve_target(target)
    tkey = target_key(tgt) + (f"@{device_key}" if device_key else "")
    todo = [(s, p) for s in sources for p in precisions
            if table.get(tkey, s.info.key(), p) is None]
    seen = set()
    todo = [(s, p) for s, p in todo if not ((s.info.key(), p) in seen
                                           or seen.add((s.info.key(), p)))]
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(todo, desc="latency", unit="layer", disable=not progress)
        for src, precision in bar:
            bar.set_postfix_str(f"{src.info.name} {precision}")
            ms = measure_layer(src, precision, tgt, database=database, number=number,
                               repeat=repeat, remote=remote)
            table.put(tkey, src.info.key(), precision, ms)
            table.save()  # after every layer: an interrupted run keeps its measurements
    return {s.info.name: {p: table.get(tkey, s.info.key(), p) for p in precisions}
            for s in sources}


def predict(assignment: dict[str, str], latencies: dict[str, dict[str, float]],
            rest_ms: float) -> float:
    """Predicted end-to-end milliseconds of an assignment."""
    return rest_ms + sum(latencies[name][p] for name, p in assignment.items())


__all__ = ["LatencyTable", "kernels_fingerprint", "layer_module", "measure_latencies",
           "measure_layer", "predict", "target_key", "time_module"]
