"""Gaussian diffusion: schedules, posteriors, likelihoods and training losses.

References: diffusers' DDPMScheduler (schedules, one DDPM step), and a float64 numpy re-derivation
written here from the DDPM / IDDPM formulas (not from dit_jax code).
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    get_beta_schedule,
    get_named_beta_schedule,
    normal_kl,
)

SHAPE = (4, 4, 4, 3)  # B, H, W, C
LN2 = math.log(2.0)


# ------------------------------------------------------------------------------------------------
# float64 numpy reference, from the formulas
# ------------------------------------------------------------------------------------------------


def ref_linear_betas(T):
    return np.linspace(0.1 / T, 20.0 / T, T)  # Ho et al. 1e-4 .. 0.02, scaled by 1000 / T


def ref_cosine_betas(T):
    s = np.arange(T + 1) / T
    f = np.cos((s + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], 0.999)


def ref_spaced_betas(betas, kept):
    ab = np.cumprod(1 - betas)[sorted(kept)]
    return 1 - ab / np.concatenate([[1.0], ab[:-1]])


def ref_tables(betas):
    b = np.asarray(betas, np.float64)
    ab = np.cumprod(1 - b)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    post_var = b * (1 - ab_prev) / (1 - ab)  # beta~_t
    return dict(
        beta=b,
        ab=ab,
        ab_prev=ab_prev,
        post_var=post_var,
        post_logvar=np.log(np.where(np.arange(len(b)) == 0, post_var[1], post_var)),
        coef1=np.sqrt(ab_prev) * b / (1 - ab),  # DDPM eq. 7
        coef2=np.sqrt(1 - b) * (1 - ab_prev) / (1 - ab),
    )


def col(a, t, ndim=4):
    return a[t].reshape((-1,) + (1,) * (ndim - 1))


def ref_normal_kl(m1, lv1, m2, lv2):
    # KL(N1 || N2) = log(s2/s1) + (s1^2 + (m1-m2)^2) / (2 s2^2) - 1/2
    return 0.5 * (lv2 - lv1) + (np.exp(lv1) + (m1 - m2) ** 2) / (2 * np.exp(lv2)) - 0.5


def ref_cdf(x):  # the tanh approximation of Phi used by the official code
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def ref_disc_ll(x, mean, log_scale):
    s = np.exp(log_scale)
    upper = ref_cdf((x - mean + 1 / 255) / s)
    lower = ref_cdf((x - mean - 1 / 255) / s)
    p = np.where(x < -0.999, upper, np.where(x > 0.999, 1 - lower, upper - lower))
    return np.log(np.maximum(p, 1e-12))


def ref_p_mean_var(tab, out, x, t, mean_type="eps", var_type="learned_range", clip=False):
    C = x.shape[-1]
    if var_type == "learned_range":
        out, v = out[..., :C], out[..., C:]
        frac = (v + 1) / 2
        logvar = frac * col(np.log(tab["beta"]), t) + (1 - frac) * col(tab["post_logvar"], t)
    elif var_type == "fixed_large":
        var = tab["beta"].copy()
        var[0] = tab["post_var"][1]
        logvar = col(np.log(var), t) + 0 * x
    else:
        logvar = col(tab["post_logvar"], t) + 0 * x
    if mean_type == "x0":
        x0 = out
    else:  # x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
        x0 = (x - col(np.sqrt(1 - tab["ab"]), t) * out) / col(np.sqrt(tab["ab"]), t)
    if clip:
        x0 = np.clip(x0, -1, 1)
    mean = col(tab["coef1"], t) * x0 + col(tab["coef2"], t) * x
    return mean, logvar, x0


def ref_vb(tab, x0, xt, t, out, mean_type="eps", var_type="learned_range"):
    true_mean = col(tab["coef1"], t) * x0 + col(tab["coef2"], t) * xt
    true_logvar = col(tab["post_logvar"], t) + 0 * x0
    mean, logvar, _ = ref_p_mean_var(tab, out, xt, t, mean_type, var_type)
    kl = ref_normal_kl(true_mean, true_logvar, mean, logvar).mean(axis=(1, 2, 3)) / LN2
    nll = -ref_disc_ll(x0, mean, 0.5 * logvar).mean(axis=(1, 2, 3)) / LN2
    return np.where(t == 0, nll, kl)


def ref_training_losses(tab, x0, t, noise, out, mean_type, var_type, loss_type):
    T = len(tab["beta"])
    xt = col(np.sqrt(tab["ab"]), t) * x0 + col(np.sqrt(1 - tab["ab"]), t) * noise
    if loss_type in ("kl", "rescaled_kl"):
        vb = ref_vb(tab, x0, xt, t, out, mean_type, var_type)
        return {"loss": vb * (T if loss_type == "rescaled_kl" else 1)}
    terms = {}
    C = x0.shape[-1]
    if var_type == "learned_range":
        terms["vb"] = ref_vb(tab, x0, xt, t, out, mean_type, var_type)
        if loss_type == "rescaled_mse":
            terms["vb"] = terms["vb"] * T / 1000
    target = {
        "eps": noise,
        "x0": x0,
        "prev": col(tab["coef1"], t) * x0 + col(tab["coef2"], t) * xt,
    }[mean_type]
    terms["mse"] = ((target - out[..., :C]) ** 2).mean(axis=(1, 2, 3))
    terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
    return terms


def data(seed=0):
    """x0 in [-1, 1] with exact +-1 entries (the edge bins), and the noise; float32 values."""
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    x0[:, 0, 0, 0] = -1.0
    x0[:, 1, 1, 1] = 1.0
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    return x0, noise


def assert_close(ours, ref, tol=1e-6):
    np.testing.assert_allclose(np.asarray(ours, np.float64), ref, rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# 1. schedules and one DDPM step against diffusers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(schedule):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule=schedule)
    d = create_diffusion("", noise_schedule=schedule)
    assert d.betas.dtype == np.float64 and d.betas.shape == (1000,)
    np.testing.assert_allclose(d.betas, sched.betas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(d.alphas_cumprod, sched.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
    ref = ref_linear_betas(1000) if schedule == "linear" else ref_cosine_betas(1000)
    np.testing.assert_allclose(d.betas, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "learned_range"])
def test_ddpm_step_matches_diffusers(variance_type):
    """Posterior mean coefficients, x0 prediction and variance vs DDPMScheduler.step/_get_variance.

    Same model output, x_t and noise on both sides (diffusers draws its noise from the seeded torch
    generator; we regenerate it and pass it to p_sample). t = 0 is checked separately: diffusers
    clamps the zero posterior variance to 1e-20 where the official code uses the clipped log
    posterior variance (entry 1), so there only the mean is compared with diffusers.
    """
    import torch
    from diffusers import DDPMScheduler

    learned = variance_type == "learned_range"
    sched = DDPMScheduler(
        num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", variance_type=variance_type
    )
    # diffusers keeps alphas_cumprod as a float32 cumprod (~1e-6 relative error, amplified by
    # 1/sqrt(alpha_bar) at large t): rebuild it in float64 from its own betas and step in float64,
    # so that this compares the formulas rather than diffusers' rounding.
    sched.alphas_cumprod = torch.cumprod(1 - sched.betas.double(), 0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    d = create_diffusion("", learn_sigma=learned, sigma_small=True)
    tab = ref_tables(ref_linear_betas(1000))
    rng = np.random.default_rng(1)
    B, H, W, C = SHAPE
    for step in [0, 1, 10, 100, 500, 999]:
        x = rng.standard_normal(SHAPE).astype(np.float32)
        out = rng.standard_normal((B, H, W, 2 * C if learned else C)).astype(np.float32)
        if learned:
            out[..., C:] = rng.uniform(-1, 1, (B, H, W, C))
        to_nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2), np.float64))  # noqa: E731
        ref = sched.step(to_nchw(out), step, to_nchw(x), generator=torch.Generator().manual_seed(step))
        noise = torch.randn((B, C, H, W), generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        noise = noise.numpy().transpose(0, 2, 3, 1).astype(np.float32)  # what diffusers used, to float32 precision

        model = lambda x_, t_: jnp.asarray(out)  # noqa: E731
        t = jnp.full((B,), step, jnp.int32)
        ours = d.p_sample(model, jnp.asarray(x), t, noise=jnp.asarray(noise))
        assert_close(ours["pred_xstart"], ref.pred_original_sample.numpy().transpose(0, 2, 3, 1), 1e-6)
        assert_close(ours["sample"], ref.prev_sample.numpy().transpose(0, 2, 3, 1), 2e-6)

        pmv = d.p_mean_variance(model, jnp.asarray(x), t)
        _, ref_logvar, _ = ref_p_mean_var(tab, out.astype(np.float64), x, np.full(B, step), "eps", variance_type, True)
        assert_close(pmv["log_variance"], ref_logvar, 1e-6)
        if step == 0:
            continue
        if learned:
            pv = torch.from_numpy(out[..., C:].transpose(0, 3, 1, 2).astype(np.float64))
            diff_logvar = sched._get_variance(step, predicted_variance=pv).numpy().transpose(0, 2, 3, 1)
            assert_close(pmv["log_variance"], diff_logvar, 1e-6)
        else:
            diff_var = float(sched._get_variance(step))
            np.testing.assert_allclose(np.asarray(pmv["variance"]), diff_var, rtol=1e-6, atol=1e-12)
    # t = 0 (the documented difference): diffusers interpolates towards log(1e-20), the official code
    # towards log(posterior_variance[1]) (checked against numpy above).
    if learned:
        diff_logvar0 = float(sched._get_variance(0, predicted_variance=torch.zeros(1, dtype=torch.float64))[0])
        np.testing.assert_allclose(diff_logvar0, 0.5 * np.log(1e-4) + 0.5 * np.log(1e-20), rtol=1e-6)
        assert float(jnp.min(pmv["log_variance"])) > -12


# ------------------------------------------------------------------------------------------------
# 2. likelihood utilities, tables, the VB terms and training losses against numpy
# ------------------------------------------------------------------------------------------------


def test_utils_match_numpy():
    rng = np.random.default_rng(2)
    m1, m2 = rng.standard_normal((2, 64))
    lv1, lv2 = rng.uniform(-8, 1, (2, 64))
    assert_close(normal_kl(*(jnp.asarray(a, jnp.float32) for a in (m1, lv1, m2, lv2))), ref_normal_kl(
        *(a.astype(np.float32).astype(np.float64) for a in (m1, lv1, m2, lv2))), 2e-6)
    assert_close(normal_kl(jnp.asarray(m1, jnp.float32), 0.0, 0.0, 0.0), ref_normal_kl(m1.astype(np.float32), 0, 0, 0))
    z = np.linspace(-4, 4, 81)
    assert_close(approx_standard_normal_cdf(jnp.asarray(z, jnp.float32)), ref_cdf(z), 1e-6)
    exact = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in z])
    assert np.abs(ref_cdf(z) - exact).max() < 1e-3  # the approximation is close to Phi
    x = np.concatenate([[-1.0, 1.0], rng.uniform(-1, 1, 62)]).astype(np.float32)
    log_scale = rng.uniform(np.log(0.003), np.log(0.03), 64).astype(np.float32)
    # Means within ~2 std of x: bins with tiny mass are float32 cancellation, here and officially.
    mean = (x + np.exp(log_scale) * rng.standard_normal(64)).astype(np.float32)
    ours = discretized_gaussian_log_likelihood(jnp.asarray(x), means=jnp.asarray(mean), log_scales=jnp.asarray(log_scale))
    assert_close(ours, ref_disc_ll(x.astype(np.float64), mean.astype(np.float64), log_scale.astype(np.float64)), 1e-5)
    cont = continuous_gaussian_log_likelihood(jnp.asarray(x), means=jnp.asarray(mean), log_scales=jnp.asarray(log_scale))
    zz = (x.astype(np.float64) - mean) / np.exp(log_scale.astype(np.float64))
    assert_close(cont, -0.5 * zz**2 - 0.5 * np.log(2 * np.pi), 1e-5)


def test_tables_and_q_functions_match_numpy():
    d = create_diffusion("")
    tab = ref_tables(ref_linear_betas(1000))
    np.testing.assert_allclose(d.posterior_variance, tab["post_var"], rtol=1e-12)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, tab["post_logvar"], rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef1, tab["coef1"], rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef2, tab["coef2"], rtol=1e-12)
    x0, noise = data()
    t = np.array([0, 1, 500, 999])
    tj = jnp.asarray(t, jnp.int32)
    xt = d.q_sample(jnp.asarray(x0), tj, noise=jnp.asarray(noise))
    xt_ref = col(np.sqrt(tab["ab"]), t) * x0 + col(np.sqrt(1 - tab["ab"]), t) * noise
    assert_close(xt, xt_ref)
    mean, var, logvar = d.q_mean_variance(jnp.asarray(x0), tj)
    assert_close(mean, col(np.sqrt(tab["ab"]), t) * x0)
    assert_close(var, col(1 - tab["ab"], t) + 0 * x0)
    assert_close(logvar, col(np.log(1 - tab["ab"]), t) + 0 * x0)
    pm, pv, plv = d.q_posterior_mean_variance(jnp.asarray(x0), xt, tj)
    xt64 = np.asarray(xt, np.float64)
    assert_close(pm, col(tab["coef1"], t) * x0 + col(tab["coef2"], t) * xt64)
    assert_close(pv, col(tab["post_var"], t) + 0 * x0)
    assert_close(plv, col(tab["post_logvar"], t) + 0 * x0)
    # eps <-> x0 round trip
    eps = d._predict_eps_from_xstart(xt, tj, jnp.asarray(x0))
    assert_close(d._predict_xstart_from_eps(xt, tj, eps), x0, 1e-4)
    with pytest.raises(ValueError):
        d.q_sample(jnp.asarray(x0), tj)  # neither noise nor key


def test_vb_terms_bpd_matches_numpy():
    d = create_diffusion("")
    tab = ref_tables(ref_linear_betas(1000))
    x0, noise = data(3)
    rng = np.random.default_rng(3)
    out = np.concatenate([noise + 0.3 * rng.standard_normal(SHAPE), rng.uniform(-1, 1, SHAPE)], -1).astype(np.float32)
    t = np.array([0, 1, 500, 999])
    xt = np.asarray(d.q_sample(jnp.asarray(x0), jnp.asarray(t, jnp.int32), noise=jnp.asarray(noise)))
    res = d._vb_terms_bpd(lambda x, tt: jnp.asarray(out), jnp.asarray(x0), jnp.asarray(xt), jnp.asarray(t, jnp.int32),
                          clip_denoised=False)
    ref = ref_vb(tab, x0.astype(np.float64), xt.astype(np.float64), t, out.astype(np.float64))
    assert_close(res["output"], ref, 1e-6)
    assert float(res["output"][0]) > 0.5  # the t = 0 decoder NLL is a real, non-trivial value


CONFIGS = {
    # name: (factory, mean_type, var_type, loss_type, reference betas)
    "mse_learned_range": (lambda: create_diffusion(""), "eps", "learned_range", "mse", ref_linear_betas(1000)),
    "rescaled_mse_T500": (
        lambda: create_diffusion("", rescale_learned_sigmas=True, diffusion_steps=500),
        "eps", "learned_range", "rescaled_mse", ref_linear_betas(500),
    ),
    "kl": (
        lambda: GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type=ModelMeanType.EPSILON,
                                  model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.KL),
        "eps", "learned_range", "kl", ref_linear_betas(1000),
    ),
    "rescaled_kl": (lambda: create_diffusion("", use_kl=True), "eps", "learned_range", "rescaled_kl",
                    ref_linear_betas(1000)),
    "kl_fixed_large": (
        lambda: GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type=ModelMeanType.EPSILON,
                                  model_var_type=ModelVarType.FIXED_LARGE, loss_type=LossType.KL),
        "eps", "fixed_large", "kl", ref_linear_betas(1000),
    ),
    "kl_fixed_small": (
        lambda: GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type=ModelMeanType.EPSILON,
                                  model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.KL),
        "eps", "fixed_small", "kl", ref_linear_betas(1000),
    ),
    "start_x": (lambda: create_diffusion("", predict_xstart=True), "x0", "learned_range", "mse", ref_linear_betas(1000)),
    "fixed_small": (lambda: create_diffusion("", learn_sigma=False, sigma_small=True), "eps", "fixed_small", "mse",
                    ref_linear_betas(1000)),
    "fixed_large": (lambda: create_diffusion("", learn_sigma=False), "eps", "fixed_large", "mse",
                    ref_linear_betas(1000)),
    "previous_x": (
        lambda: GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000),
                                  model_mean_type=ModelMeanType.PREVIOUS_X, model_var_type=ModelVarType.FIXED_LARGE,
                                  loss_type=LossType.MSE),
        "prev", "fixed_large", "mse", ref_linear_betas(1000),
    ),
    # The DiT release treats LEARNED exactly like LEARNED_RANGE.
    "learned_as_range": (
        lambda: GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type=ModelMeanType.EPSILON,
                                  model_var_type=ModelVarType.LEARNED, loss_type=LossType.MSE),
        "eps", "learned_range", "mse", ref_linear_betas(1000),
    ),
    "cosine": (lambda: create_diffusion("", noise_schedule="squaredcos_cap_v2"), "eps", "learned_range", "mse",
               ref_cosine_betas(1000)),
    "spaced_250": (
        lambda: create_diffusion("250"), "eps", "learned_range", "mse", None,  # betas from the diffusion's map
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_losses_match_numpy(name):
    factory, mean_type, var_type, loss_type, betas = CONFIGS[name]
    d = factory()
    if betas is None:
        betas = ref_spaced_betas(ref_linear_betas(1000), d.timestep_map)
    tab = ref_tables(betas)
    T = len(betas)
    assert d.num_timesteps == T
    x0, noise = data(4)
    rng = np.random.default_rng(4)
    t = np.array([0, 1, T // 2, T - 1])
    xt = col(np.sqrt(tab["ab"]), t) * x0 + col(np.sqrt(1 - tab["ab"]), t) * noise
    first = {
        "eps": noise + 0.3 * rng.standard_normal(SHAPE),
        "x0": x0 + 0.005 * rng.standard_normal(SHAPE),
        "prev": col(tab["coef1"], t) * x0 + col(tab["coef2"], t) * xt + 0.005 * rng.standard_normal(SHAPE),
    }[mean_type]
    parts = [first, rng.uniform(-1, 1, SHAPE)] if var_type == "learned_range" else [first]
    out = np.concatenate(parts, -1).astype(np.float32)

    got = jax.jit(lambda: d.training_losses(lambda x, tt: jnp.asarray(out), jnp.asarray(x0),
                                            jnp.asarray(t, jnp.int32), noise=jnp.asarray(noise)))()
    ref = ref_training_losses(tab, x0.astype(np.float64), t, noise.astype(np.float64), out.astype(np.float64),
                              mean_type, var_type, loss_type)
    assert set(got) == set(ref)
    # RESCALED_KL multiplies the bound by T: compare the bound itself at float32 resolution.
    scale = T if loss_type == "rescaled_kl" else 1
    for k in ref:
        assert got[k].shape == (SHAPE[0],)
        assert_close(np.asarray(got[k]) / scale, ref[k] / scale, 1e-6)
    if loss_type == "rescaled_kl":
        kl = ref_training_losses(tab, x0.astype(np.float64), t, noise.astype(np.float64), out.astype(np.float64),
                                 mean_type, var_type, "kl")
        assert_close(np.asarray(got["loss"]) / T, kl["loss"], 1e-6)
    if loss_type == "rescaled_mse":  # the factor T/1000 = 0.5 is really applied
        plain = ref_training_losses(tab, x0.astype(np.float64), t, noise.astype(np.float64), out.astype(np.float64),
                                    mean_type, var_type, "mse")
        assert not np.allclose(plain["vb"], np.asarray(got["vb"]), rtol=1e-3)


def test_training_losses_key_and_errors():
    d = create_diffusion("")
    x0, _ = data()
    t = jnp.array([0, 10, 500, 999], jnp.int32)
    model = lambda x, tt: jnp.concatenate([x, x], -1)  # noqa: E731
    a = d.training_losses(model, jnp.asarray(x0), t, key=jax.random.key(0, impl="rbg"))  # any key type works
    noise = jax.random.normal(jax.random.key(0, impl="rbg"), SHAPE, jnp.float32)
    b = d.training_losses(model, jnp.asarray(x0), t, noise=noise)
    np.testing.assert_array_equal(np.asarray(a["loss"]), np.asarray(b["loss"]))
    with pytest.raises(ValueError, match="key"):
        d.training_losses(model, jnp.asarray(x0), t)
    with pytest.raises(ValueError, match="learned-variance"):
        d.training_losses(lambda x, tt: x, jnp.asarray(x0), t, noise=noise)


# ------------------------------------------------------------------------------------------------
# 4. / 6. gradients
# ------------------------------------------------------------------------------------------------


def test_vb_stops_gradient_through_eps_only():
    d = create_diffusion("")
    x0, noise = data(5)
    rng = np.random.default_rng(5)
    out0 = jnp.asarray(np.concatenate([noise + 0.3 * rng.standard_normal(SHAPE), rng.uniform(-1, 1, SHAPE)], -1),
                       jnp.float32)
    t = jnp.array([0, 3, 400, 999], jnp.int32)
    C = SHAPE[-1]

    def term(out, name):
        return d.training_losses(lambda x, tt: out, jnp.asarray(x0), t, noise=jnp.asarray(noise))[name].sum()

    grad = jax.jit(jax.grad(term), static_argnums=1)
    g_vb = grad(out0, "vb")
    assert float(jnp.abs(g_vb[..., :C]).max()) == 0.0
    assert float(jnp.abs(g_vb[..., C:]).max()) > 1e-3
    g_loss, g_mse = grad(out0, "loss"), grad(out0, "mse")
    np.testing.assert_allclose(np.asarray(g_loss[..., :C]), np.asarray(g_mse[..., :C]), rtol=1e-6, atol=1e-9)
    assert float(jnp.abs(g_loss[..., :C]).max()) > 1e-3
    # Without the stop-gradient (the KL loss), the bound does reach eps.
    d_kl = create_diffusion("", use_kl=True)
    g_kl = jax.jit(jax.grad(lambda o: d_kl.training_losses(lambda x, tt: o, jnp.asarray(x0), t,
                                                           noise=jnp.asarray(noise))["loss"].sum()))(out0)
    assert float(jnp.abs(g_kl[..., :C]).max()) > 1e-3


def test_training_losses_jit_and_grad_of_params():
    d = create_diffusion("")
    x0, noise = data(6)
    C = SHAPE[-1]
    params = {"w": jnp.eye(C, 2 * C) * 0.5, "b": jnp.zeros((2 * C,))}
    t = jnp.array([0, 7, 300, 999], jnp.int32)

    def loss_fn(p, name="loss"):
        model = lambda x, tt: jnp.tanh(x @ p["w"] + p["b"] + tt[:, None, None, None] / 1000.0)  # noqa: E731
        return d.training_losses(model, jnp.asarray(x0), t, noise=jnp.asarray(noise))[name].mean()

    val, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    assert np.isfinite(float(val))
    for g in jax.tree.leaves(grads):
        assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).max()) > 0
    # "loss" is a surrogate (its vb part ignores eps), but "mse" is differentiated exactly:
    # central difference along its gradient direction.
    f = jax.jit(lambda p: loss_fn(p, "mse"))
    g_mse = jax.jit(jax.grad(lambda p: loss_fn(p, "mse")))(params)
    norm = float(np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(g_mse))))
    h = 1e-3
    step = jax.tree.map(lambda g: h * g / norm, g_mse)
    fd = (float(f(jax.tree.map(jnp.add, params, step))) - float(f(jax.tree.map(jnp.subtract, params, step)))) / (2 * h)
    np.testing.assert_allclose(fd, norm, rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# prior and the full bound
# ------------------------------------------------------------------------------------------------


def fake_model_np(x, t):
    return np.concatenate([0.5 * x + 0.01 * t[:, None, None, None], 0.5 * np.tanh(x)], -1)


def fake_model_jnp(x, t):
    return jnp.concatenate([0.5 * x + 0.01 * t[:, None, None, None].astype(jnp.float32), 0.5 * jnp.tanh(x)], -1)


def test_prior_and_calc_bpd_loop_match_numpy():
    T = 50
    d = create_diffusion("", diffusion_steps=T)
    tab = ref_tables(ref_linear_betas(T))
    x0, _ = data(7)
    x = x0.astype(np.float64)
    key = jax.random.key(7, impl="rbg")  # threefry normal compiles slowly on CPU
    res = jax.jit(lambda k: d.calc_bpd_loop(fake_model_jnp, jnp.asarray(x0), key=k))(key)

    keys = jax.random.split(key, T)
    B = SHAPE[0]
    vb, xmse, mse = [], [], []
    for n, step in enumerate(range(T - 1, -1, -1)):
        noise = np.asarray(jax.random.normal(keys[n], SHAPE, jnp.float32), np.float64)
        t = np.full(B, step)
        xt = col(np.sqrt(tab["ab"]), t) * x + col(np.sqrt(1 - tab["ab"]), t) * noise
        out = fake_model_np(xt, t)
        mean, logvar, px0 = ref_p_mean_var(tab, out, xt, t, clip=True)
        true_mean = col(tab["coef1"], t) * x + col(tab["coef2"], t) * xt
        if step == 0:
            vb.append(-ref_disc_ll(x, mean, 0.5 * logvar).mean(axis=(1, 2, 3)) / LN2)
        else:
            vb.append(ref_normal_kl(true_mean, col(tab["post_logvar"], t), mean, logvar).mean(axis=(1, 2, 3)) / LN2)
        xmse.append(((px0 - x) ** 2).mean(axis=(1, 2, 3)))
        eps = (xt - col(np.sqrt(tab["ab"]), t) * px0) / col(np.sqrt(1 - tab["ab"]), t)
        mse.append(((eps - noise) ** 2).mean(axis=(1, 2, 3)))
    vb, xmse, mse = (np.stack(a, 1) for a in (vb, xmse, mse))
    abT = tab["ab"][-1]
    prior = ref_normal_kl(np.sqrt(abT) * x, np.log(1 - abT), 0.0, 0.0).mean(axis=(1, 2, 3)) / LN2
    assert res["vb"].shape == (B, T)
    assert_close(res["prior_bpd"], prior, 1e-6)
    assert_close(d._prior_bpd(jnp.asarray(x0)), prior, 1e-6)
    assert_close(res["vb"], vb, 1e-5)
    assert_close(res["xstart_mse"], xmse, 1e-5)
    assert_close(res["mse"], mse, 1e-5)
    assert_close(res["total_bpd"], vb.sum(1) + prior, 1e-5)


# ------------------------------------------------------------------------------------------------
# schedules and create_diffusion flags
# ------------------------------------------------------------------------------------------------


def test_deprecated_beta_schedules():
    kw = dict(beta_start=1e-4, beta_end=0.02, num_diffusion_timesteps=100)
    np.testing.assert_allclose(get_beta_schedule("linear", **kw), np.linspace(1e-4, 0.02, 100))
    np.testing.assert_allclose(get_beta_schedule("quad", **kw), np.linspace(0.01, math.sqrt(0.02), 100) ** 2)
    np.testing.assert_allclose(get_beta_schedule("const", **kw), np.full(100, 0.02))
    np.testing.assert_allclose(get_beta_schedule("jsd", **kw), 1 / np.arange(100, 0, -1))
    w = get_beta_schedule("warmup10", **kw)
    np.testing.assert_allclose(w[:10], np.linspace(1e-4, 0.02, 10))
    np.testing.assert_allclose(w[10:], 0.02)
    assert (get_beta_schedule("warmup50", **kw)[:50] < 0.02).sum() == 49
    with pytest.raises(NotImplementedError):
        get_beta_schedule("nope", **kw)
    with pytest.raises(NotImplementedError):
        get_named_beta_schedule("nope", 10)
    np.testing.assert_allclose(get_named_beta_schedule("linear", 500), ref_linear_betas(500), rtol=1e-12)


def test_create_diffusion_flags():
    d = create_diffusion("")
    assert (d.model_mean_type, d.model_var_type, d.loss_type) == (
        ModelMeanType.EPSILON, ModelVarType.LEARNED_RANGE, LossType.MSE)
    assert create_diffusion(None).num_timesteps == 1000
    assert create_diffusion("", use_kl=True, rescale_learned_sigmas=True).loss_type == LossType.RESCALED_KL
    assert create_diffusion("", rescale_learned_sigmas=True).loss_type == LossType.RESCALED_MSE
    assert create_diffusion("", predict_xstart=True).model_mean_type == ModelMeanType.START_X
    assert create_diffusion("", learn_sigma=False).model_var_type == ModelVarType.FIXED_LARGE
    assert create_diffusion("", learn_sigma=False, sigma_small=True).model_var_type == ModelVarType.FIXED_SMALL
    assert LossType.KL.is_vb() and LossType.RESCALED_KL.is_vb() and not LossType.MSE.is_vb()
    with pytest.raises(ValueError):
        GaussianDiffusion(betas=np.array([0.1, 0.0]), model_mean_type=ModelMeanType.EPSILON,
                          model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE)
