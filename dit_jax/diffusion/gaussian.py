"""Gaussian diffusion (DDPM / IDDPM / DDIM) in JAX, NHWC, jittable.

A port of the official facebookresearch/DiT diffusion/gaussian_diffusion.py (itself from OpenAI's
improved-diffusion and guided-diffusion), behaviour for behaviour:

- Schedules and every derived table are float64 numpy, computed as officially; a lookup gathers the
  float64 table at t and casts to float32 (the official `_extract_into_tensor` ends in `.float()`),
  so under `jax.jit` the tables are constants and all array math is float32.
- Arrays are NHWC (any rank works: the channel axis is the LAST one). A model with a learned variance
  returns 2C channels, [eps | v] on the last axis; `v` in [-1, 1] interpolates the log-variance.
- A model is any callable `model(x, t, **model_kwargs) -> out` or `-> (out, extra)`; t is (B,) int32.
- Randomness is explicit (`key=` jax.random keys). Sampling loops draw their noise like this, from
  the `key` passed to `p_sample_loop` / `ddim_sample_loop` (and their progressive forms):

      init_key, loop_key = jax.random.split(key)
      x_T = noise if noise is not None else jax.random.normal(init_key, shape, jnp.float32)
      step_keys = jax.random.split(loop_key, num_timesteps)
      # step n = 0 .. num_timesteps-1 runs timestep index num_timesteps-1-n and uses
      step_noise[n] = jax.random.normal(step_keys[n], shape, jnp.float32)

  The per-step noise is thus the same whether or not `noise` is given. As officially, no noise is
  added at the last step (t == 0).

  `key` may instead be a batch of keys, one per example (shape (B,) for typed keys, (B, 2) for raw
  uint32 keys). Each example then draws its noise from its own key exactly as above with `shape[1:]`,
  i.e. as if it were sampled alone in a batch of one: its sample depends only on its key, label and
  x_T, never on the batch size or the number of devices (dit_jax.sample relies on this).

Two quirks of the DiT release are kept (they matter only for non-default settings):
- `ModelVarType.LEARNED` is treated exactly like `LEARNED_RANGE` (the model's v interpolates between
  the clipped posterior log-variance and log beta); improved-diffusion used v as the log-variance.
- `ModelMeanType.PREVIOUS_X` is decoded like EPSILON in `p_mean_variance` (DiT dropped the x_{t-1}
  inversion); its training target is still the posterior mean, as officially.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .utils import discretized_gaussian_log_likelihood, is_key_batch, mean_flat, normal_kl

Model = Callable[..., Any]


# ----------------------------------------------------------------------------------------------------
# Enums
# ----------------------------------------------------------------------------------------------------


class ModelMeanType(enum.Enum):
    """What the model's (first C channels of) output predicts."""

    PREVIOUS_X = enum.auto()  # x_{t-1}
    START_X = enum.auto()  # x_0
    EPSILON = enum.auto()  # the noise


class ModelVarType(enum.Enum):
    """Where the reverse-process variance comes from (LEARNED_RANGE: the model's v in [-1, 1]
    interpolates between FIXED_SMALL and FIXED_LARGE in log space)."""

    LEARNED = enum.auto()
    FIXED_SMALL = enum.auto()
    FIXED_LARGE = enum.auto()
    LEARNED_RANGE = enum.auto()


class LossType(enum.Enum):
    MSE = enum.auto()  # MSE on the mean target (+ the VB term when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, the VB term scaled by num_timesteps / 1000
    KL = enum.auto()  # the variational bound term alone
    RESCALED_KL = enum.auto()  # as KL, times num_timesteps (an estimate of the full bound)

    def is_vb(self) -> bool:
        return self in (LossType.KL, LossType.RESCALED_KL)


# ----------------------------------------------------------------------------------------------------
# Beta schedules (float64 numpy)
# ----------------------------------------------------------------------------------------------------


def _warmup_beta(beta_start: float, beta_end: float, num_diffusion_timesteps: int, warmup_frac: float) -> np.ndarray:
    betas = np.full(num_diffusion_timesteps, beta_end, dtype=np.float64)
    n = int(num_diffusion_timesteps * warmup_frac)
    betas[:n] = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    return betas


def get_beta_schedule(
    beta_schedule: str, *, beta_start: float, beta_end: float, num_diffusion_timesteps: int
) -> np.ndarray:
    """The deprecated schedule kinds: "quad", "linear", "warmup10", "warmup50", "const", "jsd".

    Returns (num_diffusion_timesteps,) float64.
    """
    n = num_diffusion_timesteps
    if beta_schedule == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
    elif beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    elif beta_schedule == "warmup10":
        betas = _warmup_beta(beta_start, beta_end, n, 0.1)
    elif beta_schedule == "warmup50":
        betas = _warmup_beta(beta_start, beta_end, n, 0.5)
    elif beta_schedule == "const":
        betas = np.full(n, beta_end, dtype=np.float64)
    elif beta_schedule == "jsd":  # 1/T, 1/(T-1), ..., 1
        betas = 1.0 / np.linspace(n, 1, n, dtype=np.float64)
    else:
        raise UnknownScheduleError(
            f"unknown beta schedule {beta_schedule!r}; known: quad, linear, warmup10, warmup50, const, jsd"
        )
    assert betas.shape == (n,)
    return betas


class UnknownScheduleError(ValueError, NotImplementedError):
    """An unknown schedule name (NotImplementedError as the official code raises, and a ValueError)."""


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
) -> np.ndarray:
    """Discretise a continuous alpha_bar(t), t in [0, 1], into (num_diffusion_timesteps,) betas,
    beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta) (computed in Python floats)."""
    n = num_diffusion_timesteps
    return np.array([min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """"linear" (Ho et al., scaled by 1000/T so any T works) or "squaredcos_cap_v2" (Nichol & Dhariwal)."""
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return get_beta_schedule(
            "linear", beta_start=scale * 0.0001, beta_end=scale * 0.02, num_diffusion_timesteps=num_diffusion_timesteps
        )
    if schedule_name == "squaredcos_cap_v2":
        return betas_for_alpha_bar(
            num_diffusion_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        )
    raise UnknownScheduleError(f"unknown beta schedule {schedule_name!r}; known: linear, squaredcos_cap_v2")


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def _extract(table: np.ndarray, t: jax.Array, shape: Sequence[int]) -> jax.Array:
    """table (T,) float64 numpy, t (B,) int -> (B, 1, ..., 1) broadcast to `shape`, float32."""
    vals = jnp.asarray(table, jnp.float32)[t]  # cast-then-gather == the official gather-then-.float()
    vals = vals.reshape(vals.shape + (1,) * (len(shape) - vals.ndim))
    return jnp.broadcast_to(vals, tuple(shape))


def _split_output(model_output: Any) -> tuple[jax.Array, Any]:
    if isinstance(model_output, tuple):
        return model_output[0], model_output[1]
    return model_output, None


def _tqdm(iterable: Sequence[int], enabled: bool) -> Iterable[int]:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm  # lazy: only for a progress bar

    return tqdm(iterable)


# ----------------------------------------------------------------------------------------------------
# GaussianDiffusion
# ----------------------------------------------------------------------------------------------------


class GaussianDiffusion:
    """Training and sampling utilities for a Gaussian diffusion process with the given betas.

    All methods are pure functions of their array arguments (tables are numpy constants), so they
    can be called under `jax.jit`, `jax.grad` and `jax.vmap`. Shapes: x (B, H, W, C) (any rank with
    channels last), t (B,) int32.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray | Sequence[float],
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
    ) -> None:
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type

        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1:
            raise ValueError("betas must be 1-D")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])

        # Same float64 tables, in the same order of operations, as the official __init__.
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)

        # q(x_t | x_0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0); the variance is 0 at t = 0, so its log repeats entry 1 there.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if len(self.posterior_variance) > 1
            else np.array([])
        )
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # -- model wrapping (SpacedDiffusion maps timesteps here) ---------------------------------------

    def _wrap_model(self, model: Model) -> Model:
        return model

    # -- forward process ---------------------------------------------------------------------------

    def q_mean_variance(self, x_start: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q(x_t | x_0): (mean, variance, log_variance), each shaped like x_start (B, ...)."""
        mean = _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = _extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = _extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(
        self, x_start: jax.Array, t: jax.Array, noise: jax.Array | None = None, key: jax.Array | None = None
    ) -> jax.Array:
        """Sample x_t ~ q(x_t | x_0) (B, ...). Pass `noise` (shaped like x_start) or a `key`."""
        if noise is None:
            if key is None:
                raise ValueError("q_sample needs noise= or key= (a jax.random key)")
            noise = jax.random.normal(key, x_start.shape, jnp.float32)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {noise.shape} != x_start shape {x_start.shape}")
        return (
            _extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: jax.Array, x_t: jax.Array, t: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q(x_{t-1} | x_t, x_0): (mean, variance, log_variance_clipped), each (B, ...)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {x_start.shape} != x_t shape {x_t.shape}")
        mean = (
            _extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = _extract(self.posterior_variance, t, x_t.shape)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # -- reverse process ---------------------------------------------------------------------------

    def p_mean_variance(
        self,
        model: Model,
        x: jax.Array,
        t: jax.Array,
        clip_denoised: bool = True,
        denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Apply the model to get p(x_{t-1} | x_t) and a prediction of x_0.

        x (B, ..., C), t (B,). Returns {"mean", "variance", "log_variance", "pred_xstart"} each shaped
        like x, and "extra" (the model's second output, or None). denoised_fn is applied to the x_0
        prediction before the optional clip to [-1, 1].
        """
        model = self._wrap_model(model)
        model_kwargs = {} if model_kwargs is None else model_kwargs
        B, C = x.shape[0], x.shape[-1]
        if t.shape != (B,):
            raise ValueError(f"t must have shape {(B,)}, got {t.shape}")
        model_output, extra = _split_output(model(x, t, **model_kwargs))

        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            expected = (*x.shape[:-1], 2 * C)
            if model_output.shape != expected:
                raise ValueError(f"learned-variance model output must be {expected}, got {model_output.shape}")
            model_output, v = model_output[..., :C], model_output[..., C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x.shape)
            max_log = _extract(np.log(self.betas), t, x.shape)
            frac = (v + 1) / 2  # v = -1 -> posterior variance, v = 1 -> beta_t
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = jnp.exp(model_log_variance)
        elif self.model_var_type == ModelVarType.FIXED_LARGE:
            # Official trick: entry 0 is the posterior variance at 1 (not beta_0), for a better decoder NLL.
            var = np.append(self.posterior_variance[1], self.betas[1:])
            model_variance = _extract(var, t, x.shape)
            model_log_variance = _extract(np.log(var), t, x.shape)
        else:  # FIXED_SMALL
            model_variance = _extract(self.posterior_variance, t, x.shape)
            model_log_variance = _extract(self.posterior_log_variance_clipped, t, x.shape)

        def process_xstart(x0: jax.Array) -> jax.Array:
            if denoised_fn is not None:
                x0 = denoised_fn(x0)
            return jnp.clip(x0, -1, 1) if clip_denoised else x0

        if self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = process_xstart(model_output)
        else:  # EPSILON, and PREVIOUS_X as in the DiT release (see the module docstring)
            pred_xstart = process_xstart(self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output))
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {
            "mean": model_mean,
            "variance": model_variance,
            "log_variance": model_log_variance,
            "pred_xstart": pred_xstart,
            "extra": extra,
        }

    def _predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        if x_t.shape != eps.shape:
            raise ValueError(f"x_t shape {x_t.shape} != eps shape {eps.shape}")
        return (
            _extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def _predict_eps_from_xstart(self, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array) -> jax.Array:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart) / _extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t.shape
        )

    def condition_mean(
        self,
        cond_fn: Model,
        p_mean_var: dict[str, Any],
        x: jax.Array,
        t: jax.Array,
        model_kwargs: dict[str, Any] | None = None,
    ) -> jax.Array:
        """Sohl-Dickstein et al. (2015) guidance: mean + variance * cond_fn(x, t) (the gradient of
        log p(y | x)). Returns the new mean, shaped like x."""
        cond_fn = self._wrap_model(cond_fn)
        gradient = cond_fn(x, t, **(model_kwargs or {}))
        return p_mean_var["mean"].astype(jnp.float32) + p_mean_var["variance"] * gradient.astype(jnp.float32)

    def condition_score(
        self,
        cond_fn: Model,
        p_mean_var: dict[str, Any],
        x: jax.Array,
        t: jax.Array,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Song et al. (2020) guidance: shift eps by -sqrt(1 - alpha_bar) * cond_fn(x, t) and return a
        copy of p_mean_var with "pred_xstart" and "mean" recomputed."""
        cond_fn = self._wrap_model(cond_fn)
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)
        eps = self._predict_eps_from_xstart(x, t, p_mean_var["pred_xstart"])
        eps = eps - jnp.sqrt(1 - alpha_bar) * cond_fn(x, t, **(model_kwargs or {}))
        out = dict(p_mean_var)
        out["pred_xstart"] = self._predict_xstart_from_eps(x, t, eps)
        out["mean"], _, _ = self.q_posterior_mean_variance(x_start=out["pred_xstart"], x_t=x, t=t)
        return out

    # -- one sampling step -------------------------------------------------------------------------

    def p_sample(
        self,
        model: Model,
        x: jax.Array,
        t: jax.Array,
        clip_denoised: bool = True,
        denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict[str, Any] | None = None,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Ancestral (DDPM) step x_t -> x_{t-1}. x (B, ...), t (B,).

        The step noise is `noise` (shaped like x) if given, else jax.random.normal(key, x.shape).
        Rows with t == 0 get no noise. Returns {"sample", "pred_xstart"}.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if noise is None:
            if key is None:
                raise ValueError("p_sample needs key= (a jax.random key) or noise=")
            noise = jax.random.normal(key, x.shape, jnp.float32)
        nonzero_mask = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        if cond_fn is not None:
            out["mean"] = self.condition_mean(cond_fn, out, x, t, model_kwargs=model_kwargs)
        sample = out["mean"] + nonzero_mask * jnp.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Model,
        x: jax.Array,
        t: jax.Array,
        clip_denoised: bool = True,
        denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
        *,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12). x (B, ...), t (B,).

        Noise as in p_sample; with eta == 0 (a Python number) neither key nor noise is needed.
        Returns {"sample", "pred_xstart"}.
        """
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        # Re-derive eps from x_0 so that every mean type works.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _extract(self.alphas_cumprod, t, x.shape)
        alpha_bar_prev = _extract(self.alphas_cumprod_prev, t, x.shape)
        sigma = eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * jnp.sqrt(1 - alpha_bar / alpha_bar_prev)
        if noise is None:
            if key is not None:
                noise = jax.random.normal(key, x.shape, jnp.float32)
            elif isinstance(eta, (int, float)) and eta == 0:
                noise = jnp.zeros(x.shape, jnp.float32)
            else:
                raise ValueError("ddim_sample with eta != 0 needs key= (a jax.random key) or noise=")
        mean_pred = out["pred_xstart"] * jnp.sqrt(alpha_bar_prev) + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero_mask = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = mean_pred + nonzero_mask * sigma * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_reverse_sample(
        self,
        model: Model,
        x: jax.Array,
        t: jax.Array,
        clip_denoised: bool = True,
        denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict[str, Any] | None = None,
        eta: float = 0.0,
    ) -> dict[str, jax.Array]:
        """Deterministic DDIM inversion step x_t -> x_{t+1}. Returns {"sample", "pred_xstart"}."""
        if eta != 0.0:
            raise ValueError("ddim_reverse_sample is deterministic: eta must be 0")
        out = self.p_mean_variance(
            model, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn, model_kwargs=model_kwargs
        )
        if cond_fn is not None:
            out = self.condition_score(cond_fn, out, x, t, model_kwargs=model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar_next = _extract(self.alphas_cumprod_next, t, x.shape)
        mean_pred = out["pred_xstart"] * jnp.sqrt(alpha_bar_next) + jnp.sqrt(1 - alpha_bar_next) * eps
        return {"sample": mean_pred, "pred_xstart": out["pred_xstart"]}

    # -- sampling loops ----------------------------------------------------------------------------

    def _loop_start(
        self, shape: Sequence[int], noise: jax.Array | None, key: jax.Array | None, needs_step_noise: bool, name: str
    ) -> tuple[jax.Array, jax.Array | None]:
        """(x_T, step_keys (num_timesteps, ...) or None), per the protocol in the module docstring."""
        if not isinstance(shape, (tuple, list)):
            raise TypeError(f"shape must be a tuple or list, got {type(shape).__name__}")
        if key is None:
            if noise is None or needs_step_noise:
                what = "the initial noise and the per-step noise" if noise is None else "the per-step noise"
                raise ValueError(f"{name} needs key= (a jax.random key) for {what}")
            return self._as_carry(noise), None
        if is_key_batch(key):
            if key.shape[0] != shape[0]:
                raise ValueError(f"{name}: {key.shape[0]} per-example keys for a batch of {shape[0]}")
            pairs = jax.vmap(jax.random.split)(key)  # (B, 2[, 2])
            init_keys, loop_keys = pairs[:, 0], pairs[:, 1]
            if noise is not None:
                x = self._as_carry(noise)
            else:
                x = jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(init_keys)
            step_keys = jax.vmap(lambda k: jax.random.split(k, self.num_timesteps))(loop_keys)
            return x, jnp.swapaxes(step_keys, 0, 1)  # (num_timesteps, B[, 2])
        init_key, loop_key = jax.random.split(key)
        x = self._as_carry(noise) if noise is not None else jax.random.normal(init_key, tuple(shape), jnp.float32)
        return x, jax.random.split(loop_key, self.num_timesteps)

    def loop_noise(self, shape: Sequence[int], key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x_T, step_keys) that p_sample_loop / ddim_sample_loop would draw from `key` (one key, or one per
        example) for `shape`; step n's noise comes from step_keys[n] (see the module docstring)."""
        return self._loop_start(shape, None, key, True, "loop_noise")

    @staticmethod
    def _as_carry(noise: jax.Array) -> jax.Array:
        # Steps compute in (at least) float32: start there so the scan carry keeps one dtype.
        noise = jnp.asarray(noise)
        return noise.astype(jnp.result_type(noise.dtype, jnp.float32))

    def _step_fn(self, kind: str, model: Model, shape: Sequence[int], **kwargs: Any) -> Callable[..., dict]:
        """(x, i, step_key or None, model_kwargs) -> the step's dict, for spaced timestep index i."""
        sampler = self.p_sample if kind == "ddpm" else self.ddim_sample

        def step(x: jax.Array, i: jax.Array, step_key: jax.Array | None, model_kwargs: dict) -> dict:
            t = jnp.full((shape[0],), i, jnp.int32)
            if step_key is None:  # only when no step needs noise (see _loop_start)
                noise = jnp.zeros(tuple(shape), jnp.float32)
            elif is_key_batch(step_key):  # one key per example
                noise = jax.vmap(lambda k: jax.random.normal(k, tuple(shape[1:]), jnp.float32))(step_key)
            else:
                noise = jax.random.normal(step_key, tuple(shape), jnp.float32)
            return sampler(model, x, t, model_kwargs=model_kwargs, noise=noise, **kwargs)

        return step

    def loop_step(
        self, kind: str, model: Model, x: jax.Array, i: jax.Array, step_key: jax.Array | None,
        model_kwargs: dict[str, Any] | None = None, **kwargs: Any,
    ) -> jax.Array:
        """One step of p_sample_loop (kind "ddpm") or ddim_sample_loop (kind "ddim", eta= in kwargs) at spaced
        index i, with the noise of step_keys[n] from loop_noise: a Python loop of these (jitted, with the weights
        as an argument) gives the loop's result step by step (a progress bar)."""
        if kind not in ("ddpm", "ddim"):
            raise ValueError(f"unknown loop kind {kind!r}; expected ddpm or ddim")
        step = self._step_fn(kind, model, x.shape, **kwargs)
        return step(x, i, step_key, {} if model_kwargs is None else model_kwargs)["sample"]

    def _scan_loop(self, step: Callable[..., dict], x: jax.Array, step_keys: jax.Array | None, model_kwargs: dict):
        indices = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)

        def body(x, inputs):
            i, step_key = inputs
            return step(x, i, step_key, model_kwargs)["sample"], None

        x, _ = jax.lax.scan(body, x, (indices, step_keys))
        return x

    def _progressive(
        self, step: Callable[..., dict], x: jax.Array, step_keys: jax.Array | None, model_kwargs: dict, progress: bool
    ) -> Iterator[dict[str, jax.Array]]:
        jstep = jax.jit(step)
        for n, i in enumerate(_tqdm(list(range(self.num_timesteps))[::-1], progress)):
            out = jstep(x, jnp.int32(i), None if step_keys is None else step_keys[n], model_kwargs)
            yield out
            x = out["sample"]

    def p_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: jax.Array | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: Any = None,
        progress: bool = False,
        *,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """Ancestral sampling over all num_timesteps steps -> x_0 of `shape` (B, H, W, C).

        noise: x_T (else drawn from key); key: required unless noise is given and num_timesteps == 1
        (see the module docstring for exactly how noise is drawn). Jittable: a jax.lax.scan over the
        steps. progress=True instead runs a Python loop over a jitted step with a tqdm bar (same
        result). `device` is accepted for API compatibility and ignored.
        """
        del device
        model_kwargs = {} if model_kwargs is None else model_kwargs
        x, step_keys = self._loop_start(shape, noise, key, self.num_timesteps > 1, "p_sample_loop")
        step = self._step_fn("ddpm", model, shape, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn)
        if progress:
            for out in self._progressive(step, x, step_keys, model_kwargs, True):
                x = out["sample"]
            return x
        return self._scan_loop(step, x, step_keys, model_kwargs)

    def p_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: jax.Array | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: Any = None,
        progress: bool = False,
        *,
        key: jax.Array | None = None,
    ) -> Iterator[dict[str, jax.Array]]:
        """Generator over the p_sample dicts {"sample", "pred_xstart"} of every step (same noise as
        p_sample_loop, so its last "sample" equals p_sample_loop's result)."""
        del device
        model_kwargs = {} if model_kwargs is None else model_kwargs
        x, step_keys = self._loop_start(shape, noise, key, self.num_timesteps > 1, "p_sample_loop_progressive")
        step = self._step_fn("ddpm", model, shape, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn)
        yield from self._progressive(step, x, step_keys, model_kwargs, progress)

    def ddim_sample_loop(
        self,
        model: Model,
        shape: Sequence[int],
        noise: jax.Array | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: Any = None,
        progress: bool = False,
        eta: float = 0.0,
        *,
        key: jax.Array | None = None,
    ) -> jax.Array:
        """DDIM sampling over all num_timesteps steps -> x_0 of `shape`. As p_sample_loop; key may be
        omitted when noise is given and eta == 0 (deterministic)."""
        del device
        model_kwargs = {} if model_kwargs is None else model_kwargs
        needs = not (isinstance(eta, (int, float)) and eta == 0) and self.num_timesteps > 1
        x, step_keys = self._loop_start(shape, noise, key, needs, "ddim_sample_loop")
        step = self._step_fn(
            "ddim", model, shape, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, eta=eta
        )
        if progress:
            for out in self._progressive(step, x, step_keys, model_kwargs, True):
                x = out["sample"]
            return x
        return self._scan_loop(step, x, step_keys, model_kwargs)

    def ddim_sample_loop_progressive(
        self,
        model: Model,
        shape: Sequence[int],
        noise: jax.Array | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[jax.Array], jax.Array] | None = None,
        cond_fn: Model | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device: Any = None,
        progress: bool = False,
        eta: float = 0.0,
        *,
        key: jax.Array | None = None,
    ) -> Iterator[dict[str, jax.Array]]:
        """Generator over the ddim_sample dicts of every step (same noise as ddim_sample_loop)."""
        del device
        model_kwargs = {} if model_kwargs is None else model_kwargs
        needs = not (isinstance(eta, (int, float)) and eta == 0) and self.num_timesteps > 1
        x, step_keys = self._loop_start(shape, noise, key, needs, "ddim_sample_loop_progressive")
        step = self._step_fn(
            "ddim", model, shape, clip_denoised=clip_denoised, denoised_fn=denoised_fn, cond_fn=cond_fn, eta=eta
        )
        yield from self._progressive(step, x, step_keys, model_kwargs, progress)

    # -- losses and the variational bound ----------------------------------------------------------

    def _vb_terms_bpd(
        self,
        model: Model,
        x_start: jax.Array,
        x_t: jax.Array,
        t: jax.Array,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, jax.Array]:
        """One term of the variational bound, in bits per dimension: the discretised-Gaussian decoder
        NLL (1/255 bins) where t == 0, else KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)).

        Returns {"output": (B,), "pred_xstart": (B, ...)}.
        """
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return {"output": jnp.where(t == 0, decoder_nll, kl), "pred_xstart": out["pred_xstart"]}

    def training_losses(
        self,
        model: Model,
        x_start: jax.Array,
        t: jax.Array,
        model_kwargs: dict[str, Any] | None = None,
        noise: jax.Array | None = None,
        key: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Per-example training losses at timesteps t. x_start (B, H, W, C), t (B,) int32.

        noise: the eps used to make x_t (else jax.random.normal(key, x_start.shape)).
        Returns {"loss": (B,)} plus, for the MSE losses, "mse" (B,) and, with a learned variance,
        "vb" (B,): the bound term computed with the eps half of the output under stop_gradient, so
        the bound trains only the variance (the official hybrid loss).
        """
        model = self._wrap_model(model)
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if noise is None:
            if key is None:
                raise ValueError("training_losses needs noise= or key= (a jax.random key)")
            noise = jax.random.normal(key, x_start.shape, jnp.float32)
        x_t = self.q_sample(x_start, t, noise=noise)
        terms: dict[str, jax.Array] = {}

        if self.loss_type.is_vb():
            terms["loss"] = self._vb_terms_bpd(
                model, x_start=x_start, x_t=x_t, t=t, clip_denoised=False, model_kwargs=model_kwargs
            )["output"]
            if self.loss_type == LossType.RESCALED_KL:
                terms["loss"] = terms["loss"] * self.num_timesteps
            return terms

        model_output, _ = _split_output(model(x_t, t, **model_kwargs))
        if self.model_var_type in (ModelVarType.LEARNED, ModelVarType.LEARNED_RANGE):
            C = x_t.shape[-1]
            expected = (*x_t.shape[:-1], 2 * C)
            if model_output.shape != expected:
                raise ValueError(f"learned-variance model output must be {expected}, got {model_output.shape}")
            model_output, v = model_output[..., :C], model_output[..., C:]
            # The bound trains the variance only: the mean (eps) half is frozen.
            frozen = jnp.concatenate([jax.lax.stop_gradient(model_output), v], axis=-1)
            terms["vb"] = self._vb_terms_bpd(
                lambda *_args, **_kwargs: frozen, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
            )["output"]
            if self.loss_type == LossType.RESCALED_MSE:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)  # the official 1/1000 convention

        if self.model_mean_type == ModelMeanType.PREVIOUS_X:
            target = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)[0]
        elif self.model_mean_type == ModelMeanType.START_X:
            target = x_start
        else:
            target = noise
        if model_output.shape != target.shape:
            raise ValueError(f"model output shape {model_output.shape} != target shape {target.shape}")
        terms["mse"] = mean_flat(jnp.square(target - model_output))
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _prior_bpd(self, x_start: jax.Array) -> jax.Array:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dim, (B,). Constant w.r.t. the model."""
        t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, jnp.int32)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / np.log(2.0)

    def calc_bpd_loop(
        self,
        model: Model,
        x_start: jax.Array,
        clip_denoised: bool = True,
        model_kwargs: dict[str, Any] | None = None,
        *,
        key: jax.Array,
    ) -> dict[str, jax.Array]:
        """The whole variational bound in bits per dim. x_start (B, ...).

        Timesteps run T-1 .. 0 (a jax.lax.scan); step n (t = T-1-n) uses the noise
        jax.random.normal(jax.random.split(key, T)[n], x_start.shape). Column n of the (B, T) outputs
        is t = T-1-n, as officially. Returns {"total_bpd" (B,), "prior_bpd" (B,), "vb" (B, T),
        "xstart_mse" (B, T), "mse" (B, T)}.
        """
        B = x_start.shape[0]
        keys = jax.random.split(key, self.num_timesteps)
        ts = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)

        def body(carry, inputs):
            i, k = inputs
            t = jnp.full((B,), i, jnp.int32)
            noise = jax.random.normal(k, x_start.shape, jnp.float32)
            x_t = self.q_sample(x_start, t, noise=noise)
            out = self._vb_terms_bpd(
                model, x_start=x_start, x_t=x_t, t=t, clip_denoised=clip_denoised, model_kwargs=model_kwargs
            )
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            return carry, (
                jax.lax.stop_gradient(out["output"]),
                mean_flat(jnp.square(out["pred_xstart"] - x_start)),
                mean_flat(jnp.square(eps - noise)),
            )

        _, (vb, xstart_mse, mse) = jax.lax.scan(body, None, (ts, keys))
        vb, xstart_mse, mse = vb.T, xstart_mse.T, mse.T
        prior_bpd = self._prior_bpd(x_start)
        return {
            "total_bpd": vb.sum(axis=1) + prior_bpd,
            "prior_bpd": prior_bpd,
            "vb": vb,
            "xstart_mse": xstart_mse,
            "mse": mse,
        }
