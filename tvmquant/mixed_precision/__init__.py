"""Hardware-aware mixed precision (HAWQ-V3 style).

Per layer and candidate precision (float, int8, int4 weights): a sensitivity measured on
calibration data (:mod:`.sensitivity`: ZeroQ's output divergence or HAWQ-V2's Hessian trace by
Hutchinson; :mod:`.simulate`: any assignment's quantization, every tensor, on one
module), a latency measured on the target with tvmquant's kernels (:mod:`.latency`, a
cached lookup table), exact size and BOPs (:mod:`.layers`); an integer linear program picks one
precision per layer under latency / size / BOPs budgets (:mod:`.ilp`, ``scipy.optimize.milp``).
:func:`search` runs the whole loop and returns the quantized, compiled choice; the CLI is
``tvmquant mixed-precision``.
"""

from .ilp import Budget, InfeasibleBudget, pareto_sweep, parse_budget, solve
from .latency import LatencyTable
from .layers import PRECISIONS, LayerInfo, anchor_layers, assignment_config
from .search import (
    LATENCY_NOISE,
    MixedPrecisionResult,
    effective_assignment,
    random_assignments,
    search,
    write_plots,
)

__all__ = [
    "LATENCY_NOISE",
    "PRECISIONS",
    "Budget",
    "InfeasibleBudget",
    "LatencyTable",
    "LayerInfo",
    "MixedPrecisionResult",
    "anchor_layers",
    "assignment_config",
    "effective_assignment",
    "pareto_sweep",
    "parse_budget",
    "random_assignments",
    "search",
    "solve",
    "write_plots",
]
