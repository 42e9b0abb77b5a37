"""Timestep respacing: run a diffusion process on a subset of the original steps.

Follows the official facebookresearch/DiT diffusion/respace.py: the kept steps' alpha_bar values are
preserved exactly by rebuilding the betas, and the model always sees the ORIGINAL timestep indices
(through `timestep_map`), while this diffusion's own tables are indexed by the spaced index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .gaussian import GaussianDiffusion, Model


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Which of the original steps 0..num_timesteps-1 to keep.

    section_counts: a list of counts, or a comma string ("10,15,20"): the process is cut into that
    many near-equal sections (the first num_timesteps % n one step longer) and section i keeps
    count_i steps spread evenly from its first to its last step (rounded with Python's round()).
    "ddimN": the DDIM paper's range(0, num_timesteps, stride) with the smallest stride giving exactly
    N steps. Raises ValueError when a section is shorter than its count or no stride fits.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps out of {num_timesteps} with an integer stride")
        section_counts = [int(c) for c in section_counts.split(",")]

    base, extra = divmod(num_timesteps, len(section_counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(section_counts):
        size = base + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # Accumulate the fractional position as the official loop does, so rounding matches.
        pos = 0.0
        for _ in range(count):
            kept.append(start + round(pos))
            pos += stride
        start += size
    return set(kept)


class _WrappedModel:
    """Calls `model` with original timestep indices: model(x, timestep_map[t], **kwargs)."""

    def __init__(self, model: Model, timestep_map: Sequence[int], original_num_steps: int) -> None:
        self.model = model
        self.timestep_map = list(timestep_map)
        self.original_num_steps = original_num_steps

    def __call__(self, x: jax.Array, ts: jax.Array, **kwargs: Any) -> Any:
        new_ts = jnp.asarray(self.timestep_map, dtype=ts.dtype)[ts]
        return self.model(x, new_ts, **kwargs)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion that keeps only `use_timesteps` of the process built from `**kwargs`.

    Attributes: use_timesteps (set), timestep_map (sorted list: spaced index -> original index),
    original_num_steps. Every method that calls a model or a cond_fn passes it original indices.
    """

    def __init__(self, use_timesteps: Iterable[int], **kwargs: Any) -> None:
        self.use_timesteps = set(use_timesteps)
        self.original_num_steps = len(kwargs["betas"])
        base = GaussianDiffusion(**kwargs)
        self.timestep_map: list[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        super().__init__(**{**kwargs, "betas": np.array(new_betas)})

    def _wrap_model(self, model: Model) -> Model:
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.original_num_steps)
