"""The paper's sweeps as launchable points (Peebles & Xie 2023, section 4 and Figure 5).

  python -m configs.sweeps              # one line of dit-jax train arguments per point
  python -m configs.sweeps --json       # the points as JSON
  python -m configs.sweeps --sweep blocks

  python -m configs.sweeps | while read -r args; do
    dit-jax train $args --workdir gs://BUCKET/sweeps/...   # --json gives each point's path-safe slug
  done

- "scaling": S/B/L/XL x patch 8/4/2 at 256 px, 400K steps each (Table 4, Figures 2 and 6).
- "blocks": DiT-XL/2 with the four conditioning designs: in-context, cross-attention, adaLN, adaLN-Zero
  (section 3.2, Figure 5).
Each point: {"name", "slug" (path-safe, for workdirs), "config" (spec for load_config / --config),
"overrides" ({dotted key: value})}.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Sequence

from dit_jax.constants import BLOCK_TYPES, MODEL_SIZES, PATCH_SIZES  # no jax: this script starts fast

CONFIG_FILE = "configs/dit_imagenet.py"
SIZES = tuple(MODEL_SIZES)  # S, B, L, XL: the paper's Table 1, smallest first
PATCHES = tuple(sorted(PATCH_SIZES, reverse=True))  # 8, 4, 2: fewest tokens first
SWEEP_BLOCK_ORDER = tuple(reversed(BLOCK_TYPES))  # the paper's Figure 5 order: in-context ... adaLN-Zero


def _slug(name: str) -> str:
    return name.lower().replace("/", "").replace("_", "-")


def sweep_points(res: int = 256) -> list[dict]:
    """The 12 model sizes x patch sizes, smallest first."""
    points = []
    for size in SIZES:
        for patch in PATCHES:
            variant = f"{size}/{patch}"
            name = f"DiT-{variant}"
            points.append(dict(
                name=name,
                slug=_slug(name) + f"-{res}",
                config=f"{CONFIG_FILE}:variant={variant},res={res}",
                overrides={},
            ))
    return points


def block_ablation(variant: str = "XL/2", res: int = 256) -> list[dict]:
    """DiT-XL/2 with each of the four block designs."""
    return [
        dict(
            name=f"DiT-{variant} {block}",
            slug=_slug(f"DiT-{variant}-{block}") + f"-{res}",
            config=f"{CONFIG_FILE}:variant={variant},res={res}",
            overrides={"model.block_type": block},
        )
        for block in SWEEP_BLOCK_ORDER
    ]


SWEEPS = {"scaling": sweep_points, "blocks": block_ablation}


def command_line(point: dict) -> str:
    """"--config configs/dit_imagenet.py:variant=S/8,res=256 --config.model.block_type=adaLN-Zero"."""
    words = ["--config", point["config"]]
    for key, value in point["overrides"].items():
        words.append(f"--config.{key}={value}")
    return " ".join(shlex.quote(w) for w in words)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m configs.sweeps", description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", choices=[*SWEEPS, "all"], default="all")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print the points as a JSON list")
    args = parser.parse_args(argv)
    names = list(SWEEPS) if args.sweep == "all" else [args.sweep]
    multiple = 8 * (max(PATCHES) if "scaling" in names else 2)  # the VAE's 8 x the largest patch size swept
    if args.res <= 0 or args.res % multiple:
        parser.error(f"--res {args.res}: must be a positive multiple of {multiple} (the VAE downsamples by 8, then "
                     f"the models cut patches of up to {multiple // 8}), e.g. 256 or 512")
    points = [p for n in names for p in SWEEPS[n](res=args.res)]
    text = json.dumps(points, indent=2) if args.json else "\n".join(command_line(p) for p in points)
    try:
        print(text, flush=True)
    except BrokenPipeError:  # the reader stopped early (`| head`): not an error; silence the flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
