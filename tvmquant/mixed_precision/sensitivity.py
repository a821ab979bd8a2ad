"""Per-layer sensitivity to weight quantization, without labels.

Two measures, both against the float model's own outputs on calibration data:

``kl`` (ZeroQ)
    Quantize only that layer's weights at that precision, run the model, and take the
    divergence of its output from the float output (:func:`output_divergence`), averaged over
    the samples. One compiled float module serves every layer and precision: the anchors'
    weights are lifted into function parameters (:func:`lift_weights`).
``kl`` in the int8 context (``kl-int8``)
    The change from the uniform int8 model's divergence when one layer moves off int8, with
    every tensor the integer graph quantizes simulated (:mod:`.simulate`): what moving a
    layer costs (or, for float, gains) where the other layers' errors compound with it.
``measured``
    The real thing, slowly: quantize the model through the whole pipeline (calibration,
    integer lowering, build) with that one layer at that precision and every other layer
    int8, run it, and take the divergence minus the uniform int8 model's. Catches what the
    lifted module does not model (a float layer changes how its neighbours are quantized);
    one calibration and build per layer and precision (:func:`measured_sensitivity`).
``hessian`` (HAWQ-V2)
    ``Omega = Tr(H) / n * ||Q(W) - W||^2`` with ``H`` the Hessian of the loss
    ``0.5 * mean((f(x; W) - f(x; W_float))^2)`` with respect to the layer's ``n`` weights,
    estimated by Hutchinson's method ``Tr(H) = E[v^T H v]`` over Rademacher vectors ``v``.
    Gradients come from Relax's own ``Gradient`` pass (after
    :class:`~tvmquant.passes.DifferentiableForm`); Hessian-vector products are central
    differences of gradients, ``H v ~ (g(W + e v) - g(W - e v)) / 2e``.

Results are cached in a JSON file keyed by the model, the data and the settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .._compat import static_shape
from ..io import atomic_write_json
from ..numerics import dequantize
from ..passes import DifferentiableForm
from ..passes.analysis import emit_like
from ..passes.insert_fake_quant import quantize_weight
from .layers import LayerSource, weight_spec

logger = logging.getLogger(__name__)


_CODE_RANGE = {"uint8": (0, 255), "int8": (-128, 127), "int16": (-32768, 32767)}


@relax.expr_functor.mutator
class _LiftWeights(relax.PyExprMutator):
    def __init__(self, mod, params: dict, acts: dict):
        super().__init__(mod)
        self.params = params
        self.acts = acts  # layer output var -> (param [enable, scale, zp, 0], qmin, qmax)

    def visit_var_binding_(self, binding):
        param = self.params.get(binding.var)
        if param is None:
            super().visit_var_binding_(binding)
        else:
            call = binding.value
            new = relax.Call(call.op, [self.visit_expr(call.args[0]), param], call.attrs,
                             call.ty_args)
            self.set_var_remap(binding.var, emit_like(self.builder_, binding.var, new))
        act = self.acts.get(binding.var)
        if act is not None:
            self.set_var_remap(binding.var, self._fake_quant(self.visit_expr(binding.var),
                                                              *act))

    def _fake_quant(self, y, p, qmin, qmax):
        """``y + enable * (dequantize(quantize(y)) - y)``: ``y`` itself while disabled."""
        bb = self.builder_

        def item(i):
            return bb.emit(relax.op.take(p, relax.const(np.array([i], np.int64), "int64"),
                                         axis=0, mode="clip"))

        enable, scale, zp = item(0), item(1), item(2)
        q = bb.emit(relax.op.add(relax.op.round(relax.op.divide(y, scale)), zp))
        q = bb.emit(relax.op.clip(q, qmin, qmax))
        dq = bb.emit(relax.op.multiply(relax.op.subtract(q, zp), scale))
        delta = bb.emit(relax.op.multiply(relax.op.subtract(dq, y), enable))
        return bb.emit(relax.op.add(y, delta))


def lift_weights(float_mod: tvm.IRModule, sources: Sequence[LayerSource],
                 func_name: str = "main", *, activations: bool = False) -> tvm.IRModule:
    """``main(*inputs, *weights[, *activation_qparams])``: the anchors' constant weights
    become parameters; with ``activations``, each layer's output also passes through a
    fake quantization switched by a parameter ``[enable, scale, zero point, 0]`` (off:
    the float value, exactly), so one compiled module quantizes any single layer."""
    func = float_mod[func_name]
    params = {s.var: relax.Var(f"w_{s.info.name}",
                               relax.TensorType(s.weight.shape, str(s.weight.dtype)))
              for s in sources}
    acts, act_params = {}, []
    if activations:
        for s in sources:
            if isinstance(s.output, relax.DataflowVar):  # (not a model output)
                p = relax.Var(f"a_{s.info.name}", relax.TensorType((4,), "float32"))
                qmin, qmax = _CODE_RANGE.get(s.output_qparams[2], (0, 255))
                acts[s.output] = (p, qmin, qmax)
                act_params.append(p)
            else:
                act_params.append(relax.Var(f"a_{s.info.name}",
                                            relax.TensorType((4,), "float32")))
    lifted = _LiftWeights(float_mod, params, acts).visit_expr(func)
    new = relax.Function(list(lifted.params) + [params[s.var] for s in sources] + act_params,
                         lifted.body, lifted.ret_ty, lifted.is_pure, lifted.attrs)
    return tvm.IRModule({func_name: new})


def fake_quant_weight(w: np.ndarray, precision: str, op: str) -> np.ndarray:
    """The float weight a precision leaves (dequantized codes); float returns ``w``."""
    spec = weight_spec(precision)
    if spec is None:
        return w
    q, s, z, axis = quantize_weight(w, spec, op)
    return dequantize(q, np.asarray(s, np.float32), np.asarray(z, np.int32),
                      axis=axis if np.ndim(s) else None).astype(np.float32)


def output_divergence(ref: Sequence[np.ndarray], out: Sequence[np.ndarray]) -> float:
    """How far ``out`` is from ``ref`` (the float outputs), as a KL divergence.

    Outputs that are distributions over their last axis (non-negative, summing to 1: softmax
    heads) use the KL divergence of those; outputs in [0, 1] (sigmoid maps) use the mean
    Bernoulli KL of each value; anything else is turned into a distribution by a softmax
    over the last axis first (trailing axes of size 1 are dropped first: a pooled
    ``(N, C, 1, 1)`` output is compared over its channels). Averaged over outputs.
    """
    eps = 1e-7
    total = []
    for r, o in zip(ref, out):
        r, o = np.asarray(r, np.float64), np.asarray(o, np.float64)
        while r.ndim > 1 and r.shape[-1] == 1:  # (N, C, 1, 1) pooled features: over C
            r, o = r[..., 0], o[..., 0]
        if r.min() >= 0 and np.allclose(r.sum(axis=-1), 1.0, atol=1e-3):
            p, q = np.clip(r, eps, 1), np.clip(o, eps, 1)
            q = q / q.sum(axis=-1, keepdims=True)
            total.append(float(np.mean(np.sum(p * np.log(p / q), axis=-1))))
        elif r.min() >= 0 and r.max() <= 1:
            p, q = np.clip(r, eps, 1 - eps), np.clip(o, eps, 1 - eps)
            kl = p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))
            total.append(float(np.mean(kl)))
        else:
            def softmax(x):
                e = np.exp(x - x.max(axis=-1, keepdims=True))
                return e / e.sum(axis=-1, keepdims=True)
            p, q = softmax(r), softmax(o)
            total.append(float(np.mean(np.sum(p * np.log((p + eps) / (q + eps)), axis=-1))))
    return float(np.mean(total))


def _flatten(out) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    return [a for item in out for a in _flatten(item)]


def cache_key(float_mod, samples, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(tvm.ir.save_json(float_mod).encode())
    for sample in samples:
        for name in sorted(sample):
            h.update(name.encode())
            h.update(np.ascontiguousarray(sample[name]).tobytes())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


class SensitivityCache:
    """``{key: {layer: {precision: value}}}`` in a JSON file (written atomically)."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path is not None else None
        self.data: dict = {}
        if self.path is not None and self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                logger.warning("sensitivity cache %s is unreadable; measuring again", self.path)

    def get(self, key):
        return self.data.get(key)

    def put(self, key, value):
        self.data[key] = value
        if self.path is not None:
            atomic_write_json(self.path, self.data)


def kl_sensitivity(float_mod: tvm.IRModule, sources: Sequence[LayerSource],
                   samples: Sequence[dict], precisions: Sequence[str], *, target="llvm",
                   progress: bool = True, cache: SensitivityCache | None = None,
                   activations: bool = True) -> dict[str, dict[str, float]]:
    """ZeroQ-style sensitivity ``{layer: {precision: divergence}}``.

    Only that layer is quantized (float scores 0): its weights at the precision and, with
    ``activations``, its output on the int8 model's grid (``LayerSource.output_qparams``),
    as the integer graph would; a layer left in float keeps both in float. Without
    ``activations`` the measure is of the weights alone. (The change from uniform int8,
    with everything else quantized: :func:`.simulate.assignment_sensitivity`.)
    """
    from ..api import build
    from ..calibration.runner import check_sample, input_signature

    key = "kl-" + cache_key(float_mod, samples, {
        "precisions": list(precisions), "activations": bool(activations),
        "grids": [list(s.output_qparams) for s in sources] if activations else []})
    if cache is not None and (hit := cache.get(key)) is not None and \
            set(hit) >= {s.info.name for s in sources}:
        return hit
    signature = input_signature(float_mod)
    inputs = [[tvm.runtime.tensor(np.ascontiguousarray(a))
               for a in check_sample(s, signature, i)] for i, s in enumerate(samples)]
    vm = relax.VirtualMachine(build(lift_weights(float_mod, sources, activations=activations),
                                    target), tvm.cpu())
    weights = [tvm.runtime.tensor(s.weight) for s in sources]
    off = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
    if activations:
        weights += [tvm.runtime.tensor(off) for _ in sources]
    refs = [_flatten(vm["main"](*x, *weights)) for x in inputs]
    n = len(sources)
    out: dict[str, dict[str, float]] = {}
    from tqdm.auto import tqdm

    work = [(i, p) for i in range(n) for p in precisions if p != "float"]
    for i, precision in tqdm(work, desc="sensitivity (kl)", unit="run", disable=not progress):
        src = sources[i]
        row = out.setdefault(src.info.name, {"float": 0.0} if "float" in precisions else {})
        trial = list(weights)
        trial[i] = tvm.runtime.tensor(fake_quant_weight(src.weight, precision, src.info.op))
        if activations:
            scale, zp, _ = src.output_qparams
            trial[n + i] = tvm.runtime.tensor(np.array([1.0, scale, zp, 0.0], np.float32))
        row[precision] = float(np.mean([
            output_divergence(ref, _flatten(vm["main"](*x, *trial)))
            for x, ref in zip(inputs, refs)]))
    for src in sources:  # layers with only float candidates
        out.setdefault(src.info.name, {"float": 0.0})
    if cache is not None:
        cache.put(key, out)
    return out


def measured_sensitivity(mod: tvm.IRModule, names: Sequence[str],
                         calibration: Sequence[dict], samples: Sequence[dict],
                         precisions: Sequence[str], *, base=None, target="llvm",
                         progress: bool = True, cache: SensitivityCache | None = None
                         ) -> dict[str, dict[str, float]]:
    """``{layer: {precision: divergence - uniform int8's}}`` through the real pipeline.

    Each (layer, precision) other than int8 is quantized with
    :func:`~tvmquant.mixed_precision.layers.assignment_config` (``base`` elsewhere),
    calibrated on ``calibration``, built for ``target`` and run on ``samples``; the value is
    its mean :func:`output_divergence` from the float model minus the uniform int8
    model's (int8 is 0; negative means closer to float than uniform int8).
    """
    from tqdm.auto import tqdm

    from ..api import build, quantize, run
    from ..calibration.runner import check_sample, input_signature
    from ..passes import canonicalize_pipeline
    from .layers import assignment_config

    key = "measured-" + cache_key(mod, list(calibration) + list(samples), {
        "precisions": list(precisions), "names": list(names),
        "base": repr(base), "target": str(target)})
    if cache is not None and (hit := cache.get(key)) is not None and set(hit) >= set(names):
        return hit
    signature = input_signature(mod)
    feeds = [check_sample(s, signature, i) for i, s in enumerate(samples)]
    float_ex = build(canonicalize_pipeline()(mod), target)
    refs = [run(float_ex, x) for x in feeds]

    def divergence(assignment):
        q = quantize(mod, calibration, assignment_config(assignment, base), progress=False)
        ex = build(q, target)
        return float(np.mean([output_divergence(ref, run(ex, x))
                              for x, ref in zip(feeds, refs)]))

    uniform = divergence({})
    out = {name: {"int8": 0.0} for name in names}
    work = [(n, p) for n in names for p in precisions if p != "int8"]
    for name, precision in tqdm(work, desc="sensitivity (measured)", unit="build",
                                disable=not progress):
        out[name][precision] = divergence({name: precision}) - uniform
    if cache is not None:
        cache.put(key, out)
    return out


def loss_module(float_mod: tvm.IRModule, sources: Sequence[LayerSource]) -> tvm.IRModule:
    """``main_loss(*inputs, *refs, *weights) = 0.5 * mean((f - ref)^2)`` and its adjoint."""
    lifted = DifferentiableForm()(lift_weights(float_mod, sources))
    func = lifted["main"]
    n_in = len(func.params) - len(sources)
    outs = func.body.body
    out_fields = list(outs.fields) if isinstance(outs, relax.Tuple) else [outs]
    bb = relax.BlockBuilder()
    refs = [relax.Var(f"ref{i}", relax.TensorType(static_shape(o), "float32"))
            for i, o in enumerate(out_fields)]
    params = list(func.params[:n_in]) + refs + list(func.params[n_in:])
    with bb.function("main_loss", params):
        with bb.dataflow():
            for block in func.body.blocks:
                for binding in block.bindings:
                    bb.emit_normalized(binding)
            total = None
            count = sum(int(np.prod(static_shape(o))) for o in out_fields)
            for o, r in zip(out_fields, refs):
                d = bb.emit(relax.op.subtract(o, r))
                s = bb.emit(relax.op.sum(relax.op.multiply(d, d)))
                total = s if total is None else bb.emit(relax.op.add(total, s))
            loss = bb.emit_output(relax.op.multiply(total, relax.const(0.5 / count,
                                                                       "float32")))
        bb.emit_func_output(loss)
    mod = bb.get()
    mod = relax.transform.Gradient("main_loss", require_grads=params[-len(sources):])(mod)
    return mod


def hutchinson_traces(float_mod: tvm.IRModule, sources: Sequence[LayerSource],
                      samples: Sequence[dict], *, vectors: int = 16, step: float = 1e-2,
                      target="llvm", seed: int = 0, progress: bool = True
                      ) -> dict[str, float]:
    """Hutchinson estimates of ``Tr(H_l)`` per layer (the loss of :func:`loss_module`).

    ``step`` is the finite-difference step relative to each layer's RMS weight.
    """
    from ..api import build
    from ..calibration.runner import check_sample, input_signature

    try:
        mod = loss_module(float_mod, sources)
    except tvm.error.TVMError as err:  # an op without a gradient
        raise ValueError(f"Hessian sensitivity needs gradients, and TVM's Gradient pass "
                         f"failed on this model: {str(err).splitlines()[-1]}. Use the 'kl' "
                         "sensitivity instead.") from None
    ex = build(mod, target, kernels=False)  # float only: no integer kernels to dispatch
    vm = relax.VirtualMachine(ex, tvm.cpu())
    fwd = relax.VirtualMachine(build(lift_weights(float_mod, sources), target), tvm.cpu())
    signature = input_signature(float_mod)
    ws = [s.weight.astype(np.float32) for s in sources]
    wt = [tvm.runtime.tensor(w) for w in ws]
    data = []
    for i, s in enumerate(samples):
        x = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in check_sample(s, signature, i)]
        refs = [tvm.runtime.tensor(r) for r in _flatten(fwd["main"](*x, *wt))]
        data.append(x + refs)
    eps = [step * float(np.sqrt(np.mean(w.astype(np.float64) ** 2)) or 1.0) for w in ws]
    rng = np.random.default_rng(seed)
    acc = np.zeros(len(sources))

    def grads(args, shifted):
        g = None
        for d in args:
            out = vm["main_loss_adjoint"](*d, *shifted)
            gs = [a.numpy().astype(np.float64) for a in out[1]]
            g = gs if g is None else [a + b for a, b in zip(g, gs)]
        return [a / len(args) for a in g]

    from tqdm.auto import tqdm

    for _ in tqdm(range(vectors), desc="sensitivity (hessian)", unit="vector",
                  disable=not progress):
        vs = [rng.choice(np.array([-1.0, 1.0], np.float32), size=w.shape) for w in ws]
        plus = [tvm.runtime.tensor((w + e * v).astype(np.float32)) for w, e, v in
                zip(ws, eps, vs)]
        minus = [tvm.runtime.tensor((w - e * v).astype(np.float32)) for w, e, v in
                 zip(ws, eps, vs)]
        gp, gm = grads(data, plus), grads(data, minus)
        for i, (v, a, b, e) in enumerate(zip(vs, gp, gm, eps)):
            # v_l^T (H D v)_l / e_l with D = diag(e): unbiased for Tr(H_ll)
            acc[i] += float(np.sum(v * (a - b))) / (2 * e)
    return {s.info.name: float(t / vectors) for s, t in zip(sources, acc)}


def hessian_sensitivity(traces: dict[str, float], sources: Sequence[LayerSource],
                        precisions: Sequence[str]) -> dict[str, dict[str, float]]:
    """HAWQ-V2's ``Omega = Tr(H) / n * ||Q(W) - W||^2`` per layer and precision."""
    out = {}
    for src in sources:
        n = src.weight.size
        row = {}
        for p in precisions:
            dq = fake_quant_weight(src.weight, p, src.info.op)
            row[p] = max(0.0, traces[src.info.name]) / n * float(
                np.sum((dq.astype(np.float64) - src.weight) ** 2))
        out[src.info.name] = row
    return out


__all__ = ["SensitivityCache", "fake_quant_weight", "hessian_sensitivity",
           "hutchinson_traces", "kl_sensitivity", "lift_weights", "loss_module",
           "measured_sensitivity", "output_divergence"]
