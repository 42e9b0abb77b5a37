"""How to sample: one settings object for every method (docs/ARCHITECTURE.md, "Where to add: a sampler").

    SampleSettings(sampler="ddpm", num_steps=250, cfg_scale=4.0)                      # DiT, the official sample.py
    SampleSettings(sampler="ddim", num_steps=50, eta=0.0)
    SampleSettings(sampler="dpmsolver++", num_steps=20)                 # DPM-Solver++ (2M), diffusers' grid
    SampleSettings(sampler="euler", num_steps=250, cfg_scale=2.0, interval_min=0.3, last_step=0.04)   # DDT
    SampleSettings(sampler="euler", ..., schedule=(0, 4, 8, ...))          # DDT, encoder shared between steps
    SampleSettings(sampler="heun" | "euler_maruyama", ...)                 # any velocity model

The sampler names its objective (dit_jax.diffusion.objectives): ddpm and ddim sample a model trained with Gaussian
diffusion over the 1000-step process respaced to num_steps (the official respacing: "250", "ddim50"), dpmsolver++
solves its ODE in num_steps model calls (dit_jax.diffusion.dpm_solver); euler, heun
and euler_maruyama integrate a velocity model (flow matching) on the grid of dit_jax.diffusion.flow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from dit_jax.diffusion import create_diffusion, flow, space_timesteps
from dit_jax.diffusion.gaussian import GaussianDiffusion
from dit_jax.diffusion.objectives import SAMPLERS, objective_of_sampler
from dit_jax.diffusion.sharing import recompute_mask

# The official sample.py's eight classes (ImageNet: 207 golden retriever, 360 otter, 387 lesser panda,
# 974 geyser, 88 macaw, 979 valley, 417 balloon, 279 arctic fox).
OFFICIAL_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)
TRAIN_TIMESTEPS = 1000  # the process every DiT is trained with (create_diffusion's diffusion_steps)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """cfg_scale 1.0 turns guidance off (one model call per example per step instead of two).

    Gaussian diffusion (ddpm, ddim, dpmsolver++): cfg_channels is the number of eps channels guided (3 in the DiT release;
    None = all), eta DDIM's noise (0: deterministic), clip_denoised clips x_0 to [-1, 1] (pixel-space models).
    Flow (euler, heun, euler_maruyama): guidance on every channel where interval_min < t < interval_max; the
    time grid's shift and last_step (dit_jax.diffusion.flow.sample_times); schedule: the steps on which a DDT's
    condition encoder runs (Euler only; the others reuse its last output), None = every step."""

    sampler: str = "ddpm"
    num_steps: int = 250
    cfg_scale: float = 4.0
    cfg_channels: int | None = 3
    eta: float = 0.0
    clip_denoised: bool = False
    interval_min: float = 0.0
    interval_max: float = 1.0
    shift: float = 1.0
    last_step: float | None = None
    schedule: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.objective == "diffusion":  # the steps must fit the 1000-step process every DiT is trained with
            if self.respaced:
                space_timesteps(TRAIN_TIMESTEPS, self.respacing)  # ValueError naming what does not fit
            elif self.num_steps > TRAIN_TIMESTEPS:
                raise ValueError(f"{self.sampler} takes at most the {TRAIN_TIMESTEPS} training timesteps")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):  # NaN would sample NaN images silently
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if self.eta != 0 and self.sampler != "ddim":
            raise ValueError("eta applies to the ddim sampler only")
        if not 0 <= self.eta <= 1:  # DDIM's eta: 0 deterministic .. 1 DDPM-like; above 1 the mean's sqrt can be NaN
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if not (math.isfinite(self.interval_min) and math.isfinite(self.interval_max)
                and self.interval_min < self.interval_max):
            raise ValueError(f"the guidance interval ({self.interval_min}, {self.interval_max}) is empty")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.last_step is not None and not 0 < self.last_step <= 1:
            raise ValueError(f"last_step must be in (0, 1], got {self.last_step}")
        if self.schedule is not None:
            if self.sampler != "euler":
                raise ValueError(f"encoder sharing runs the Euler ODE sampler; got sampler={self.sampler!r}")
            object.__setattr__(self, "schedule", tuple(int(i) for i in self.schedule))
            recompute_mask(self.schedule, self.num_steps)  # validates it

    @property
    def objective(self) -> str:
        """What the model must have been trained with: "diffusion" or "flow"."""
        return objective_of_sampler(self.sampler).name

    @property
    def respaced(self) -> bool:
        """ddpm / ddim run GaussianDiffusion's own loop over the process respaced to num_steps (step by step with a
        progress bar, if asked); the other diffusion samplers take num_steps model calls on the full process."""
        return self.sampler in ("ddpm", "ddim")

    @property
    def respacing(self) -> str:
        return f"ddim{self.num_steps}" if self.sampler == "ddim" else str(self.num_steps)

    def diffusion(self) -> GaussianDiffusion:
        """The respaced Gaussian diffusion of ddpm / ddim, the full process for the others."""
        return create_diffusion(self.respacing if self.respaced else "")

    def flow(self) -> flow.FlowSampleSettings:
        """The flow solver's settings of euler / heun / euler_maruyama."""
        return flow.FlowSampleSettings(num_steps=self.num_steps, sampler=self.sampler, cfg_scale=self.cfg_scale,
                                       interval_min=self.interval_min, interval_max=self.interval_max,
                                       shift=self.shift, last_step=self.last_step)

    @property
    def encoder_calls(self) -> int | None:
        """How many steps run a DDT's condition encoder with this schedule (None: every step)."""
        return None if self.schedule is None else len(self.schedule)


def run_sample_settings(config: Any) -> SampleSettings:
    """The settings a training run draws its EMA samples with (its grids and quality evaluations,
    dit_jax/train/samples.py): train.sample_sampler ("" = the objective's default), sample_steps and
    sample_cfg_scale (a sampler of another objective gives way to the objective's default), guidance on every
    channel, x_0 clipped for Gaussian diffusion. ValueError when they do not fit (a respaced ddpm/ddim that does
    not divide the process)."""
    from dit_jax.diffusion.objectives import objective

    obj = objective(config.objective)
    t = config.train
    # a sampler of another objective is a config file's (dit_jax.train.config_schema refuses one typed on the
    # command line): the objective's default takes its place
    sampler = t.sample_sampler if t.sample_sampler in obj.samplers else obj.default_sampler
    return SampleSettings(sampler=sampler, num_steps=t.sample_steps,
                          cfg_scale=t.sample_cfg_scale, cfg_channels=None, clip_denoised=obj.name == "diffusion")
