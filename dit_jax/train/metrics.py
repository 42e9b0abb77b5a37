"""Training metrics: TensorBoard + JSONL writer, a tqdm progress bar. (The loss chart is dit_jax.train.chart;
peak FLOP/s and MFU are dit_jax.perf.mfu.)

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
from typing import Any, Mapping

import numpy as np

from dit_jax.paths import atomic_write

__all__ = [
    "MetricWriter",
    "Progress",
    "format_metrics",
    "format_value",
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
    dit_jax.train.chart.plot_loss keeps the latest value per step). `local_dir`: where the files are written (the workdir itself,
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
def format_value(value: Any) -> str:
    """A metric value as the console shows it: ints as they are, 4 significant digits, scientific when tiny or huge."""
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
    return " ".join(f"{k}={format_value(v)}" for k, v in metrics.items())


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
