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


def test_time_scale_reaches_the_encoder_and_plain_flow_sampler_matches(model):
    """A run trained with flow.time_scale != 1 is sampled with t * time_scale: DDTSampler (separately compiled
    encoder and decoder) and PlainFlowSampler (one solver loop) agree, and both differ from time_scale 1."""
    from dit_jax.sample_ddt import PlainFlowSampler

    labels = jnp.array([0, 5])
    noise = jax.random.normal(jax.random.key(3), (2, 8, 8, 4))
    shared = DDTSampler(model, SETTINGS, time_scale=1000.0)(labels, noise)
    plain_sampler = PlainFlowSampler(model, SETTINGS, time_scale=1000.0)
    plain = plain_sampler(labels, noise)
    np.testing.assert_allclose(np.asarray(shared), np.asarray(plain), rtol=0, atol=1e-5)
    assert plain_sampler.encoder_calls == 12 and plain_sampler.schedule == list(range(12))
    unscaled = DDTSampler(model, SETTINGS)(labels, noise)
    assert np.abs(np.asarray(unscaled) - np.asarray(shared)).max() > 1e-2


def test_make_flow_sampler_dispatches_on_the_condition_encoder(model):
    """A DDT with an encoder shares it; a DiT (SiT-style) has none to share, and its v is the first C channels."""
    from dit_jax.models import DiT
    from dit_jax.sample_ddt import PlainFlowSampler, make_flow_sampler

    assert isinstance(make_flow_sampler(model, SETTINGS, [0, 6]), DDTSampler)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
              learn_sigma=False, rngs=nnx.Rngs(1))
    randomize(dit, 6, scale=0.15)
    with pytest.raises(ValueError, match="condition encoder"):
        make_flow_sampler(dit, SETTINGS, [0, 6])
    sampler = make_flow_sampler(dit, SETTINGS, time_scale=1000.0)
    assert isinstance(sampler, PlainFlowSampler)
    labels = jnp.array([3, 9])
    noise = jax.random.normal(jax.random.key(4), (2, 8, 8, 4))
    # an independent Euler loop, eager, in numpy: guided on [uncond | cond] inside the interval
    times = SETTINGS.times()
    x = np.asarray(noise)
    y2 = jnp.concatenate([jnp.full_like(labels, 10), labels])
    for t, t_next in zip(times[:-1], times[1:]):
        out = np.asarray(dit(jnp.asarray(np.concatenate([x, x])), jnp.full((4,), t * 1000.0), y2))
        uncond, cond = out[:2], out[2:]
        scale = SETTINGS.cfg_scale if SETTINGS.interval_min < t < SETTINGS.interval_max else 1.0
        x = x + (uncond + scale * (cond - uncond)) * (t_next - t)
    got = np.asarray(sampler(labels, noise))
    np.testing.assert_allclose(got, x, rtol=0, atol=1e-4)
    assert sampler.encoder_calls == 0 and np.abs(x).max() > 0.5
