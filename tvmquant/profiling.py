"""Per-kernel time of a compiled Relax module: which kernels a model spends its time in.

TVM 0.27's Relax VM has no profiler of its own; this one uses the VM's instrumentation hook
(called before and after every VM call) to time each kernel call with ``perf_counter``.
The hook itself costs a few microseconds per call, so the sum of kernel times slightly
exceeds a plain run; use it to rank kernels, and ``time_evaluator`` for end-to-end numbers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax

from .targets import request_amx_permission


@dataclass
class KernelTime:
    """Time spent in one kernel (or VM builtin), per inference."""

    name: str
    calls: int = 0
    ms: float = 0.0
    shapes: list[tuple[tuple[int, ...], str]] = field(default_factory=list)
    """Shapes and dtypes of the arguments of its first call (outputs last)."""


def _shapes(args) -> list[tuple[tuple[int, ...], str]]:
    out = []
    for a in args:
        if hasattr(a, "shape") and hasattr(a, "dtype"):
            out.append((tuple(int(s) for s in a.shape), str(a.dtype)))
    return out


def profile_kernels(ex, inputs: Sequence[np.ndarray], *, repeat: int = 5,
                    device=None) -> list[KernelTime]:
    """Run ``main`` ``repeat`` times (after one warm-up); per-kernel times, largest first."""
    request_amx_permission()
    vm = relax.VirtualMachine(ex, device or tvm.cpu())
    args = [tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs]
    vm["main"](*args)
    table: dict[str, KernelTime] = {}
    started: dict[str, float] = {}

    def instrument(_func, symbol, before, _ret, *call_args):
        if before:
            started[symbol] = time.perf_counter()
            return 0
        entry = table.get(symbol)
        if entry is None:
            entry = table[symbol] = KernelTime(symbol, shapes=_shapes(call_args))
        entry.calls += 1
        entry.ms += (time.perf_counter() - started.pop(symbol)) * 1e3
        return 0

    vm.set_instrument(instrument)
    for _ in range(repeat):
        vm["main"](*args)
    for entry in table.values():
        entry.ms /= repeat
        entry.calls //= repeat
    return sorted(table.values(), key=lambda e: -e.ms)


def format_profile(rows: Sequence[KernelTime], top: int = 15) -> str:
    """A text table of the ``top`` kernels and the share of the total."""
    total = sum(r.ms for r in rows) or 1.0
    lines = [f"{'ms':>8} {'share':>6} {'calls':>5}  kernel"]
    for r in rows[:top]:
        name = r.name if len(r.name) <= 70 else r.name[:67] + "..."
        lines.append(f"{r.ms:8.3f} {r.ms / total:6.1%} {r.calls:5d}  {name}")
    lines.append(f"{total:8.3f} {'':6} {sum(r.calls for r in rows):5d}  total")
    return "\n".join(lines)
