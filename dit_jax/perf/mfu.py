"""Peak FLOP/s of a device and model FLOPs utilisation (MFU), as the trainer logs it and `dit-jax bench` reports it.

No jax import: a device is read through its `device_kind` and `platform` attributes (or given as the kind string).
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["PEAK_BF16_FLOPS", "mfu", "peak_flops_per_device"]

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
