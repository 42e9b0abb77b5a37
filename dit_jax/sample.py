"""Class-conditional sampling with classifier-free guidance, batch-sharded over every device.

Follows the official sample.py / sample_ddp.py: DDPM over a respaced process (250 steps by default) or DDIM,
`clip_denoised=False` in latent space, guidance `eps = uncond + s * (cond - uncond)` on the first
`cfg_channels` channels (3 in the release; None = every eps channel), the learned variance taken from the
conditional pass.

Two choices that leave the maths unchanged:
- Guidance pairs. The official batch is [x | x] with labels [y | null] and only the first half is kept. We
  run each example's conditional and unconditional passes side by side ([x0, x0, x1, x1, ...], labels
  [y0, null, y1, null, ...]), so a batch sharded over devices never moves data between them. Same model
  calls, same output.
- Per-example noise. Example i draws x_T and its step noise from its own key, `fold_in(base_key, i)`,
  with the protocol in dit_jax.diffusion.gaussian. A sample therefore depends only on (seed, index, label,
  settings): not on the batch size, the padding or the number of devices. `dit-jax sample-fid` resumes on
  any device count and produces the same images.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.diffusion import create_diffusion
from dit_jax.diffusion.gaussian import GaussianDiffusion
from dit_jax.models import DiT
from dit_jax.models.splash import uses_splash
from dit_jax.train.sharding import mesh_context

SAMPLERS = ("ddpm", "ddim")
# The official sample.py's eight classes (ImageNet: 207 golden retriever, 360 otter, 387 lesser panda,
# 974 geyser, 88 macaw, 979 valley, 417 balloon, 279 arctic fox).
OFFICIAL_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """How to sample. num_steps respaces the 1000-step process ("250" for DDPM, "ddim<num_steps>" for DDIM).
    cfg_scale 1.0 turns guidance off (one model call per example per step instead of two)."""

    num_steps: int = 250
    cfg_scale: float = 4.0
    cfg_channels: int | None = 3
    sampler: str = "ddpm"
    eta: float = 0.0
    clip_denoised: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; expected one of {SAMPLERS}")
        if int(self.num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):  # NaN would sample NaN images silently
            raise ValueError(f"cfg_scale must be a finite number >= 0, got {self.cfg_scale}")
        if self.eta != 0 and self.sampler != "ddim":
            raise ValueError("eta applies to the ddim sampler only")
        if not 0 <= self.eta <= 1:  # DDIM's eta: 0 deterministic .. 1 DDPM-like; above 1 the mean's sqrt can be NaN
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")

    @property
    def respacing(self) -> str:
        return f"ddim{self.num_steps}" if self.sampler == "ddim" else str(self.num_steps)

    def diffusion(self) -> GaussianDiffusion:
        return create_diffusion(self.respacing)


def guided_model_fn(model: DiT, cfg_scale: float, cfg_channels: int | None = 3) -> Callable[..., jax.Array]:
    """(x (n, H, W, C), t (n,), y (n,) class labels) -> guided output (n, H, W, out_channels).

    Equals the first half of `model.forward_with_cfg([x | x], [t | t], [y | null], ...)` (the official
    layout), computed with each example's two passes adjacent so that batch sharding stays local."""
    n_guided = model.in_channels if cfg_channels is None else int(cfg_channels)
    if not 0 < n_guided <= model.out_channels:
        raise ValueError(f"cfg_channels must be in [1, {model.out_channels}], got {cfg_channels}")
    null = model.num_classes

    def fn(x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        n = x.shape[0]
        y2 = jnp.stack([y.astype(jnp.int32), jnp.full_like(y, null, jnp.int32)], axis=1).reshape(2 * n)
        out = model(jnp.repeat(x, 2, axis=0), jnp.repeat(t, 2, axis=0), y2)
        out = out.reshape((n, 2) + out.shape[1:])
        cond, uncond = out[:, 0], out[:, 1]
        eps = uncond[..., :n_guided] + cfg_scale * (cond[..., :n_guided] - uncond[..., :n_guided])
        return jnp.concatenate([eps, cond[..., n_guided:]], axis=-1)

    return fn


def example_keys(key: jax.Array | int, indices: Any) -> jax.Array:
    """Per-example keys fold_in(key, index): (n,) typed keys for int indices (n,)."""
    if isinstance(key, (int, np.integer)):
        key = jax.random.key(int(key))
    idx = jnp.asarray(np.asarray(indices, np.uint32))
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def pad_to_multiple(multiple: int, *arrays: Any) -> tuple[Any, ...]:
    """Each array's leading axis padded up to a multiple of `multiple` (the device count) by repeating example 0;
    the caller drops the padding rows. numpy arrays stay numpy, jax arrays stay jax."""
    pad = (-arrays[0].shape[0]) % multiple
    if not pad:
        return arrays
    xp = lambda a: np if isinstance(a, np.ndarray) else jnp  # noqa: E731
    return tuple(xp(a).concatenate([a, xp(a).repeat(a[:1], pad, axis=0)]) for a in arrays)


def data_mesh(devices: Any = None) -> Mesh:
    """A 1-D mesh ('data',) over `devices` (default: this process's devices: the samplers take host inputs, and a
    multi-process job splits its samples between processes, as sample-fid does)."""
    devs = np.asarray(jax.local_devices() if devices is None else devices)
    return Mesh(devs.reshape(-1), ("data",))


class Sampler:
    """A compiled sampler for one model graph and one set of settings; batches are sharded over `mesh`.

        sampler = Sampler.for_model(model, SampleSettings(num_steps=250, cfg_scale=4.0))
        latents = sampler(labels, keys)          # labels (n,), keys example_keys(seed, range(n)) -> (n, H, W, C)

    A batch is padded up to a multiple of the device count (padding examples are dropped); each distinct
    padded size compiles once. progress=True steps in a Python loop with a tqdm bar (same numbers as the
    scan, one compiled step); otherwise the whole loop is one jax.lax.scan.
    """

    def __init__(self, graphdef: nnx.GraphDef, state: Any, settings: SampleSettings, *, mesh: Mesh | None = None):
        self.settings = settings
        self.graphdef = graphdef
        self.mesh = mesh if mesh is not None else data_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.state = jax.device_put(state, self.replicated)
        self.diffusion = settings.diffusion()
        model = nnx.merge(graphdef, state)
        self.shape_tail = (model.input_size, model.input_size, model.in_channels)
        self.num_classes = model.num_classes
        self._attn_impl = "splash" if uses_splash(model) else "xla"  # splash traces under the sampler's mesh
        if settings.cfg_scale != 1.0:  # validate cfg_channels now, not inside the trace
            guided_model_fn(model, settings.cfg_scale, settings.cfg_channels)
        self._scan = jax.jit(
            self._scan_impl,
            in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding),
            out_shardings=self.batch_sharding,
        )
        self._start = jax.jit(self._start_impl, in_shardings=(self.batch_sharding,))
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))

    @classmethod
    def for_model(cls, model: DiT, settings: SampleSettings | None = None, **kw: Any) -> Sampler:
        graphdef, state = nnx.split(model)
        return cls(graphdef, state, settings or SampleSettings(), **kw)

    def with_state(self, state: Any) -> Sampler:
        """The same compiled sampler over other weights of the same graph (e.g. fresh EMA params)."""
        self.state = jax.device_put(state, self.replicated)
        return self

    # -- traced pieces --------------------------------------------------------------------------------
    def _model_fn(self, state: Any) -> Callable[..., jax.Array]:
        model = nnx.merge(self.graphdef, state)
        s = self.settings
        if s.cfg_scale == 1.0:
            return lambda x, t, y: model(x, t, y)
        return guided_model_fn(model, s.cfg_scale, s.cfg_channels)

    def _one_step(self, model_fn: Callable, x: jax.Array, i: jax.Array, step_keys: jax.Array, labels: jax.Array):
        s = self.settings
        t = jnp.full((x.shape[0],), i, jnp.int32)
        noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:], jnp.float32))(step_keys)
        kw = dict(clip_denoised=s.clip_denoised, model_kwargs=dict(y=labels), noise=noise)
        if s.sampler == "ddim":
            return self.diffusion.ddim_sample(model_fn, x, t, eta=s.eta, **kw)["sample"]
        return self.diffusion.p_sample(model_fn, x, t, **kw)["sample"]

    def _start_impl(self, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.diffusion.loop_noise((keys.shape[0], *self.shape_tail), keys)

    def _scan_impl(self, state: Any, labels: jax.Array, keys: jax.Array) -> jax.Array:
        x, step_keys = self._start_impl(keys)
        model_fn = self._model_fn(state)
        indices = jnp.arange(self.diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)

        def body(x: jax.Array, inputs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            i, k = inputs
            return self._one_step(model_fn, x, i, k, labels), None

        x, _ = jax.lax.scan(body, x, (indices, step_keys))
        return x

    def _step_impl(self, state: Any, x: jax.Array, i: jax.Array, step_keys: jax.Array, labels: jax.Array):
        return self._one_step(self._model_fn(state), x, i, step_keys, labels)

    # -- calls ----------------------------------------------------------------------------------------
    def __call__(self, labels: Any, keys: jax.Array, *, progress: bool = False) -> jax.Array:
        """labels (n,) ints in [0, num_classes), keys (n,) -> samples (n, H, W, C) float32 (model space)."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must be in [0, {self.num_classes}); got min {labels.min()}, max {labels.max()}")
        n = labels.shape[0]
        if keys.shape[0] != n:
            raise ValueError(f"{keys.shape[0]} keys for {n} labels")
        labels, keys = pad_to_multiple(self.mesh.size, labels, keys)  # padding rows are dropped below
        labels = jax.device_put(labels.astype(np.int32), self.batch_sharding)
        keys = jax.device_put(keys, self.batch_sharding)
        with mesh_context(self.mesh, self._attn_impl):
            out = self._progressive(labels, keys) if progress else self._scan(self.state, labels, keys)
        return out[:n]

    def _progressive(self, labels: jax.Array, keys: jax.Array) -> jax.Array:
        from tqdm.auto import tqdm

        x, step_keys = self._start(keys)
        total = self.diffusion.num_timesteps
        for n in tqdm(range(total), desc=f"{self.settings.sampler} steps", unit="step", leave=False):
            x = self._step(self.state, x, jnp.int32(total - 1 - n), step_keys[n], labels)
        return x


_CACHE: dict[tuple, Sampler] = {}
_CACHE_SIZE = 4


def sampler_for(graphdef: nnx.GraphDef, state: Any, settings: SampleSettings) -> Sampler:
    """A Sampler for (graph, settings), compiled once and reused across calls with new weights (the trainer's
    periodic EMA grids)."""
    cache_key = (graphdef, settings, tuple(d.id for d in jax.local_devices()))
    sampler = _CACHE.pop(cache_key, None)
    if sampler is None:
        sampler = Sampler(graphdef, state, settings)
        while len(_CACHE) >= _CACHE_SIZE:  # drop the least recently used (it holds a copy of its weights)
            _CACHE.pop(next(iter(_CACHE)))
    _CACHE[cache_key] = sampler  # most recently used last
    return sampler.with_state(state)


def sample_latents(
    model: DiT,
    labels: Any,
    *,
    key: jax.Array,
    num_steps: int = 250,
    cfg_scale: float = 4.0,
    cfg_channels: int | None = 3,
    sampler: str = "ddpm",
    eta: float = 0.0,
    clip_denoised: bool = False,
    progress: bool = False,
) -> np.ndarray:
    """labels (n,) int -> samples (n, H, W, C) float32 in the model's input space (latents, or pixels).

    Example i uses the key fold_in(key, i). The compiled sampler is cached per (model graph, settings).
    """
    settings = SampleSettings(num_steps=num_steps, cfg_scale=cfg_scale, cfg_channels=cfg_channels,
                              sampler=sampler, eta=eta, clip_denoised=clip_denoised)
    graphdef, state = nnx.split(model)
    labels = np.asarray(labels)
    keys = example_keys(key, np.arange(labels.shape[0]))
    return np.asarray(sampler_for(graphdef, state, settings)(labels, keys, progress=progress))
