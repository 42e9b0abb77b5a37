"""The objective table: what a model is trained with and therefore how it samples (docs/ARCHITECTURE.md, "Where to
add"). A config's `objective` names a row; the trainer, the config checks and the samplers read it here.

- diffusion: DiT's Gaussian diffusion (1000 linear-beta steps, the hybrid loss; dit_jax.diffusion.gaussian),
  sampled by DDPM or DDIM over respaced timesteps, or DPM-Solver++ (dit_jax.diffusion.dpm_solver); the model reads
  the integer timestep.
- flow: flow matching on the linear path (MCG-NJU/DDT; dit_jax.diffusion.flow), sampled by integrating the
  velocity (Euler, Heun, Euler-Maruyama); the model reads t * flow.time_scale.
"""

from __future__ import annotations

import dataclasses

from dit_jax.diffusion.flow import SAMPLERS as FLOW_SAMPLERS

DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


@dataclasses.dataclass(frozen=True)
class Objective:
    """samplers: the sampling methods of dit_jax.sampling that apply (the first is the default); time_input: what
    the model reads as its time ("timestep": the integer step of the 1000-step process; "time": t in [0, 1] times
    the run's flow.time_scale); title: its name in messages. A config's settings of objective NAME are the section
    config.NAME (diffusion.*, flow.*)."""

    name: str
    samplers: tuple[str, ...]
    time_input: str
    title: str = ""

    @property
    def default_sampler(self) -> str:
        return self.samplers[0]


OBJECTIVES: dict[str, Objective] = {
    "diffusion": Objective("diffusion", DIFFUSION_SAMPLERS, "timestep", title="Gaussian diffusion"),
    "flow": Objective("flow", FLOW_SAMPLERS, "time", title="flow matching"),
}
SAMPLERS: tuple[str, ...] = tuple(m for o in OBJECTIVES.values() for m in o.samplers)


def objective(name: str) -> Objective:
    """The row config.objective names (ValueError for an unknown one)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {tuple(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_of_sampler(method: str) -> Objective:
    """The objective a sampling method integrates (ValueError for an unknown method)."""
    for o in OBJECTIVES.values():
        if method in o.samplers:
            return o
    raise ValueError(f"unknown sampler {method!r}; expected one of {SAMPLERS}")
