"""tvmquant's Relax passes: each usable alone in a ``tvm.transform.Sequential``."""

from .analysis import Layer, QuantPlan, layer_names, plan_quantization
from .differentiable_form import DifferentiableForm
from .expose_observed_tensors import ExposeObservedTensors
from .fold_batch_norm import FoldBatchNorm
from .insert_fake_quant import InsertFakeQuant
from .lower_to_integer_only import LowerToIntegerOnly
from .pipeline import canonicalize_pipeline, quantize_pipeline

__all__ = [
    "DifferentiableForm",
    "ExposeObservedTensors",
    "FoldBatchNorm",
    "InsertFakeQuant",
    "Layer",
    "LowerToIntegerOnly",
    "QuantPlan",
    "canonicalize_pipeline",
    "layer_names",
    "plan_quantization",
    "quantize_pipeline",
]
