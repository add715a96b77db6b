"""The pictures of `moebits report`: pure functions from arrays to a PNG file.

Each function takes plain data (numpy arrays, dicts) and a path, draws one figure with matplotlib's
object API (`Figure` + the Agg canvas: no pyplot, no global backend, safe without a display) and returns
the path. `unit_grid` lays per-unit values out as the layer x expert grid the heatmaps show.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import BoundaryNorm, ListedColormap, LogNorm
from matplotlib.figure import Figure

from .units import Unit

DPI = 110


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------------- grids

def unit_grid(values: np.ndarray, units: Sequence[Unit], kind: str | None = None) -> tuple[np.ndarray, list[int], list[str]]:
    """`values [U]` of `units` as a `[layers, experts]` grid for one `kind` (None: the units' own order
    decides, the first value per expert wins, for per-expert values such as frequency). Columns are the
    routed experts `0..E-1`, then `S` for a shared expert when there is one; missing cells are NaN."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape != (len(units),):
        raise ValueError(f"values has shape {values.shape}, expected ({len(units)},)")
    layers = sorted({u.layer for u in units})
    routed = sorted({u.expert for u in units if not u.is_shared})
    has_shared = any(u.is_shared for u in units)
    cols = [str(e) for e in routed] + (["S"] if has_shared else [])
    col_of = {e: j for j, e in enumerate(routed)}
    row_of = {layer: i for i, layer in enumerate(layers)}
    grid = np.full((len(layers), len(cols)), np.nan)
    for v, u in zip(values, units):
        if kind is not None and u.kind != kind:
            continue
        j = len(routed) if u.is_shared else col_of[u.expert]
        if kind is None and not np.isnan(grid[row_of[u.layer], j]):
            continue
        grid[row_of[u.layer], j] = v
    return grid, layers, cols


def grid_panels(panels: dict[str, np.ndarray], layers: list[int], cols: list[str], path: str | Path, title: str,
                colorbar: str, log: bool = False, marks: np.ndarray | None = None, mark_label: str = "",
                cmap: str = "viridis", discrete: Sequence[float] | None = None) -> Path:
    """One heatmap per panel (`name -> [layers, experts]`), side by side, sharing a colour scale.

    `log`: logarithmic colours (non-positive cells are left blank). `marks [layers, experts]` bool: cells
    drawn with a white-edged dot (e.g. FRI anchors). `discrete`: the values a categorical scale has
    (e.g. bit-widths), one colour each."""
    grids = list(panels.values())
    finite = np.concatenate([g[np.isfinite(g)] for g in grids]) if grids else np.array([])
    if log:
        finite = finite[finite > 0]
    panel_width = max(4.2, 0.16 * len(cols))
    fig = Figure(figsize=(min(panel_width * len(panels) + 1.2, 20), 0.45 * len(layers) + 1.8))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    kw: dict = {"cmap": cmap, "aspect": "auto", "interpolation": "nearest"}
    if discrete is not None:
        levels = sorted(set(float(x) for x in discrete))
        palette = matplotlib.colormaps[cmap].resampled(max(len(levels), 2))
        colors = [palette(i) for i in range(len(levels))]
        edges = [levels[0] - 0.5] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [levels[-1] + 0.5]
        kw.update(cmap=ListedColormap(colors), norm=BoundaryNorm(edges, len(colors)))
    elif log and finite.size:
        kw["norm"] = LogNorm(vmin=finite.min(), vmax=max(finite.max(), finite.min() * 1.0001))
    elif finite.size:
        kw.update(vmin=finite.min(), vmax=max(finite.max(), finite.min() + 1e-12))
    image = None
    for ax, (name, g) in zip(axes, panels.items()):
        shown = np.where(g > 0, g, np.nan) if log else g
        image = ax.imshow(np.ma.masked_invalid(shown), **kw)
        ax.set_title(name)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
        step = max(1, -(-len(cols) // 8))  # at most ~8 labels per panel
        ticks = [t for t in range(0, len(cols), step) if t <= len(cols) - 1 - step // 2] + [len(cols) - 1]
        ax.set_xticks(ticks, [cols[t] for t in ticks])
        if marks is not None and marks.any():
            r, c = np.nonzero(marks)
            ax.scatter(c, r, s=14, c="white", edgecolors="black", linewidths=0.6, label=mark_label)
    axes[0].set_ylabel("layer")
    if marks is not None and marks.any() and mark_label:
        axes[-1].legend(loc="upper right", fontsize=7, framealpha=0.8)
    if image is not None:
        cb = fig.colorbar(image, ax=list(axes), shrink=0.9)
        cb.set_label(colorbar)
        if discrete is not None:
            cb.set_ticks(sorted(set(float(x) for x in discrete)))
    fig.suptitle(title, y=1.03)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- bars

def bar_chart(values: dict[str, float], path: str | Path, title: str, ylabel: str, color: str = "tab:blue") -> Path:
    """A bar per key, its value written above it."""
    fig = Figure(figsize=(max(4.0, 0.9 * len(values) + 1.5), 3.2))
    ax = fig.subplots()
    names, heights = list(values), [float(v) for v in values.values()]
    bars = ax.bar(range(len(names)), heights, color=color)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center")
    for b, h in zip(bars, heights):
        ax.annotate(f"{h:.3g}", (b.get_x() + b.get_width() / 2, h), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.margins(y=0.15)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- across runs

def pareto_front(x: Sequence[float], y: Sequence[float], maximize: bool = False) -> np.ndarray:
    """Indices of the points no other point beats: fewer (or equal) bits and a better value, strictly
    better in one. Sorted by x."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    s = -y if maximize else y  # smaller is better
    keep = []
    for i in range(len(x)):
        dominated = np.any((x <= x[i]) & (s <= s[i]) & ((x < x[i]) | (s < s[i])))
        if not dominated:
            keep.append(i)
    return np.array(sorted(keep, key=lambda i: (x[i], s[i])), dtype=np.int64)


MARKERS = "osD^vP*Xh<>p"


def pareto_plot(points: list[dict], path: str | Path, ylabel: str, maximize: bool = False,
                reference: float | None = None, reference_label: str = "") -> Path:
    """`points`: dicts with `x` (avg bits), `y`, `method`, `label`. One marker per method, the Pareto
    front drawn as a step line, an optional horizontal reference (e.g. the fp16 model)."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    methods = list(dict.fromkeys(p["method"] for p in points))
    for m_i, method in enumerate(methods):
        pts = [p for p in points if p["method"] == method]
        ax.scatter([p["x"] for p in pts], [p["y"] for p in pts], marker=MARKERS[m_i % len(MARKERS)], s=55,
                   label=method, zorder=3)
    for p in points:
        ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if points:
        front = pareto_front([p["x"] for p in points], [p["y"] for p in points], maximize)
        ax.plot([points[i]["x"] for i in front], [points[i]["y"] for i in front], "--", color="gray",
                drawstyle="steps-post", label="Pareto front", zorder=2)
    if reference is not None:
        ax.axhline(reference, color="black", linewidth=0.8, linestyle=":", label=reference_label)
    ax.set_xlabel("average storage bits per weight (experts)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def predicted_vs_measured(predicted: np.ndarray, measured: np.ndarray, bits: np.ndarray, path: str | Path,
                          title: str) -> Path:
    """Log-log scatter of predicted against measured error, coloured by bit-width, with y = x."""
    fig = Figure(figsize=(5.4, 4.6))
    ax = fig.subplots()
    for b in sorted(set(bits.tolist())):
        sel = bits == b
        ax.scatter(measured[sel], predicted[sel], s=9, alpha=0.6, label=f"{b:g} bits")
    lo = float(min(predicted.min(), measured.min()))
    hi = float(max(predicted.max(), measured.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured error (held-out units)")
    ax.set_ylabel("predicted error")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)
