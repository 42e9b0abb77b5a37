"""Gaussian KL and log-likelihood helpers for the variational bound (jnp, elementwise, any shape).

Behaviour follows the official facebookresearch/DiT diffusion/diffusion_utils.py (itself from
OpenAI's improved-diffusion / guided-diffusion), quirks included, so losses agree with the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ArrayLike = jax.Array | float


def is_key_batch(key: jax.Array) -> bool:
    """True for a batch of keys, one per example: typed keys of shape (B,), raw uint32 keys of shape (B, 2)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def mean_flat(x: jax.Array) -> jax.Array:
    """(B, ...) -> (B,): mean over every axis but the first (the batch)."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1: ArrayLike, logvar1: ArrayLike, mean2: ArrayLike, logvar2: ArrayLike) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) in nats, elementwise with broadcasting.

    Any argument may be a Python scalar (e.g. the standard-normal prior: mean2=0.0, logvar2=0.0).
    """
    mean1, logvar1, mean2, logvar2 = (jnp.asarray(a) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """Standard normal CDF through the tanh approximation used by the official code (not erf)."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def continuous_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Elementwise log N((x - means) / exp(log_scales); 0, 1) in nats.

    As in the official code, this is the standard-normal log-density of the standardised value; the
    -log_scales Jacobian term is not added.
    """
    z = (x - means) * jnp.exp(-log_scales)
    return -0.5 * jnp.square(z) - 0.5 * math.log(2.0 * math.pi)


def discretized_gaussian_log_likelihood(x: jax.Array, *, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Log-probability (nats) of the 1/255-wide bin around x under N(means, exp(log_scales)^2).

    x is assumed to be uint8 data rescaled to [-1, 1]; the two edge bins (x < -0.999, x > 0.999)
    extend to -inf and +inf. Probabilities are floored at 1e-12 before the log, as officially.
    All three arrays have the same shape.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"shape mismatch: x {x.shape}, means {means.shape}, log_scales {log_scales.shape}")
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
