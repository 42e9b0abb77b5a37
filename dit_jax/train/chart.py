"""The loss chart of a training run (workdir/loss.png), drawn with matplotlib from its metrics.jsonl.

`plot_loss(jsonl, png)`: the raw values (light) and a centred moving average (dark) of each key against step, with
axes labels, ticks, a grid, a title and a legend naming each key's last value; a log y axis on request; the sample
quality a run logs now and then (train.eval_every) in a second panel beside it. Drawn on a
matplotlib Figure with the Agg canvas (no pyplot, no global backend: safe in a notebook or a thread) and written
atomically (dit_jax.paths.atomic_write): readers see the old file or the whole new one.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dit_jax.paths import atomic_write
from dit_jax.train.metrics import format_value, read_jsonl

__all__ = ["COLORS", "plot_loss"]

# one colour per key, in order (RGB 0-255; matplotlib's tab10 blue, red, green, purple, orange, cyan)
COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))
DPI = 100  # pixels per inch: `size` is in pixels
LIGHT = 0.65  # the raw curve: its key's colour mixed this far towards white


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (no lag, unlike an EMA); the window shrinks symmetrically at the ends."""
    n, half = len(values), max(int(window), 1) // 2
    if half == 0 or n < 3:
        return values.copy()
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(n)
    h = np.minimum(half, np.minimum(idx, n - 1 - idx))  # symmetric window near the edges
    return (csum[idx + h + 1] - csum[idx - h]) / (2 * h + 1)


def _step_label(v: float, _pos: Any = None) -> str:
    """A step tick: 400000 -> "400K", 1.5e6 -> "1.5M"."""
    if v == 0:
        return "0"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.0f}K" if abs(v) < 1e6 else f"{v / 1e6:.3g}M"
    return f"{v:.4g}"


def _series(records: list[dict], keys: Sequence[str], log_y: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (steps, values), sorted by step: records without the key and non-finite values (non-positive ones
    on a log axis) skipped; of repeated steps (a resumed run re-logs them) the last is kept."""
    out = {}
    for key in keys:
        by_step: dict[int, float] = {}
        for r in records:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and (not log_y or v > 0) and "step" in r:
                by_step[int(r["step"])] = float(v)
        steps = np.array(sorted(by_step), dtype=np.float64)
        out[key] = (steps, np.array([by_step[int(s)] for s in steps], dtype=np.float64))
    return out


def _draw(ax: Any, present: list[tuple[str, np.ndarray, np.ndarray]], log_y: bool, smooth: bool,
          color_index: int = 0) -> None:
    """One panel: each key's raw curve (light) and its centred moving average (dark; raw only when not smooth),
    ticks, grid, labels, legend; "no data yet" when nothing is present."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if not present:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.text(0.5, 0.5, "no data yet", transform=ax.transAxes, ha="center", va="center", color="0.47")
        return
    for i, (key, steps, vals) in enumerate(present):
        rgb = np.array(COLORS[(color_index + i) % len(COLORS)]) / 255.0
        light = tuple(rgb + (1.0 - rgb) * LIGHT)
        marker = "o" if len(steps) == 1 or not smooth else None
        if smooth:
            ax.plot(steps, vals, color=light, linewidth=1.0, marker=marker, markersize=3, zorder=2)
        line = _smooth(vals, window=len(vals) // 40) if smooth else vals
        ax.plot(steps, line, color=tuple(rgb), linewidth=2.5 if smooth else 2.0, marker=marker, markersize=4,
                zorder=3, label=f"{key} (last {format_value(vals[-1])})")
    if log_y:  # ticks at 1, 2, 5 x 10^k, labelled as numbers
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.4g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
    ax.grid(True, color="0.91", linewidth=0.8, zorder=0)
    ax.set_xlabel("step")
    ax.set_ylabel(", ".join(k for k, _, _ in present) + (" (log)" if log_y else ""))
    ax.legend(loc="upper right", fontsize=9, framealpha=1.0, edgecolor="0.78")


def plot_loss(
    jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    keys: Sequence[str] = ("loss",),
    *,
    side_keys: Sequence[str] = (),
    size: tuple[int, int] | None = None,
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Draw `keys` of a metrics.jsonl against step: raw (light) and smoothed (dark, centred moving average over
    1/40 of the points) curves, axes, ticks, title, legend; written atomically to png_path, an RGB PNG of
    size = (width, height) pixels (its folder is created; default 800 x 480). With no data yet the chart says so.

    side_keys: metrics logged now and then (the sample quality of train.eval_every): when the file has any, they
    are drawn point by point in a second panel to the right, each on a linear axis of its own (the first on the
    left, the others on the right), and the default width is 1280."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: only the end of a run draws
    from matplotlib.figure import Figure

    records = read_jsonl(jsonl_path)
    series = _series(records, keys, log_y)
    present = [(k, s, v) for k, (s, v) in series.items() if len(s)]
    side = [(k, s, v) for k, (s, v) in _series(records, side_keys, False).items() if len(s)]
    width, height = size or ((1280 if side else 800), 480)
    if int(width) != width or int(height) != height or width < 64 or height < 64:
        raise ValueError(f"size must be (width, height) in whole pixels, at least 64 each, got {size}")

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, width_ratios=(3, 2)) if side else [fig.add_subplot()]
    axes[0].set_title(title or f"{', '.join(keys)} vs step ({Path(jsonl_path).name})", fontsize=11)
    _draw(axes[0], present, log_y, smooth=True)
    if side:  # the first key on the left axis, each other key on an axis of its own at the right (its scale)
        axes[1].set_title("sample quality (EMA weights)", fontsize=11)
        _draw(axes[1], side[:1], False, smooth=False)
        handles, labels = axes[1].get_legend_handles_labels()
        for i, entry in enumerate(side[1:], start=1):
            twin = axes[1].twinx()
            _draw(twin, [entry], False, smooth=False, color_index=i)
            twin.grid(False)
            twin.get_legend().remove()
            more = twin.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        axes[1].legend(handles, labels, loc="center right", fontsize=9, framealpha=0.9, edgecolor="0.78")
    with warnings.catch_warnings():  # a tiny size cannot fit the labels: drawn as well as it goes
        warnings.filterwarnings("ignore", "Tight layout not applied", UserWarning)
        fig.tight_layout(pad=0.6)
        fig.canvas.draw()
    rgb = np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])  # (height, width, 3), opaque

    from PIL import Image

    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(png_path, "wb") as f:
        Image.fromarray(rgb).save(f, format="PNG")
    return png_path
