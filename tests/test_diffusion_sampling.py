"""Respacing and the samplers (DDPM ancestral, DDIM), against a float64 numpy re-implementation of
the official loops written here, fed the same noise (regenerated from the key by the documented
protocol in dit_jax.diffusion.gaussian)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.diffusion import create_diffusion, space_timesteps

SHAPE = (2, 4, 4, 3)  # B, H, W, C
LABELS = np.array([3, 7])


def rbg_key(seed):
    """Most tests use "rbg" keys: any jax.random key works, and threefry's normal takes seconds to
    compile on a small CPU. test_loop_key_requirements uses a raw threefry PRNGKey."""
    return jax.random.key(seed, impl="rbg")

# The official space_timesteps(1000, "250") (obtained once by running facebookresearch/DiT's
# diffusion/respace.py), sorted.
OFFICIAL_250 = [
    0, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 68, 72, 76, 80, 84, 88, 92, 96, 100,
    104, 108, 112, 116, 120, 124, 128, 132, 136, 140, 144, 148, 152, 156, 160, 164, 169, 173, 177, 181, 185,
    189, 193, 197, 201, 205, 209, 213, 217, 221, 225, 229, 233, 237, 241, 245, 249, 253, 257, 261, 265, 269,
    273, 277, 281, 285, 289, 293, 297, 301, 305, 309, 313, 317, 321, 325, 329, 333, 337, 341, 345, 349, 353,
    357, 361, 365, 369, 373, 377, 381, 385, 389, 393, 397, 401, 405, 409, 413, 417, 421, 425, 429, 433, 437,
    441, 445, 449, 453, 457, 461, 465, 469, 473, 477, 481, 485, 489, 493, 497, 502, 506, 510, 514, 518, 522,
    526, 530, 534, 538, 542, 546, 550, 554, 558, 562, 566, 570, 574, 578, 582, 586, 590, 594, 598, 602, 606,
    610, 614, 618, 622, 626, 630, 634, 638, 642, 646, 650, 654, 658, 662, 666, 670, 674, 678, 682, 686, 690,
    694, 698, 702, 706, 710, 714, 718, 722, 726, 730, 734, 738, 742, 746, 750, 754, 758, 762, 766, 770, 774,
    778, 782, 786, 790, 794, 798, 802, 806, 810, 814, 818, 822, 826, 830, 835, 839, 843, 847, 851, 855, 859,
    863, 867, 871, 875, 879, 883, 887, 891, 895, 899, 903, 907, 911, 915, 919, 923, 927, 931, 935, 939, 943,
    947, 951, 955, 959, 963, 967, 971, 975, 979, 983, 987, 991, 995, 999,
]  # fmt: skip
# Official space_timesteps(300, "10,15,20") and space_timesteps(1000, "25"), sorted.
OFFICIAL_10_15_20 = [
    0, 11, 22, 33, 44, 55, 66, 77, 88, 99, 100, 107, 114, 121, 128, 135, 142, 149, 157, 164, 171, 178, 185,
    192, 199, 200, 205, 210, 216, 221, 226, 231, 236, 242, 247, 252, 257, 263, 268, 273, 278, 283, 289, 294, 299,
]  # fmt: skip
OFFICIAL_25 = [
    0, 42, 83, 125, 166, 208, 250, 291, 333, 375, 416, 458, 500, 541, 583, 624, 666, 708, 749, 791, 832, 874,
    916, 957, 999,
]  # fmt: skip


# ------------------------------------------------------------------------------------------------
# 3. respacing
# ------------------------------------------------------------------------------------------------


def test_space_timesteps_match_official():
    s250 = space_timesteps(1000, "250")
    assert isinstance(s250, set) and sorted(s250) == OFFICIAL_250
    assert 0 in s250 and 999 in s250
    ddim50 = space_timesteps(1000, "ddim50")
    assert sorted(ddim50) == list(range(0, 1000, 20))
    assert max(ddim50) == 980 < 999
    assert sorted(space_timesteps(300, "10,15,20")) == OFFICIAL_10_15_20
    assert space_timesteps(300, [10, 15, 20]) == set(OFFICIAL_10_15_20)
    assert sorted(space_timesteps(1000, "25")) == OFFICIAL_25
    assert sorted(space_timesteps(1000, "ddim10")) == list(range(0, 1000, 100))
    assert sorted(space_timesteps(100, "ddim7")) == list(range(0, 100, 15))
    assert space_timesteps(1000, [1000]) == set(range(1000))


@pytest.mark.parametrize("steps, spec", [(1000, "ddim1"), (1000, "ddim3000"), (10, "5,20"), (300, "200,1,1")])
def test_space_timesteps_errors(steps, spec):
    with pytest.raises(ValueError):
        space_timesteps(steps, spec)


@pytest.mark.parametrize("spec, steps", [("250", 1000), ("ddim50", 1000), ("10,15,20", 300), ("", 1000)])
def test_spaced_betas_keep_alphas_cumprod(spec, steps):
    base = create_diffusion("", diffusion_steps=steps)
    d = create_diffusion(spec, diffusion_steps=steps)
    kept = sorted(space_timesteps(steps, spec or [steps]))
    assert d.timestep_map == kept and d.num_timesteps == len(kept) and d.original_num_steps == steps
    np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-12, atol=0)
    if spec:
        assert not np.allclose(d.betas, base.betas[kept])  # the betas really were rebuilt


def test_model_sees_original_timesteps():
    d = create_diffusion("25")
    tmap = np.array(OFFICIAL_25)
    seen = []

    def model(x, t, y):
        seen.append(np.asarray(t))
        return jnp.concatenate([x * 0.1, jnp.tanh(x)], -1), t

    x = jnp.ones(SHAPE)
    t = jnp.array([0, 24], jnp.int32)
    out = d.p_mean_variance(model, x, t, model_kwargs=dict(y=LABELS))
    np.testing.assert_array_equal(np.asarray(out["extra"]), tmap[[0, 24]])
    seen.clear()
    d.training_losses(lambda x, t: model(x, t, None)[0], x, jnp.array([3, 20], jnp.int32), noise=x)
    np.testing.assert_array_equal(seen[0], tmap[[3, 20]])
    seen.clear()
    create_diffusion("25", use_kl=True).training_losses(lambda x, t: model(x, t, None)[0], x,
                                                        jnp.array([5, 6], jnp.int32), noise=x)
    np.testing.assert_array_equal(seen[0], tmap[[5, 6]])
    # cond_fn is wrapped too
    got = []
    d.condition_mean(lambda x, t: got.append(np.asarray(t)) or jnp.zeros_like(x), out, x, jnp.array([1, 2], jnp.int32))
    np.testing.assert_array_equal(got[0], tmap[[1, 2]])
    # and inside the scanned sampling loop
    record = set()

    def scanned_model(x, t, y):
        jax.debug.callback(lambda tt: record.update(np.asarray(tt).tolist()), t)
        return jnp.concatenate([x * 0.1, jnp.tanh(x)], -1)

    jax.block_until_ready(d.ddim_sample_loop(scanned_model, SHAPE, noise=x, model_kwargs=dict(y=LABELS)))
    jax.effects_barrier()
    assert record == set(OFFICIAL_25)


# ------------------------------------------------------------------------------------------------
# 5. samplers against numpy
# ------------------------------------------------------------------------------------------------


def model_jnp(x, t, y):
    tf = t[:, None, None, None].astype(jnp.float32)
    eps = 0.6 * x + 0.3 * jnp.sin(2 * x) + 1e-3 * tf + 0.05 * y[:, None, None, None].astype(jnp.float32)
    return jnp.concatenate([eps, jnp.tanh(x + 1e-3 * tf)], -1)


def model_np(x, t, y):
    tf = t[:, None, None, None].astype(np.float64)
    eps = 0.6 * x + 0.3 * np.sin(2 * x) + 1e-3 * tf + 0.05 * y[:, None, None, None]
    return np.concatenate([eps, np.tanh(x + 1e-3 * tf)], -1)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _protocol_noise(key, shape, n):
    init_key, loop_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape, jnp.float32)
    # lax.map runs the draws one key at a time (no batching), like separate calls.
    steps = jax.lax.map(lambda k: jax.random.normal(k, shape, jnp.float32), jax.random.split(loop_key, n))
    return x_T, steps


def protocol_noise(key, shape, n):
    """x_T and the per-step noise (n, *shape), as documented in dit_jax.diffusion.gaussian."""
    x_T, steps = _protocol_noise(key, shape, n)
    return np.asarray(x_T, np.float64), np.asarray(steps, np.float64)


def ref_tables(betas):
    b = np.asarray(betas, np.float64)
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = b * (1 - ab_prev) / (1 - ab)
    return dict(
        beta=b, ab=ab, ab_prev=ab_prev, ab_next=np.concatenate([ab[1:], [0.0]]),
        post_logvar=np.log(np.where(np.arange(len(b)) == 0, post_var[1], post_var)),
        coef1=np.sqrt(ab_prev) * b / (1 - ab), coef2=np.sqrt(1 - b) * (1 - ab_prev) / (1 - ab),
    )  # fmt: skip


def spaced_tables(spec, steps=1000):
    betas = np.linspace(0.1 / steps, 20.0 / steps, steps)
    kept = sorted(space_timesteps(steps, spec or [steps]))
    ab = np.cumprod(1 - betas)[kept]
    return ref_tables(1 - ab / np.concatenate([[1.0], ab[:-1]])), np.array(kept)


def ref_step_parts(tab, tmap, x, i, clip, cond=None):
    """The official p_mean_variance (learned range, eps) at spaced index i, in float64."""
    C = x.shape[-1]
    out = model_np(x, np.full(x.shape[0], tmap[i]), LABELS)
    eps, v = out[..., :C], out[..., C:]
    frac = (v + 1) / 2
    logvar = frac * np.log(tab["beta"][i]) + (1 - frac) * tab["post_logvar"][i]
    x0 = (x - np.sqrt(1 - tab["ab"][i]) * eps) / np.sqrt(tab["ab"][i])
    if clip:
        x0 = np.clip(x0, -1, 1)
    mean = tab["coef1"][i] * x0 + tab["coef2"][i] * x
    return mean, logvar, x0


def ref_ddpm(tab, tmap, x, step_noise, clip):
    N = len(tab["beta"])
    for n, i in enumerate(range(N - 1, -1, -1)):
        mean, logvar, _ = ref_step_parts(tab, tmap, x, i, clip)
        x = mean + (i > 0) * np.exp(0.5 * logvar) * step_noise[n]
    return x


def ref_ddim(tab, tmap, x, step_noise, eta, clip):
    N = len(tab["beta"])
    for n, i in enumerate(range(N - 1, -1, -1)):
        _, _, x0 = ref_step_parts(tab, tmap, x, i, clip)
        ab, ab_prev = tab["ab"][i], tab["ab_prev"][i]
        eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
        sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
        x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma**2) * eps + (i > 0) * sigma * step_noise[n]
    return x


@pytest.mark.parametrize("spec, clip", [("", True), ("25", False)])
def test_p_sample_loop_matches_numpy(spec, clip):
    d = create_diffusion(spec)
    tab, tmap = spaced_tables(spec)
    key = rbg_key(11)
    x_T, step_noise = protocol_noise(key, SHAPE, d.num_timesteps)
    if spec:  # x_T drawn from the key
        fn = jax.jit(lambda k, y: d.p_sample_loop(model_jnp, SHAPE, clip_denoised=clip, model_kwargs=dict(y=y),
                                                  key=k))
        ours = np.asarray(fn(key, jnp.asarray(LABELS)))
    else:  # x_T given explicitly: the step noise is the same (it does not depend on x_T)
        fn = jax.jit(lambda k, y, z: d.p_sample_loop(model_jnp, SHAPE, noise=z, clip_denoised=clip,
                                                     model_kwargs=dict(y=y), key=k))
        ours = np.asarray(fn(key, jnp.asarray(LABELS), jnp.asarray(x_T, jnp.float32)))
    ref = ref_ddpm(tab, tmap, x_T, step_noise, clip)
    assert np.abs(ref).max() > 0.3 and np.std(ref) > 0.1  # a non-degenerate sample
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec, eta", [("ddim10", 0.0), ("ddim10", 1.0), ("25", 0.0), ("25", 1.0)])
def test_ddim_sample_loop_matches_numpy(spec, eta):
    d = create_diffusion(spec)
    tab, tmap = spaced_tables(spec)
    key = rbg_key(12)
    x_T, step_noise = protocol_noise(key, SHAPE, d.num_timesteps)
    fn = jax.jit(lambda k: d.ddim_sample_loop(model_jnp, SHAPE, model_kwargs=dict(y=jnp.asarray(LABELS)), key=k,
                                              eta=eta, clip_denoised=False))
    ours = np.asarray(fn(key))
    ref = ref_ddim(tab, tmap, x_T, step_noise, eta, clip=False)
    assert np.std(ref) > 0.1
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_progressive_and_progress_bar_match_scan():
    d = create_diffusion("10")
    key = rbg_key(13)
    kw = dict(model_kwargs=dict(y=jnp.asarray(LABELS)), key=key)
    scan = np.asarray(d.p_sample_loop(model_jnp, SHAPE, **kw))
    outs = list(d.p_sample_loop_progressive(model_jnp, SHAPE, **kw))
    assert len(outs) == 10 and set(outs[-1]) == {"sample", "pred_xstart"}
    np.testing.assert_allclose(np.asarray(outs[-1]["sample"]), scan, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d.p_sample_loop(model_jnp, SHAPE, progress=True, **kw)), scan,
                               rtol=1e-6, atol=1e-6)
    ddim = np.asarray(d.ddim_sample_loop(model_jnp, SHAPE, eta=1.0, **kw))
    outs = list(d.ddim_sample_loop_progressive(model_jnp, SHAPE, eta=1.0, **kw))
    np.testing.assert_allclose(np.asarray(outs[-1]["sample"]), ddim, rtol=1e-6, atol=1e-6)
    assert not np.allclose(ddim, scan)


def test_loop_key_requirements():
    d = create_diffusion("10")
    noise = jnp.ones(SHAPE)
    kw = dict(model_kwargs=dict(y=jnp.asarray(LABELS)))
    with pytest.raises(ValueError, match="key"):
        d.p_sample_loop(model_jnp, SHAPE, **kw)
    with pytest.raises(ValueError, match="key"):
        d.p_sample_loop(model_jnp, SHAPE, noise=noise, **kw)  # the steps need noise
    with pytest.raises(ValueError, match="key"):
        d.ddim_sample_loop(model_jnp, SHAPE, noise=noise, eta=0.5, **kw)
    # deterministic DDIM needs only x_T
    a = d.ddim_sample_loop(model_jnp, SHAPE, noise=noise, **kw)
    b = d.ddim_sample_loop(model_jnp, SHAPE, noise=noise, key=jax.random.PRNGKey(0), **kw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_single_steps_with_guidance_and_reverse_match_numpy():
    spec = "25"
    d = create_diffusion(spec)
    tab, tmap = spaced_tables(spec)
    rng = np.random.default_rng(14)
    x = rng.standard_normal(SHAPE)
    noise = rng.standard_normal(SHAPE)
    i = 7
    t = jnp.full((SHAPE[0],), i, jnp.int32)
    xj, nj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(noise, jnp.float32), jnp.asarray(LABELS)

    def cond_fn(x, t, y):  # a fake grad log p(y | x), depending on the original t
        return -0.2 * x + 1e-3 * t[:, None, None, None].astype(jnp.float32)

    cond_np = -0.2 * x + 1e-3 * tmap[i]
    mean, logvar, x0 = ref_step_parts(tab, tmap, x, i, clip=True)
    # p_sample with condition_mean: mean + variance * gradient
    got = d.p_sample(model_jnp, xj, t, cond_fn=cond_fn, model_kwargs=dict(y=yj), noise=nj)
    ref = mean + np.exp(logvar) * cond_np + np.exp(0.5 * logvar) * noise
    np.testing.assert_allclose(np.asarray(got["sample"]), ref, rtol=1e-5, atol=1e-5)
    # ddim_sample with condition_score: eps shifted by -sqrt(1 - alpha_bar) * gradient
    ab, ab_prev = tab["ab"][i], tab["ab_prev"][i]
    eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab) - np.sqrt(1 - ab) * cond_np
    x0_c = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    sigma = np.sqrt((1 - ab_prev) / (1 - ab)) * np.sqrt(1 - ab / ab_prev)
    ref = np.sqrt(ab_prev) * x0_c + np.sqrt(1 - ab_prev - sigma**2) * eps + sigma * noise
    got = d.ddim_sample(model_jnp, xj, t, cond_fn=cond_fn, model_kwargs=dict(y=yj), eta=1.0, noise=nj)
    np.testing.assert_allclose(np.asarray(got["sample"]), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got["pred_xstart"]), x0_c, rtol=1e-5, atol=1e-5)
    # the reverse (inversion) step to x_{t+1}
    got = d.ddim_reverse_sample(model_jnp, xj, t, clip_denoised=False, model_kwargs=dict(y=yj))
    _, _, x0 = ref_step_parts(tab, tmap, x, i, clip=False)
    eps = (x - np.sqrt(ab) * x0) / np.sqrt(1 - ab)
    ref = np.sqrt(tab["ab_next"][i]) * x0 + np.sqrt(1 - tab["ab_next"][i]) * eps
    np.testing.assert_allclose(np.asarray(got["sample"]), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        d.ddim_reverse_sample(model_jnp, xj, t, model_kwargs=dict(y=yj), eta=0.5)
    # no noise at t == 0
    t0 = jnp.zeros((SHAPE[0],), jnp.int32)
    a = d.p_sample(model_jnp, xj, t0, model_kwargs=dict(y=yj), noise=nj)["sample"]
    b = d.p_sample(model_jnp, xj, t0, model_kwargs=dict(y=yj), noise=nj * 0)["sample"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
