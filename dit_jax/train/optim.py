"""The optimizer: AdamW (the paper's settings by default) followed by an EMA of the parameters.

    make_optimizer(config.optim) = chain([clip_by_global_norm], adamw(schedule, b1, b2, eps, weight_decay), ema(d))

The EMA is a transform at the END of the chain. Its state is an fp32 copy of the params, initialised FROM the
params (an exact copy at step 0), and updated every step from the new params, as the official train.py does
(`update_ema(ema, model)` right after `opt.step()`, with `requires_grad_(False)` copies initialised by
`update_ema(ema, model, decay=0)`):

    ema <- decay * ema + (1 - decay) * (params + updates)

with no debiasing and no warm-up. It leaves the updates unchanged. `optax.ema` is the wrong tool: it averages
the *updates* and debiases by default. Sampling and evaluation read the EMA with `ema_params(opt_state)`.

Traps (the DiT paper, Sec. 4 "Training"): `optax.adamw` defaults to weight_decay=1e-4 while the paper uses 0, so the decay is
always passed explicitly; the paper's learning rate is constant (no warm-up, no clipping), both optional here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# ==========================================================================================================
# EMA of the parameters
# ==========================================================================================================
class EmaState(NamedTuple):
    """State of `ema`: the fp32 exponential moving average of the params (same tree as the params)."""

    ema: PyTree


def _to_f32_copy(p: jax.Array) -> jax.Array:
    """A new fp32 buffer (never an alias of the param: the train step donates params and opt_state together)."""
    p = jnp.asarray(p)
    if jnp.issubdtype(p.dtype, jnp.floating):
        return jnp.array(p, dtype=jnp.float32, copy=True)
    return jnp.array(p, copy=True)


def ema(decay: float) -> optax.GradientTransformation:
    """EMA of the parameters as the last link of an optax chain: ema <- d * ema + (1 - d) * new_params.

    init(params): an exact fp32 copy of params. update(updates, state, params): params is required; new_params =
    optax.apply_updates(params, updates) (exactly what the train step computes next, including the rounding to
    the param dtype); the average is kept in fp32 whatever the param dtype; `updates` is returned unchanged.
    Pure tree maps: works under jit and keeps the params' sharding.
    """
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"ema decay must be in [0, 1], got {decay}")
    decay = float(decay)

    def init_fn(params: PyTree) -> EmaState:
        return EmaState(ema=jax.tree.map(_to_f32_copy, params))

    def update_fn(updates: PyTree, state: EmaState, params: PyTree | None = None) -> tuple[PyTree, EmaState]:
        if params is None:
            raise ValueError(
                "dit_jax.train.optim.ema needs the params: call optimizer.update(grads, opt_state, params)"
            )
        new_params = optax.apply_updates(params, updates)
        d = jnp.float32(decay)
        one_minus_d = jnp.float32(1.0 - decay)  # computed in float64 on the host, then rounded once

        def step(e: jax.Array, p: jax.Array) -> jax.Array:
            if not jnp.issubdtype(e.dtype, jnp.floating):
                return jnp.asarray(p, e.dtype)  # non-float leaves (none in a DiT) just track the params
            return d * e + one_minus_d * jnp.asarray(p, jnp.float32)

        new_ema = jax.tree.map(step, state.ema, new_params)
        return updates, EmaState(ema=new_ema)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_params(opt_state: PyTree) -> PyTree:
    """The EMA params held in an optimizer state (a chain's tuple tree, possibly nested). Exactly one `EmaState`
    must be present."""
    found = [
        s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, EmaState)) if isinstance(s, EmaState)
    ]
    if not found:
        raise ValueError(
            "no EMA state in this optimizer state: build the optimizer with dit_jax.train.optim.make_optimizer "
            f"(or end the chain with optim.ema(decay)); got a state of type {type(opt_state).__name__}"
        )
    if len(found) > 1:
        raise ValueError(f"the optimizer state holds {len(found)} EMA states; expected exactly one")
    return found[0].ema


# ==========================================================================================================
# AdamW + EMA
# ==========================================================================================================
def make_schedule(optim_cfg: Any) -> optax.Schedule:
    """Constant lr (the paper), with an optional linear warm-up from 0 over `warmup_steps` updates.

    The schedule is evaluated at adam's count, i.e. the number of updates already applied: update k (0-based)
    uses lr * min(k / warmup_steps, 1)."""
    lr = float(optim_cfg.lr)
    warmup = int(optim_cfg.warmup_steps)
    if lr < 0:
        raise ValueError(f"optim.lr={lr} must be >= 0")
    if warmup < 0:
        raise ValueError(f"optim.warmup_steps={warmup} must be >= 0")
    if warmup == 0:
        return optax.constant_schedule(lr)

    def schedule(count: jax.Array) -> jax.Array:
        frac = jnp.minimum(jnp.asarray(count, jnp.float32) / warmup, 1.0)
        return jnp.float32(lr) * frac

    return schedule


def current_lr(optim_cfg: Any, step: int | jax.Array) -> float:
    """The learning rate used by the update taken at `step` (0-based count of updates already applied)."""
    return float(make_schedule(optim_cfg)(step))


def make_optimizer(optim_cfg: Any) -> optax.GradientTransformation:
    """chain([clip_by_global_norm(grad_clip_norm) if > 0], adamw(schedule, b1, b2, eps, weight_decay), ema(d)).

    optim_cfg: config.optim (its defaults, the paper's values, are dit_jax.train.config_schema.base_config's).
    weight_decay is always passed to optax.adamw (its own default, 1e-4, is not the paper's 0)."""
    clip = float(optim_cfg.grad_clip_norm)
    wd = float(optim_cfg.weight_decay)
    if clip < 0:
        raise ValueError(f"optim.grad_clip_norm={clip} must be >= 0 (0 = off)")
    if wd < 0:
        raise ValueError(f"optim.weight_decay={wd} must be >= 0")
    links = []
    if clip > 0:
        links.append(optax.clip_by_global_norm(clip))
    links.append(
        optax.adamw(
            learning_rate=make_schedule(optim_cfg),
            b1=float(optim_cfg.b1),
            b2=float(optim_cfg.b2),
            eps=float(optim_cfg.eps),
            weight_decay=wd,
        )
    )
    links.append(ema(float(optim_cfg.ema_decay)))
    return optax.chain(*links)
