"""DDT sampling with encoder sharing (dit_jax/sample_ddt.py) against plain flow sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.diffusion import flow
from dit_jax.diffusion.sharing import dp_schedule, state_similarity, uniform_schedule
from dit_jax.models import DDT
from dit_jax.sample_ddt import DDTSampler
from tests.test_ddt import randomize


@pytest.fixture(scope="module")
def model():
    m = DDT(input_size=8, hidden_size=32, depth=3, num_heads=2, num_encoder_blocks=2, num_classes=10,
            rngs=nnx.Rngs(0))
    randomize(m, 5, scale=0.15)
    return m


SETTINGS = flow.FlowSampleSettings(num_steps=12, cfg_scale=2.0, interval_min=0.3, interval_max=1.0, last_step=0.04)


def test_refresh_every_step_equals_plain_sampling(model):
    labels = jnp.array([1, 4, 7])
    noise = jax.random.normal(jax.random.key(0), (3, 8, 8, 4))
    shared = DDTSampler(model, SETTINGS)(labels, noise)
    plain = flow.sample(flow.guided_velocity(lambda x, t, y: model(x, t, y)[0], labels, 10, SETTINGS), noise,
                        SETTINGS)
    np.testing.assert_array_equal(np.asarray(shared), np.asarray(plain))  # bit for bit
    assert np.abs(np.asarray(shared)).max() > 0.5


def test_sharing_skips_the_encoder_and_stays_close(model):
    labels = jnp.array([2, 3])
    noise = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    full = DDTSampler(model, SETTINGS)
    x_full, states = full(labels, noise, collect_states=True)
    assert full.encoder_calls == 12 and len(states) == 12 and states[0].shape == (4, 16, 32)  # [uncond | cond]
    sim = state_similarity(np.stack(states))
    sched = dp_schedule(sim, 4)
    assert sched[0] == 0 and len(sched) == 4
    shared = DDTSampler(model, SETTINGS, schedule=sched)
    x_shared = shared(labels, noise)
    assert shared.encoder_calls == 4
    uni = DDTSampler(model, SETTINGS, schedule=uniform_schedule(12, 3))
    x_uni = uni(labels, noise)
    assert uni.encoder_calls == 4
    err = lambda x: float(np.abs(np.asarray(x) - np.asarray(x_full)).mean())  # noqa: E731
    assert 0 < err(x_shared) < 0.5 * np.abs(np.asarray(x_full)).mean()
    assert np.isfinite(err(x_uni))


def test_bad_settings_and_schedules(model):
    with pytest.raises(ValueError, match="Euler"):
        DDTSampler(model, flow.FlowSampleSettings(num_steps=4, sampler="heun"))
    with pytest.raises(ValueError):
        DDTSampler(model, SETTINGS, schedule=[1, 2])  # must start at 0
    with pytest.raises(ValueError, match="labels"):
        DDTSampler(model, SETTINGS)(jnp.array([1, 2, 3]), jnp.zeros((2, 8, 8, 4)))
