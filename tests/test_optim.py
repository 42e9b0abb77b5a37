"""dit_jax.train.optim: the EMA transform (closed form, exact start, no debiasing, fp32), AdamW settings, warm-up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.train.config_schema import base_config
from dit_jax.train.optim import EmaState, current_lr, ema, ema_params, make_optimizer, make_schedule


def _params(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.normal(size=(8, 3)), dtype),
        "blk": {"b": jnp.asarray(rng.normal(size=(5,)), dtype)},
    }


def _grads(i: int, like):
    rng = np.random.default_rng(100 + i)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), like)


def _cfg(**kw):
    """config.optim from the schema, with lr 1e-3, EMA decay 0.9 and `kw`."""
    cfg = base_config().optim
    cfg.update(dict(dict(lr=1e-3, ema_decay=0.9), **kw))
    return cfg


def _schema(**kw):
    """config.optim with the schema's defaults (the paper's settings), and `kw`."""
    cfg = base_config().optim
    cfg.update(kw)
    return cfg


def _sgd_ema_run(decay, params, n, dtype_np=np.float64):
    """chain(sgd(lr), ema(decay)) for n steps; returns (the EMA after each step, the params after each step)."""
    lr = 0.1
    opt = optax.chain(optax.sgd(lr), ema(decay))
    state = opt.init(params)
    emas, ps = [], [jax.tree.map(np.asarray, params)]
    for i in range(n):
        g = _grads(i, params)
        updates, state = opt.update(g, state, params)
        params = optax.apply_updates(params, updates)
        emas.append(jax.tree.map(np.asarray, ema_params(state)))
        ps.append(jax.tree.map(np.asarray, params))
    return emas, ps


# ==========================================================================================================
# EMA
# ==========================================================================================================
def test_ema_starts_as_exact_copy_of_params_not_zeros():
    params = _params()
    state = ema(0.9999).init(params)
    assert isinstance(state, EmaState)
    for e, p in zip(jax.tree.leaves(state.ema), jax.tree.leaves(params)):
        assert e.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(e), np.asarray(p))
        assert np.any(np.asarray(e) != 0)
        assert e is not p  # its own buffer (the train step donates params and opt_state together)


def test_ema_matches_closed_form_over_steps():
    """ema_n = d^n p_0 + (1 - d) sum_{k=1..n} d^(n-k) p_k, p_k the params after update k, in float64."""
    d, n = 0.9, 6
    emas, ps = _sgd_ema_run(d, _params(), n)
    for step in range(1, n + 1):
        for key in ("w",):
            ref = d**step * ps[0][key].astype(np.float64)
            for k in range(1, step + 1):
                ref = ref + (1 - d) * d ** (step - k) * ps[k][key].astype(np.float64)
            np.testing.assert_allclose(emas[step - 1][key], ref, rtol=0, atol=2e-6)
        ref_b = d**step * ps[0]["blk"]["b"].astype(np.float64) + sum(
            (1 - d) * d ** (step - k) * ps[k]["blk"]["b"].astype(np.float64) for k in range(1, step + 1)
        )
        np.testing.assert_allclose(emas[step - 1]["blk"]["b"], ref_b, rtol=0, atol=2e-6)


def test_ema_leaves_updates_unchanged_and_requires_params():
    params = _params()
    t = ema(0.99)
    state = t.init(params)
    g = _grads(0, params)
    out, _ = t.update(g, state, params)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(g)):
        assert a is b
    with pytest.raises(ValueError, match="needs the params"):
        t.update(g, state)
    with pytest.raises(ValueError, match="decay"):
        ema(1.5)


def test_ema_is_not_optax_ema_no_debiasing():
    """optax.ema averages the updates and debiases; ours averages the params from an exact copy."""
    d = 0.9
    params = _params()
    emas, ps = _sgd_ema_run(d, params, 1)
    # one step: ours = d * p0 + (1 - d) * p1 (no division by 1 - d^1)
    ref = d * ps[0]["w"].astype(np.float64) + (1 - d) * ps[1]["w"].astype(np.float64)
    np.testing.assert_allclose(emas[0]["w"], ref, atol=1e-6)
    # optax.ema(debias=True) of the params over one step returns the params themselves (debiased), and of the
    # updates returns the update: both far from ours.
    o = optax.ema(d, debias=True)
    o_state = o.init(params)
    debiased, _ = o.update(jax.tree.map(jnp.asarray, ps[1]), o_state)
    assert np.max(np.abs(np.asarray(debiased["w"]) - emas[0]["w"])) > 1e-3
    np.testing.assert_allclose(np.asarray(debiased["w"]), ps[1]["w"], atol=1e-6)
    # and optax.ema starts from zeros, not from the params
    assert np.all(np.asarray(o_state.ema["w"]) == 0)


def test_ema_bf16_params_keep_fp32_ema():
    d = 0.9
    params = _params(jnp.bfloat16)
    opt = optax.chain(optax.sgd(0.1), ema(d))
    state = opt.init(params)
    assert all(e.dtype == jnp.float32 for e in jax.tree.leaves(ema_params(state)))
    p0 = np.asarray(params["w"], np.float64)
    ref = p0.copy()
    for i in range(4):
        updates, state = opt.update(_grads(i, params), state, params)
        params = optax.apply_updates(params, updates)
        assert params["w"].dtype == jnp.bfloat16
        ref = d * ref + (1 - d) * np.asarray(params["w"], np.float64)  # the bf16 params, averaged in fp32
    e = ema_params(state)["w"]
    assert e.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(e), ref, atol=1e-6)
    # the fp32 average is finer than bf16 can represent
    assert not np.array_equal(np.asarray(e), np.asarray(e.astype(jnp.bfloat16), np.float32))


def test_ema_decay_one_freezes_and_zero_tracks():
    params = _params()
    for d, expect in ((1.0, "initial"), (0.0, "current")):
        emas, ps = _sgd_ema_run(d, params, 3)
        want = ps[0] if expect == "initial" else ps[-1]
        np.testing.assert_array_equal(emas[-1]["w"], want["w"])


def test_ema_params_finds_state_and_errors_without():
    params = _params()
    opt = make_optimizer(_cfg(grad_clip_norm=1.0))
    state = opt.init(params)
    e = ema_params(state)
    assert jax.tree.structure(e) == jax.tree.structure(params)
    nested = {"outer": (optax.EmptyState(), [state])}
    assert jax.tree.structure(ema_params(nested)) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="no EMA state"):
        ema_params(optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="exactly one"):
        ema_params((state, state))


# ==========================================================================================================
# AdamW settings
# ==========================================================================================================
def _run(opt, params, n=5):
    state = opt.init(params)
    all_updates = []
    for i in range(n):
        u, state = opt.update(_grads(i, params), state, params)
        params = optax.apply_updates(params, u)
        all_updates.append(u)
    return all_updates, params, state


def test_make_optimizer_zero_weight_decay_equals_adam():
    params = _params()
    ours, p_ours, _ = _run(make_optimizer(_cfg(lr=1e-3)), params)
    ref, p_ref, _ = _run(optax.adam(1e-3, b1=0.9, b2=0.999, eps=1e-8), params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)
    # with a non-zero decay the updates differ (decoupled decay: -lr * wd * p on top of adam)
    wd, _, _ = _run(make_optimizer(_cfg(lr=1e-3, weight_decay=0.1)), params)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(wd), jax.tree.leaves(ref))) > 1e-5


def test_weight_decay_is_the_configured_one_not_optax_default():
    """optax.adamw defaults to weight_decay=1e-4; the paper (and our default) is 0. With zero gradients adam's
    update is exactly 0, so the whole update is the decoupled decay -lr * wd * p."""
    params = _params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    lr = 1e-2
    cases = (
        (_schema(lr=lr), 0.0),  # weight_decay left at the schema's default: the paper's 0, not optax's 1e-4
        (_cfg(lr=lr, weight_decay=0.0), 0.0),
        (_cfg(lr=lr, weight_decay=0.05), 0.05),
    )
    for cfg, wd in cases:
        opt = make_optimizer(cfg)
        u, _ = opt.update(zeros, opt.init(params), params)
        np.testing.assert_allclose(np.asarray(u["w"]), -lr * wd * np.asarray(params["w"]), rtol=1e-6, atol=0)
    # the trap itself: optax.adamw without weight_decay decays
    u, _ = optax.adamw(lr).update(zeros, optax.adamw(lr).init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), -lr * 1e-4 * np.asarray(params["w"]), rtol=1e-6)


def test_grad_clip_optional():
    params = _params()
    big = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), params)
    chain_plain = make_optimizer(_cfg())
    chain_clip = make_optimizer(_cfg(grad_clip_norm=1.0))
    assert len(chain_plain.init(params)) == 2  # adamw, ema
    assert len(chain_clip.init(params)) == 3  # clip, adamw, ema
    # adam is scale-invariant at step 0, but eps makes it not quite: compare mu instead
    _, s_clip = chain_clip.update(big, chain_clip.init(params), params)
    mu = s_clip[1][0].mu["w"]
    g_norm = float(optax.global_norm(big))
    np.testing.assert_allclose(np.asarray(mu), 0.1 * 1e3 / g_norm, rtol=1e-5)


def test_warmup_schedule_values():
    cfg = _cfg(lr=1e-3, warmup_steps=4)
    assert [current_lr(cfg, s) for s in range(7)] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert current_lr(_cfg(lr=3e-4), 0) == pytest.approx(3e-4)
    assert current_lr(_cfg(lr=3e-4), 10**6) == pytest.approx(3e-4)
    assert current_lr(_schema(), 0) == pytest.approx(1e-4)  # the schema's default: the paper's constant lr
    # the schedule is the one adam uses: with zero weight decay and warm-up, update 0 is zero
    opt = make_optimizer(cfg)
    params = _params()
    u, _ = opt.update(_grads(0, params), opt.init(params), params)
    assert float(jnp.max(jnp.abs(u["w"]))) == 0.0
    assert float(make_schedule(cfg)(jnp.int32(2))) == pytest.approx(5e-4)


def test_jit_compatible():
    params = _params()
    opt = make_optimizer(_cfg(grad_clip_norm=1.0, warmup_steps=3))

    @jax.jit
    def step(params, state, g):
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    state = jax.jit(opt.init)(params)
    p_eager, s_eager = params, opt.init(params)
    for i in range(4):
        g = _grads(i, params)
        params, state = step(params, state, g)
        u, s_eager = opt.update(g, s_eager, p_eager)
        p_eager = optax.apply_updates(p_eager, u)
    for a, b in zip(jax.tree.leaves((params, ema_params(state))), jax.tree.leaves((p_eager, ema_params(s_eager)))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_sharded_params_keep_sharding():
    devices = jax.devices()
    assert len(devices) == 8
    mesh = Mesh(np.asarray(devices), ("data",))
    row = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    params = {"w": jax.device_put(jnp.arange(32.0).reshape(8, 4), row), "b": jax.device_put(jnp.ones(3), rep)}
    opt = make_optimizer(_cfg())
    state = opt.init(params)
    assert ema_params(state)["w"].sharding.is_equivalent_to(row, 2)

    @jax.jit
    def step(params, state):
        g = jax.tree.map(lambda p: 0.5 * p, params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state

    for _ in range(3):
        params, state = step(params, state)
    e = ema_params(state)
    assert e["w"].sharding.is_equivalent_to(row, 2)
    assert e["b"].sharding.is_equivalent_to(rep, 1)
    assert params["w"].sharding.is_equivalent_to(row, 2)
    # same numbers as unsharded
    p_host = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), {"w": jnp.arange(32.0).reshape(8, 4), "b": jnp.ones(3)})
    s_host = opt.init(p_host)
    for _ in range(3):
        p_host, s_host = step(p_host, s_host)
    np.testing.assert_allclose(np.asarray(e["w"]), np.asarray(ema_params(s_host)["w"]), rtol=1e-6)
