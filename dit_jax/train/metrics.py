"""Training metrics: TensorBoard + JSONL writer, a tqdm progress bar, a PIL loss plot, peak FLOP/s and MFU.

Written only by the main host (MetricWriter(enabled=jax.process_index() == 0)). Layout under the workdir:
  tb/                           TensorBoard event files (tensorboardX)
  metrics.jsonl                 one {"step": ..., name: value, ...} per write_scalars call, appended and flushed
  samples/{name}_{step:07d}.png images (sample grids)

A remote workdir (gs://..., what a TPU pod trains into): TensorBoard's writer and appends to a JSONL file need a
local file system, so the files are written into a local staging folder ($DIT_JAX_LOCAL_LOGS, else
~/.cache/dit_jax/logs, then the workdir's path) and copied to the workdir (etils.epath; gs:// needs gcsfs) at
most every `sync_every_s` seconds, on flush() and on close(). A resumed run on a new machine first fetches the
workdir's metrics.jsonl, so the log stays one file.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dit_jax.paths import atomic_write

__all__ = [
    "MetricWriter",
    "PEAK_BF16_FLOPS",
    "Progress",
    "format_metrics",
    "mfu",
    "peak_flops_per_device",
    "plot_loss",
    "read_jsonl",
]


def _scalar(value: Any) -> float | int:
    """A Python number from a Python / numpy / jax scalar (ints stay ints, bools become ints)."""
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric value of shape {arr.shape} is not a scalar")
    item = arr.reshape(()).item()
    return int(item) if isinstance(item, (bool, int)) else float(item)


def _atomic_write(path: Path, write: Any) -> None:
    """write(f) into a temporary file, then rename it onto path (dit_jax.paths.atomic_write), so readers never see
    a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        write(f)


# ==========================================================================================================
# Writer
# ==========================================================================================================
class MetricWriter:
    """Scalars to TensorBoard and workdir/metrics.jsonl; images to TensorBoard and PNG files.

    enabled=False (every host but the main one) makes every method a no-op and creates nothing. Appends to an
    existing metrics.jsonl (a resumed run re-logs the steps after its last checkpoint; read_jsonl keeps both,
    plot_loss keeps the latest value per step). `local_dir`: where the files are written (the workdir itself,
    or the staging folder of a remote workdir, see the module docstring); `sync()` copies a remote one's.
    """

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, sync_every_s: float = 60.0):
        self.remote = is_remote(workdir)
        self.workdir = str(workdir) if self.remote else Path(workdir)
        self.local_dir = local_staging_dir(str(workdir)) if self.remote else Path(workdir)
        self.enabled = enabled
        self.sync_every_s = float(sync_every_s)
        self._synced: dict[str, tuple[int, float]] = {}
        self._last_sync = time.monotonic()
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from tensorboardX import SummaryWriter  # imports protobuf: only where used

        self.local_dir.mkdir(parents=True, exist_ok=True)
        if self.remote:
            self._fetch_remote_jsonl()
        self._tb = SummaryWriter(logdir=str(self.local_dir / "tb"), flush_secs=30)
        self._jsonl = open(self.local_dir / "metrics.jsonl", "a", encoding="utf-8")

    def _fetch_remote_jsonl(self) -> None:
        from etils import epath

        remote = epath.Path(self.workdir) / "metrics.jsonl"
        local = self.local_dir / "metrics.jsonl"
        if remote.exists() and (not local.exists() or local.stat().st_size < remote.stat().length):
            local.write_bytes(remote.read_bytes())

    def sync(self) -> None:
        """Copy the new or changed files of a remote workdir's staging folder to the workdir (no-op when local)."""
        if not (self.enabled and self.remote):
            return
        from etils import epath

        self._tb.flush()
        self._jsonl.flush()
        for path in sorted(p for p in self.local_dir.rglob("*") if p.is_file() and not p.name.startswith(".")):
            rel = path.relative_to(self.local_dir).as_posix()
            st = path.stat()
            if self._synced.get(rel) == (st.st_size, st.st_mtime):
                continue
            target = epath.Path(self.workdir) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
            self._synced[rel] = (st.st_size, st.st_mtime)
        self._last_sync = time.monotonic()

    def _maybe_sync(self) -> None:
        if self.remote and time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    @property
    def jsonl_path(self) -> Path:
        return self.local_dir / "metrics.jsonl"

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One JSONL line {"step": step, **scalars} (flushed) and a TensorBoard scalar per entry.
        Values may be Python, numpy or jax scalars; non-finite values are kept (JSON NaN / Infinity)."""
        if not self.enabled:
            return
        step = int(step)
        values = {str(k): _scalar(v) for k, v in scalars.items()}
        for name, value in values.items():
            self._tb.add_scalar(name, value, global_step=step)
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        self._maybe_sync()

    def write_images(self, step: int, name: str, image: Any) -> Path | None:
        """image: uint8 (H, W), (H, W, 1) or (H, W, 3). Written to TensorBoard and to
        workdir/samples/{name}_{step:07d}.png ("/" in name becomes "_"); returns the PNG path."""
        if not self.enabled:
            return None
        from PIL import Image

        arr = np.asarray(image)
        if arr.dtype != np.uint8:
            raise ValueError(f"write_images expects uint8 pixels, got {arr.dtype}")
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
            raise ValueError(f"write_images expects an (H, W[, 1|3|4]) image, got shape {arr.shape}")
        self._tb.add_image(name, arr if arr.ndim == 3 else arr[..., None], global_step=int(step), dataformats="HWC")
        path = self.local_dir / "samples" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}_{int(step):07d}.png"
        _atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))
        self._maybe_sync()
        return path

    def flush(self) -> None:
        if self.enabled:
            self._tb.flush()
            self._jsonl.flush()
            self.sync()

    def close(self) -> None:
        if self.enabled and self._jsonl is not None:
            self.sync()
            self._tb.close()
            self._jsonl.close()
            self._jsonl = None
            self.enabled = False

    def __enter__(self) -> "MetricWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def is_remote(path: str | os.PathLike) -> bool:
    """gs://, s3://, ... (anything with a URL scheme), as opposed to a local path."""
    return "://" in str(path)


def local_staging_dir(remote: str) -> Path:
    """The local folder a remote workdir's logs are written into before they are copied."""
    root = Path(os.environ.get("DIT_JAX_LOCAL_LOGS") or Path.home() / ".cache" / "dit_jax" / "logs")
    scheme, _, rest = remote.partition("://")
    return root / scheme / rest.strip("/")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file; [] when it does not exist. A truncated last line (a crash mid-write) is
    skipped; any other bad line raises."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
    return out


# ==========================================================================================================
# Console
# ==========================================================================================================
def _format_value(value: Any) -> str:
    try:
        value = _scalar(value)
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) < 1e-3 or abs(value) >= 1e5:
        return f"{value:.3e}"
    if abs(value) >= 1e3:
        return f"{value:.1f}"
    return f"{value:.4g}"


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """{"loss": 0.1234567, "lr": 1e-4, "step": 5} -> "loss=0.1235 lr=1.000e-04 step=5"."""
    return " ".join(f"{k}={_format_value(v)}" for k, v in metrics.items())


def _in_notebook() -> bool:
    """True inside a running Jupyter/Colab kernel (not merely when ipykernel was imported, as nbclient does)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:  # noqa: BLE001: an IPython too old or half-imported means no notebook
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


class Progress:
    """A tqdm bar (rate and ETA) whose postfix shows the latest metrics.

    enabled=None shows it only in a terminal or a notebook (logs of batch jobs stay free of carriage returns; the
    trainer prints a format_metrics line per log step there instead).
    """

    def __init__(self, total_steps: int, initial: int = 0, *, enabled: bool | None = None, desc: str = "train"):
        from tqdm.auto import tqdm

        if enabled is None:
            enabled = sys.stderr.isatty() or _in_notebook()
        self._bar = tqdm(
            total=int(total_steps), initial=int(initial), desc=desc, unit="step", dynamic_ncols=True,
            disable=not enabled, smoothing=0.1,
        )

    @property
    def n(self) -> int:
        return int(self._bar.n)

    @property
    def shown(self) -> bool:
        return not self._bar.disable

    def update(self, step: int, metrics: Mapping[str, Any] | None = None) -> None:
        """Move the bar to `step` (absolute) and show `metrics`."""
        if metrics:
            self._bar.set_postfix_str(format_metrics(metrics), refresh=False)
        delta = int(step) - self._bar.n
        if delta > 0:
            self._bar.update(delta)
        else:
            self._bar.refresh()

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ==========================================================================================================
# Loss plot (PIL only)
# ==========================================================================================================
_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t += step
    return ticks


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4:
        return f"{v / 1e3:.0f}K" if abs(v) < 1e6 else f"{v / 1e6:.3g}M"
    return f"{v:.4g}"


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average (no lag, unlike an EMA); the window shrinks symmetrically at the ends."""
    n, half = len(values), max(int(window), 1) // 2
    if half == 0 or n < 3:
        return values.copy()
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(n)
    h = np.minimum(half, np.minimum(idx, n - 1 - idx))  # symmetric window near the edges
    return (csum[idx + h + 1] - csum[idx - h]) / (2 * h + 1)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks in log10 space at 1, 2, 5 x 10^k inside [lo, hi] (falls back to linear ticks when too few)."""
    ticks = [math.log10(m * 10.0**k) for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in (1, 2, 5)]
    ticks = [t for t in ticks if lo <= t <= hi]
    if len(ticks) > 8:
        ticks = [t for t in ticks if abs(t - round(t)) < 1e-9] or ticks[::3]
    if len(ticks) < 2:
        ticks = [math.log10(v) for v in _nice_ticks(10**lo, 10**hi, 5) if v > 0]
    return ticks


def plot_loss(
    jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    keys: Sequence[str] = ("loss",),
    *,
    size: tuple[int, int] = (800, 480),
    title: str | None = None,
    log_y: bool = False,
) -> Path:
    """Draw `keys` of a metrics.jsonl against step: raw (light) and smoothed (dark, centred moving average) curves, axes, ticks, title,
    legend; written atomically to png_path (size = (width, height) pixels). Records without a key, and
    non-finite values, are skipped; of repeated steps (a resumed run) the last is kept."""
    from PIL import Image, ImageDraw

    records = read_jsonl(jsonl_path)
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key in keys:
        by_step: dict[int, float] = {}
        for r in records:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v) and (not log_y or v > 0) and "step" in r:
                by_step[int(r["step"])] = float(v)
        steps = np.array(sorted(by_step), dtype=np.float64)
        series[key] = (steps, np.array([by_step[int(s)] for s in steps], dtype=np.float64))

    width, height = size
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font, title_font = _font(12), _font(15)
    left, right, top, bottom = 72, 20, 40, 48
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot area (y0 top)
    draw.text((width // 2, 12), title or f"{', '.join(keys)} vs step ({Path(jsonl_path).name})",
              fill=(0, 0, 0), font=title_font, anchor="mt")

    present = [(k, s, v) for k, (s, v) in series.items() if len(s)]
    if not present:
        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        draw.text(((x0 + x1) // 2, (y0 + y1) // 2), "no data yet", fill=(120, 120, 120), font=font, anchor="mm")
    else:
        smooth = {k: _smooth(v, window=len(v) // 40) for k, _, v in present}
        all_steps = np.concatenate([s for _, s, _ in present])
        all_vals = np.concatenate([v for _, _, v in present])
        fy = np.log10 if log_y else (lambda a: a)
        sx_lo, sx_hi = float(all_steps.min()), float(all_steps.max())
        if sx_hi == sx_lo:
            sx_lo, sx_hi = sx_lo - 1, sx_hi + 1
        vy = fy(all_vals)
        vy_lo, vy_hi = float(vy.min()), float(vy.max())
        pad = 0.05 * (vy_hi - vy_lo) if vy_hi > vy_lo else (abs(vy_hi) * 0.1 or 1.0)
        vy_lo, vy_hi = vy_lo - pad, vy_hi + pad

        def px(s: np.ndarray) -> np.ndarray:
            return x0 + (s - sx_lo) / (sx_hi - sx_lo) * (x1 - x0)

        def py(v: np.ndarray) -> np.ndarray:
            return y1 - (fy(v) - vy_lo) / (vy_hi - vy_lo) * (y1 - y0)

        # grid and ticks
        for t in _nice_ticks(sx_lo, sx_hi, 6):
            x = float(px(np.array(t)))
            draw.line((x, y0, x, y1), fill=(232, 232, 232))
            draw.line((x, y1, x, y1 + 4), fill=(0, 0, 0))
            draw.text((x, y1 + 7), _tick_label(t), fill=(0, 0, 0), font=font, anchor="mt")
        for t in (_log_ticks(vy_lo, vy_hi) if log_y else _nice_ticks(vy_lo, vy_hi, 6)):
            y = y1 - (t - vy_lo) / (vy_hi - vy_lo) * (y1 - y0)
            draw.line((x0, y, x1, y), fill=(232, 232, 232))
            draw.line((x0 - 4, y, x0, y), fill=(0, 0, 0))
            draw.text((x0 - 7, y), _tick_label(10**t if log_y else t), fill=(0, 0, 0), font=font, anchor="rm")
        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        draw.text(((x0 + x1) // 2, height - 8), "step", fill=(0, 0, 0), font=font, anchor="mb")
        draw.text((8, y0 - 6), ", ".join(k for k, _, _ in present) + (" (log)" if log_y else ""),
                  fill=(0, 0, 0), font=font, anchor="lb")

        # curves: raw light, smoothed dark
        for i, (key, steps, vals) in enumerate(present):
            color = _COLORS[i % len(_COLORS)]
            light = tuple(int(c + (255 - c) * 0.65) for c in color)
            for ys, fill, w in ((vals, light, 1), (smooth[key], color, 2)):
                pts = list(zip(px(steps).tolist(), py(ys).tolist()))
                if len(pts) == 1:
                    x, y = pts[0]
                    draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=fill)
                else:
                    draw.line(pts, fill=fill, width=w)
        # legend on a white box (top right)
        labels = [f"{key} (last {_format_value(vals[-1])})" for key, _, vals in present]
        text_w = max(draw.textlength(label, font=font) for label in labels)
        lx = x1 - 40 - text_w
        draw.rectangle((lx - 8, y0 + 2, x1 - 4, y0 + 10 + 16 * len(labels)), fill=(255, 255, 255), outline=(200, 200, 200))
        for i, label in enumerate(labels):
            ly = y0 + 10 + 16 * i
            draw.line((lx, ly, lx + 20, ly), fill=_COLORS[i % len(_COLORS)], width=2)
            draw.text((lx + 26, ly), label, fill=(0, 0, 0), font=font, anchor="lm")

    png_path = Path(png_path)
    _atomic_write(png_path, lambda f: img.save(f, format="PNG"))
    return png_path


# ==========================================================================================================
# Peak FLOP/s and MFU
# ==========================================================================================================
# Dense (no sparsity) bf16 peak FLOP/s of ONE JAX device, matched against device.device_kind (lower case,
# first match wins, so the more specific patterns come first).
# TPU: Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v2, v3, v4, v5e, v5p, v6e), which
# give per-chip peaks: v2 45 TFLOP/s and v3 123 TFLOP/s per chip of two TensorCores, and JAX shows each
# TensorCore as a device, hence half; v4 275, v5p 459 (megacore: one device per chip), v5e 197, v6e 918 (one
# TensorCore per chip). JAX calls v5e "TPU v5 lite", v5p "TPU v5" or "TPU v5p", v6e "TPU v6 lite".
# NVIDIA: datasheets' dense BF16 Tensor Core numbers (the headline numbers include 2:4 sparsity, halved here):
# H100 SXM 989.4 TFLOP/s, H100 NVL 835, H100 PCIe 756 (H100 datasheet); H200 SXM 989.4, H200 NVL 835 (H200
# datasheet); GH200 989.4; A100 312 (SXM and PCIe, A100 datasheet); L4 121 (L4 datasheet, 242 with sparsity).
PEAK_BF16_FLOPS: tuple[tuple[str, float | None], ...] = (
    ("tpu v2", 45e12 / 2),
    ("tpu v3", 123e12 / 2),
    ("tpu v4 lite", None),  # v4i, an inference chip: unknown here
    ("tpu v4", 275e12),
    ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v6 lite", 918e12),
    ("tpu v6e", 918e12),
    ("h100 nvl", 835e12),
    ("h100 pcie", 756e12),
    ("h100", 989.4e12),
    ("h200 nvl", 835e12),
    ("h200", 989.4e12),
    ("gh200", 989.4e12),
    ("a100", 312e12),
    ("l4", 121e12),
)


def peak_flops_per_device(device: Any) -> float | None:
    """Dense bf16 peak FLOP/s of one device (a jax Device or its device_kind string); None when unknown (CPU)."""
    kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
    platform = "" if isinstance(device, str) else str(getattr(device, "platform", ""))
    kind = kind.lower()
    if platform == "cpu" or "cpu" in kind:
        return None
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(r"(^|[^a-z0-9])" + re.escape(pattern) + r"($|[^a-z0-9])", kind):
            return peak
    return None


def mfu(model_flops_per_step: float, step_time_s: float, n_devices: int, peak: float | None) -> float | None:
    """Model FLOPs utilisation: model_flops_per_step / (step_time_s * n_devices * peak).

    model_flops_per_step counts real FLOPs (2 x MACs) of forward and backward over the global batch; for a DiT
    step that is about 3 x 2 x forward MACs x batch (the backward costs twice the forward). None when the peak
    is unknown or the time is not positive.
    """
    if peak is None or not peak or step_time_s <= 0 or n_devices <= 0:
        return None
    return float(model_flops_per_step) / (float(step_time_s) * int(n_devices) * float(peak))

