"""A roofline estimate (on paper, no TPU needed) of DiT-XL/2 training steps/s at global batch 256 on TPU slices.

    python bench/roofline.py              # the markdown table in BENCHMARKS.md

Work per step: 3 x forward FLOPs (2 x MACs from dit_jax.perf.flops, the paper's 118.6 GMACs at 256 px) x 256.
Compute bound: chips x peak bf16 / work. Gradient all-reduce bound (data parallel, fp32 gradients, a ring over
the slice): 2 x (n - 1) / n x 4 bytes x params / ICI bandwidth per chip, where the bandwidth is published.
Peaks are Google Cloud's per-chip figures (cloud.google.com/tpu/docs/v3 ... /v5p). The paper trained XL/2 at
5.7 it/s on a v3-256 (128 chips, 256 cores; one image per core).
"""

from __future__ import annotations

import argparse

from dit_jax.perf import flops

# chip: (peak bf16 FLOP/s, HBM GB, HBM GB/s, ICI GB/s per chip or None where not published in that form)
CHIPS = {
    "v3": (123e12, 32, 900, None),
    "v4": (275e12, 32, 1200, None),
    "v5e": (197e12, 16, 819, 400),  # "bidirectional ICI bandwidth (per chip) 400 GBps"
    "v5p": (459e12, 95, 2765, 600),  # "interchip interconnect BW 4800 Gbps"
}
PAPER_V3_256_STEPS_PER_S = 5.7
XL2 = dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2, input_size=32, in_channels=4, learn_sigma=True,
           num_classes=1000, block_type="adaLN-Zero")


def table(chips: int = 128, batch: int = 256, mfu: float = 0.5) -> str:
    work = 3 * 2 * flops.dit_macs(**XL2) * batch
    params = flops.dit_params(**XL2)  # trained parameters (the fixed position table is not all-reduced)
    rows = [
        f"| chip | peak bf16 / chip | steps/s, 1 chip at 100% | steps/s, {chips} chips at 100% "
        f"| at {mfu:.0%} MFU | fp32 all-reduce bound ({chips} chips) | per-chip batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (peak, _hbm, _bw, ici) in CHIPS.items():
        one = peak / work
        many = chips * one
        ar = "n/a (ICI not published per chip)"
        if ici:
            t = 2 * (chips - 1) / chips * 4 * params / (ici * 1e9)
            ar = f"{1 / t:.0f} steps/s ({t * 1e3:.1f} ms)"
        rows.append(f"| {name} | {peak / 1e12:.0f} TFLOP/s | {one:.2f} | {many:.1f} | {many * mfu:.1f} | {ar} "
                    f"| {batch / chips:g} |")
    v3 = CHIPS["v3"][0] * chips / work
    rows.append("")
    rows.append(f"Work per step: {work / 1e12:.1f} TFLOP. The paper's {PAPER_V3_256_STEPS_PER_S} it/s on a v3-256 "
                f"is {PAPER_V3_256_STEPS_PER_S / v3:.1%} of the v3 compute roofline "
                f"({PAPER_V3_256_STEPS_PER_S * work / chips / 1e12:.1f} TFLOP/s per chip).")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chips", type=int, default=128)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--mfu", type=float, default=0.5)
    a = p.parse_args()
    print(table(a.chips, a.batch, a.mfu))


if __name__ == "__main__":
    main()
