"""PNG plots of a mixed-precision search (matplotlib, written atomically)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def sensitivity_bars(sensitivity: Mapping[str, Mapping[str, float]], path: str | Path,
                     title: str = "per-layer sensitivity") -> Path:
    """Bars of each layer's sensitivity per precision that is not zero everywhere (log
    scale; symmetric log when some are negative, as the change from uniform int8 is for a
    layer that float helps)."""
    plt = _pyplot()
    layers = list(sensitivity)
    values = [v for x in layers for v in sensitivity[x].values()]
    precisions = [p for p in ("float", "int8", "int4")
                  if any(sensitivity[x].get(p, 0.0) != 0.0 for x in layers)]
    fig, ax = plt.subplots(figsize=(max(6, 0.22 * len(layers) + 2), 4))
    width = 0.8 / max(1, len(precisions))
    signed = any(v < 0 for v in values)
    for i, p in enumerate(precisions):
        xs = [j + i * width for j in range(len(layers))]
        ys = [sensitivity[x].get(p, 0.0) for x in layers]
        ax.bar(xs, ys if signed else [max(y, 1e-12) for y in ys], width, label=p)
    if signed:
        tiny = min((abs(v) for v in values if v != 0.0), default=1e-6)
        ax.set_yscale("symlog", linthresh=max(tiny, 1e-9))
        ax.axhline(0.0, color="black", linewidth=0.5)
    else:
        ax.set_yscale("log")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(layers))])
    ax.set_xticklabels(layers, rotation=90, fontsize=6)
    ax.set_ylabel("sensitivity (output divergence)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


def pareto_plot(front: Sequence[Mapping], path: str | Path, *,
                uniform: Mapping[str, tuple[float, float]] = (),
                chosen: tuple[float, float] | None = None, xlabel: str = "latency (ms)",
                title: str = "mixed precision: sensitivity against latency") -> Path:
    """The Pareto front (cost, total sensitivity), uniform assignments and the choice."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    if front:
        ax.step([p["cost"] for p in front], [p["sensitivity"] for p in front], where="post",
                marker="o", label="ILP (Pareto front)")
    for name, (cost, sens) in dict(uniform).items():
        ax.scatter([cost], [sens], marker="s", s=40, label=f"uniform {name}")
    if chosen is not None:
        ax.scatter([chosen[0]], [chosen[1]], marker="*", s=160, color="red",
                   label="chosen", zorder=5)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("total sensitivity")
    # linear below the smallest nonzero magnitude plotted, logarithmic above: no empty
    # decades between zero (uniform int8, for a change from it) and the data
    values = [p["sensitivity"] for p in front] + [v for _, v in dict(uniform).values()]
    values += [chosen[1]] if chosen is not None else []
    tiny = min((abs(v) for v in values if v != 0.0), default=1e-6)
    ax.set_yscale("symlog", linthresh=max(tiny / 2, 1e-12))
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return Path(path)


__all__ = ["pareto_plot", "sensitivity_bars"]
