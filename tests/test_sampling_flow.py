"""The flow methods of dit_jax.sampling (euler, heun, euler_maruyama, DDT encoder sharing) against the library
functions they wrap (dit_jax.diffusion.flow.sample) and against an independent eager loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.diffusion import flow
from dit_jax.diffusion.sharing import dp_schedule, state_similarity, uniform_schedule
from dit_jax.models import DDT, DiT
from dit_jax.sampling import Sampler, SampleSettings, data_mesh, example_keys
from dit_jax.sampling.methods import initial_noise, shared_euler, velocity_fn
from dit_jax.sampling.schedule import template_states
from tests.test_ddt import randomize


@pytest.fixture(scope="module")
def model():
    m = DDT(input_size=8, hidden_size=32, depth=3, num_heads=2, num_encoder_blocks=2, num_classes=10,
            rngs=nnx.Rngs(0))
    randomize(m, 5, scale=0.15)
    return m


@pytest.fixture(scope="module")
def dit():
    """A DiT read as a velocity model (SiT-style: objective=flow, learn_sigma False)."""
    m = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=False, rngs=nnx.Rngs(1))
    randomize(m, 6, scale=0.15)
    return m


KW = dict(num_steps=12, cfg_scale=2.0, interval_min=0.3, interval_max=1.0, last_step=0.04)
SETTINGS = SampleSettings(sampler="euler", **KW)
ONE = data_mesh(jax.devices()[:1])


def library(model, settings, labels, keys, time_scale=1.0):
    """What the sampler must equal: flow.sample over flow.guided_velocity, from normal(keys[i])."""
    fs = settings.flow()
    v = flow.guided_velocity(velocity_fn(model, time_scale), labels, model.num_classes, fs)
    key = keys if settings.sampler == "euler_maruyama" else None
    return np.asarray(jax.jit(lambda n: flow.sample(v, n, fs, key=key))(initial_noise(model, keys)))


@pytest.mark.parametrize("method", ["euler", "heun", "euler_maruyama"])
def test_each_flow_method_is_the_library_solver(model, dit, method):
    labels = np.array([1, 4, 7])
    keys = example_keys(3, np.arange(3))
    settings = SampleSettings(sampler=method, **KW)
    for m, ts in ((model, 1.0), (dit, 1000.0)):
        got = np.asarray(Sampler(m, settings, time_scale=ts, mesh=ONE)(labels, keys))
        np.testing.assert_allclose(got, library(m, settings, jnp.asarray(labels), keys, ts), rtol=0, atol=1e-5)
        assert np.abs(got).max() > 0.5
    heun = np.asarray(Sampler(model, SampleSettings(sampler="heun", **KW), mesh=ONE)(labels, keys))
    euler = np.asarray(Sampler(model, SETTINGS, mesh=ONE)(labels, keys))
    assert np.abs(heun - euler).max() > 1e-3  # the methods differ


def test_euler_maruyama_noise_is_per_example(model):
    """Example i's noise (x_0 and every step's) comes from its own key: the same sample alone or in a batch, on
    one device or eight (padded), and a different key gives a different sample."""
    settings = SampleSettings(sampler="euler_maruyama", **KW)
    labels, keys = np.array([2, 5, 9]), example_keys(7, np.arange(3))
    batch = np.asarray(Sampler(model, settings, mesh=ONE)(labels, keys))
    alone = np.asarray(Sampler(model, settings, mesh=ONE)(labels[1:2], keys[1:2]))
    np.testing.assert_allclose(alone[0], batch[1], rtol=0, atol=1e-5)
    eight = np.asarray(Sampler(model, settings, mesh=data_mesh())(labels, keys))
    np.testing.assert_allclose(eight, batch, rtol=0, atol=1e-5)
    other = np.asarray(Sampler(model, settings, mesh=ONE)(labels, example_keys(8, np.arange(3))))
    assert np.abs(other - batch).max() > 0.1


def test_refresh_every_step_equals_plain_sampling(model):
    labels = jnp.array([1, 4, 7])
    keys = example_keys(0, np.arange(3))
    shared = jax.jit(lambda n: shared_euler(model, SETTINGS, labels, n)[0])(initial_noise(model, keys))
    np.testing.assert_allclose(np.asarray(shared), library(model, SETTINGS, labels, keys), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(shared)).max() > 0.5


def test_an_independent_eager_loop_in_numpy(dit):
    """Euler on a DiT velocity model, guided inside the interval, t * 1000 for the model, in an eager numpy loop
    with the official [cond | uncond] batch: the sampler's paired batch changes nothing."""
    labels = jnp.array([3, 9])
    keys = example_keys(4, np.arange(2))
    x = np.asarray(initial_noise(dit, keys))
    times = SETTINGS.flow().times()
    y2 = jnp.concatenate([labels, jnp.full_like(labels, 10)])
    for t, t_next in zip(times[:-1], times[1:]):
        out = np.asarray(dit(jnp.asarray(np.concatenate([x, x])), jnp.full((4,), t * 1000.0), y2))[..., :4]
        cond, uncond = out[:2], out[2:]
        scale = KW["cfg_scale"] if KW["interval_min"] < t < KW["interval_max"] else 1.0
        x = x + (uncond + scale * (cond - uncond)) * (t_next - t)
    sampler = Sampler(dit, SETTINGS, time_scale=1000.0, mesh=ONE)
    np.testing.assert_allclose(np.asarray(sampler(labels, keys)), x, rtol=0, atol=1e-4)
    assert sampler.encoder_calls == 0 and np.abs(x).max() > 0.5


def test_sharing_reuses_the_encoder_output_and_stays_close(model):
    labels = np.array([2, 3])
    keys = example_keys(1, np.arange(2))
    x_full, states = template_states(model, SETTINGS, labels, keys)
    assert states.shape == (12, 4, 16, 32)  # every step's s, of the guided (paired) batch
    sched = dp_schedule(state_similarity(states), 4)
    assert sched[0] == 0 and len(sched) == 4
    shared = Sampler(model, SampleSettings(sampler="euler", schedule=sched, **KW), mesh=ONE)
    x_shared = np.asarray(shared(labels, keys))
    assert shared.encoder_calls == 4
    # between two scheduled steps the decoder sees the same s: the encoder did not run
    _, kept = jax.jit(lambda n: shared_euler(model, shared.settings, jnp.asarray(labels), n, collect_states=True))(
        initial_noise(model, keys))
    kept = np.asarray(kept)
    for i in range(12):
        last = max(j for j in sched if j <= i)
        np.testing.assert_array_equal(kept[i], kept[last])
        if i in sched and i:
            assert np.abs(kept[i] - kept[i - 1]).max() > 0  # a scheduled step re-encodes
    uni = Sampler(model, SampleSettings(sampler="euler", schedule=uniform_schedule(12, 3), **KW), mesh=ONE)
    x_uni = np.asarray(uni(labels, keys))
    err = lambda x: float(np.abs(x - np.asarray(x_full)).mean())  # noqa: E731
    assert 0 < err(x_shared) < 0.5 * np.abs(np.asarray(x_full)).mean()
    assert np.isfinite(err(x_uni))


def test_time_scale_reaches_the_encoder(model):
    """A run trained with flow.time_scale != 1 is sampled with t * time_scale, with and without sharing."""
    labels, keys = np.array([0, 5]), example_keys(3, np.arange(2))
    every = SampleSettings(sampler="euler", schedule=tuple(range(12)), **KW)
    shared = np.asarray(Sampler(model, every, time_scale=1000.0, mesh=ONE)(labels, keys))
    plain = np.asarray(Sampler(model, SETTINGS, time_scale=1000.0, mesh=ONE)(labels, keys))
    np.testing.assert_allclose(shared, plain, rtol=0, atol=1e-5)
    unscaled = np.asarray(Sampler(model, SETTINGS, mesh=ONE)(labels, keys))
    assert np.abs(unscaled - shared).max() > 1e-2


def test_bad_settings_and_models(model, dit):
    with pytest.raises(ValueError, match="Euler"):
        SampleSettings(sampler="heun", num_steps=4, schedule=(0, 2))
    with pytest.raises(ValueError):
        SampleSettings(sampler="euler", num_steps=12, schedule=(1, 2))  # must start at 0
    with pytest.raises(ValueError, match="condition encoder"):
        Sampler(dit, SampleSettings(sampler="euler", schedule=(0, 6), **KW))
    with pytest.raises(ValueError, match="objective=diffusion"):
        Sampler(model, SampleSettings(sampler="ddpm"))  # a DDT trains with flow only
    with pytest.raises(ValueError, match="keys"):
        Sampler(model, SETTINGS, mesh=ONE)(np.array([1, 2, 3]), example_keys(0, np.arange(2)))
