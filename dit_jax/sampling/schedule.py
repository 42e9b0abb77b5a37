"""DDT's statistical dynamic-programming sharing schedule (`dit-jax ddt-schedule`), as the reference's sharing_dp:
a template run (noises and labels from the seed, guidance as configured, the encoder recomputed every step)
records the self-condition s of every step; sim[i][j] is the token-mean cosine similarity of s_i and s_j; the
schedule is the exact minimum-cost split of the steps into num_recompute segments, each starting with one encoder
call (dit_jax.diffusion.sharing.dp_schedule). The template holds every step's s: num_steps x 2 x batch x tokens x
width floats (4.7 GB for XL/2, 250 steps, batch 8)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from flax import nnx

from dit_jax.diffusion.sharing import dp_schedule, schedule_cost, state_similarity, uniform_schedule
from dit_jax.sampling.methods import initial_noise, shared_euler
from dit_jax.sampling.sampler import example_keys
from dit_jax.sampling.settings import SampleSettings


def template_states(model: nnx.Module, settings: SampleSettings, labels: Any, keys: jax.Array,
                    time_scale: float = 1.0) -> tuple[jax.Array, np.ndarray]:
    """The Euler run with the encoder on every step -> (samples, every step's s (num_steps, ...) on the host)."""
    settings = dataclasses.replace(settings, schedule=None)
    graphdef, state = nnx.split(model)

    def run(state: Any, labels: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        m = nnx.merge(graphdef, state)
        return shared_euler(m, settings, labels, initial_noise(m, keys), time_scale, collect_states=True)

    x, states = jax.jit(run)(state, jax.numpy.asarray(labels, jax.numpy.int32), keys)
    return x, np.asarray(states)


def compute_schedule(model: nnx.Module, settings: SampleSettings, num_recompute: int, batch: int = 8,
                     seed: int = 0, time_scale: float = 1.0) -> dict[str, Any]:
    """Template run + DP. Returns schedule, its cost, the uniform schedule's cost and the similarity matrix."""
    labels = jax.random.randint(jax.random.key(seed), (batch,), 0, model.num_classes)
    _, states = template_states(model, settings, labels, example_keys(seed, np.arange(batch)), time_scale)
    sim = state_similarity(states)
    sched = dp_schedule(sim, num_recompute)
    n = settings.num_steps
    uniform = uniform_schedule(n, max(1, n // num_recompute))[:num_recompute]
    return dict(schedule=sched, cost=schedule_cost(sim, sched), uniform_cost=schedule_cost(sim, uniform), sim=sim)
