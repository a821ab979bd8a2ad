"""Any per-layer precision assignment, simulated on one compiled module.

The integer graph of an assignment quantizes more than the layers' weights and outputs: the
model input, the 16-bit inputs of lookup-table activations, residual adds, concatenations,
the inputs of activation-activation matmuls. Which of those tensors are quantized, and for
which of their readers, depends on the assignment: a layer left in float reads its inputs
unquantized, and a tensor that only float layers read is not quantized at all.

:class:`AssignmentSimulator` builds the fake-quantized module of the *uniform* plan (the
spine's :class:`~tvmquant.passes.InsertFakeQuant` on the calibrated ranges) with two changes:
every anchor's weight is a parameter, and every (quantized tensor, reader) pair passes
through a switch ``x + e * (qdq(x) - x)`` whose ``e`` is one entry of an ``enable`` vector.
For an assignment, :func:`~tvmquant.passes.analysis.plan_quantization` of its config says
which pairs are quantized; the weights are the float ones or their fake quantization at the
layer's precision. One compile then serves every assignment: the ``kl-int8`` sensitivity
(each layer moved off int8 alone) and the check of a whole assignment's divergence.

What it does not model: the integer arithmetic itself (requantization rounding, lookup
tables), which the uniform int8 model shares with every assignment, and a tensor whose grid
changes with the assignment (only a lookup table left reading it: a 16-bit grid).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tvm
from tvm import relax

from ..config import QuantConfig
from ..passes.analysis import plan_quantization
from ..passes.insert_fake_quant import _FakeQuantMutator, activation_qparams
from .layers import assignment_config
from .sensitivity import _flatten, fake_quant_weight, output_divergence


@relax.expr_functor.mutator
class _SwitchedFakeQuant(_FakeQuantMutator._cls):
    """InsertFakeQuant's mutator with lifted weights and one switch per quantized use."""

    def __init__(self, mod, plan, config, qparams, weights: Mapping[str, relax.Var],
                 enable: relax.Var):
        super().__init__(mod, plan, config, qparams)
        self.weights = weights
        self.enable = enable
        self.switches: list[tuple[relax.Var, relax.Var]] = []  # (tensor, reader)
        self._reader = None

    def visit_var_binding_(self, binding):
        self._reader = binding.var
        super().visit_var_binding_(binding)

    def _fake_quant_of(self, orig):
        bb = self.builder_
        if orig not in self.fq:
            x = self.visit_expr(orig)
            self.fq[orig] = (x, bb.emit(relax.op.subtract(self._emit_act_qdq(orig), x)))
        x, delta = self.fq[orig]
        index = relax.const(np.array([len(self.switches)], np.int64), "int64")
        self.switches.append((orig, self._reader))
        e = bb.emit(relax.op.take(self.enable, index, axis=0))
        return bb.emit(relax.op.add(x, relax.op.multiply(delta, e)))

    def _emit_weight_qdq(self, layer):
        w = self.weights.get(layer.name)  # (a layer no assignment names stays int8)
        return w if w is not None else super()._emit_weight_qdq(layer)


class AssignmentSimulator:
    """Run the float model as any assignment ``{layer: float | int8 | int4}`` would
    quantize it (layers not named: int8).

    Parameters
    ----------
    float_mod : IRModule
        The canonical float module (``QuantizedModel.float_mod``).
    config : QuantConfig
        The uniform (base) config; static.
    ranges : dict
        Its calibrated ranges (``QuantizedModel.ranges``).
    sources : sequence of LayerSource
        The layers an assignment may name (:func:`~tvmquant.mixed_precision.anchor_layers`);
        the plan's other anchors stay int8.
    """

    def __init__(self, float_mod: tvm.IRModule, config: QuantConfig, ranges: dict,
                 sources: Sequence, *, target="llvm"):
        from ..api import build

        if config.dynamic:
            raise ValueError("the assignment simulator needs a static (calibrated) config")
        self.func = float_mod["main"]
        self.config = config
        self.sources = {s.info.name: s for s in sources}
        plan = plan_quantization(self.func, config)
        qparams = activation_qparams(plan, config, ranges)
        weights = {name: relax.Var(f"w_{name}", relax.TensorType(s.weight.shape,
                                                                 str(s.weight.dtype)))
                   for name, s in self.sources.items()}
        anchors = {layer.name for layer in plan.layers
                   if layer.kind == "anchor" and layer.weight is not None}
        if not set(weights) <= anchors:
            raise ValueError("not anchors with constant weights in this model: "
                             f"{sorted(set(weights) - anchors)}")
        # one switch per quantized use: counted by a first pass, then sized exactly
        counter = self._mutator(float_mod, plan, qparams, weights, 1)
        counter.visit_expr(self.func)
        mutator = self._mutator(float_mod, plan, qparams, weights, len(counter.switches))
        lifted = mutator.visit_expr(self.func)
        self.switches = mutator.switches
        func = relax.Function(list(lifted.params) + list(weights.values()) + [mutator.enable],
                              lifted.body, lifted.ret_ty, lifted.is_pure, lifted.attrs)
        self.mod = tvm.IRModule({"main": func})
        self.vm = relax.VirtualMachine(build(self.mod, target), tvm.cpu())
        self._weights: dict[tuple[str, str], tvm.runtime.Tensor] = {}

    def _mutator(self, float_mod, plan, qparams, weights, count):
        enable = relax.Var("enable", relax.TensorType((count,), "float32"))
        return _SwitchedFakeQuant(float_mod, plan, self.config, qparams, weights, enable)

    # -- assignments -----------------------------------------------------------------
    def enable_vector(self, assignment: Mapping[str, str]) -> np.ndarray:
        """Which (tensor, reader) pairs the assignment's integer graph quantizes."""
        plan = plan_quantization(self.func, assignment_config(dict(assignment), self.config))
        return np.array([1.0 if t in plan.quantized and r not in plan.float_users else 0.0
                         for t, r in self.switches], np.float32)

    def _weight(self, name: str, precision: str):
        key = (name, precision)
        if key not in self._weights:
            src = self.sources[name]
            self._weights[key] = tvm.runtime.tensor(
                fake_quant_weight(src.weight, precision, src.info.op))
        return self._weights[key]

    def arguments(self, assignment: Mapping[str, str]) -> list:
        unknown = set(assignment) - set(self.sources)
        if unknown:
            raise ValueError(f"unknown layers in the assignment: {sorted(unknown)}")
        ws = [self._weight(n, assignment.get(n, "int8")) for n in self.sources]
        return [*ws, tvm.runtime.tensor(self.enable_vector(assignment))]

    def outputs(self, inputs: Sequence, assignment: Mapping[str, str]) -> list[np.ndarray]:
        """The simulated outputs of one sample (a list of input tensors)."""
        return _flatten(self.vm["main"](*inputs, *self.arguments(assignment)))

    def prepare(self, samples: Sequence[dict]) -> tuple[list, list]:
        """Input tensors and float reference outputs of calibration-style samples."""
        from ..calibration.runner import check_sample, input_signature

        signature = input_signature(tvm.IRModule({"main": self.func}))
        inputs = [[tvm.runtime.tensor(np.ascontiguousarray(a))
                   for a in check_sample(s, signature, i)] for i, s in enumerate(samples)]
        # the float model: float weights, every switch off
        args = [self._weight(n, "float") for n in self.sources]
        args.append(tvm.runtime.tensor(np.zeros(len(self.switches), np.float32)))
        refs = [_flatten(self.vm["main"](*x, *args)) for x in inputs]
        return inputs, refs

    def divergence(self, samples: Sequence[Sequence], refs: Sequence[Sequence[np.ndarray]],
                   assignment: Mapping[str, str]) -> float:
        """Mean :func:`output_divergence` from ``refs`` (the float outputs) over samples."""
        args = self.arguments(assignment)
        return float(np.mean([output_divergence(ref, _flatten(self.vm["main"](*x, *args)))
                              for x, ref in zip(samples, refs)]))




def assignment_sensitivity(sim: AssignmentSimulator, samples: Sequence[dict],
                           precisions: Sequence[str], *, progress: bool = True,
                           cache=None, key: str | None = None
                           ) -> dict[str, dict[str, float]]:
    """``{layer: {precision: D(layer at precision, others int8) - D(uniform int8)}}``.

    ``D`` is the mean :func:`output_divergence` from the float model on ``samples``; int8
    scores 0, and float usually below 0 (what leaving the layer in float gains). ``cache``
    (a :class:`~tvmquant.mixed_precision.sensitivity.SensitivityCache`) keeps the result
    under ``key``.
    """
    from tqdm.auto import tqdm

    names = list(sim.sources)
    if cache is not None and key is not None and (hit := cache.get(key)) is not None \
            and set(hit) >= set(names):
        return hit
    inputs, refs = sim.prepare(samples)
    uniform = sim.divergence(inputs, refs, {})
    out = {name: {"int8": 0.0} for name in names}
    work = [(n, p) for n in names for p in precisions if p != "int8"]
    for name, precision in tqdm(work, desc="sensitivity (kl, int8 context)", unit="run",
                                disable=not progress):
        out[name][precision] = sim.divergence(inputs, refs, {name: precision}) - uniform
    if cache is not None and key is not None:
        cache.put(key, out)
    return out


__all__ = ["AssignmentSimulator", "assignment_sensitivity"]
