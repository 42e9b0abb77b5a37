"""The sampling contract: labels and per-example keys in, samples out, batch-sharded over every local device.

    sampler = Sampler(model, SampleSettings(sampler="ddpm", num_steps=250, cfg_scale=4.0))
    x = sampler(labels, example_keys(seed, range(n)))     # labels (n,), keys (n,) -> (n, H, W, C), model space

Any method of dit_jax.sampling.methods runs behind it. Example i draws everything random from keys[i] =
fold_in(key(seed), i), so a sample depends only on (seed, index, label, settings): not on the batch size, the
padding or the number of devices, and `dit-jax sample-fid` resumes on any device count with the same images.
A batch is padded up to a multiple of the device count by repeating example 0 (the padding is dropped); each
padded size compiles once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.models.families import family_of
from dit_jax.models.splash import mesh_context, uses_splash
from dit_jax.sampling.methods import METHODS, diffusion_model_fn, guided_eps_fn, sample_shape
from dit_jax.sampling.settings import SampleSettings


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


def check_model(model: nnx.Module, settings: SampleSettings) -> None:
    """ValueError when the settings' method does not apply to the model (its family's objectives, guidance
    channels, an encoder to share)."""
    fam = family_of(model)
    if settings.objective not in fam.objectives:
        raise ValueError(f"the {settings.sampler} sampler integrates a model trained with objective="
                         f"{settings.objective}, and a {fam.name} model trains with {' or '.join(fam.objectives)}")
    if settings.objective == "diffusion" and settings.cfg_scale != 1.0:
        guided_eps_fn(model, settings.cfg_scale, settings.cfg_channels)  # validates cfg_channels now, not in a trace
    if settings.schedule is not None and not getattr(model, "num_encoder_blocks", 0):
        raise ValueError("encoder sharing (a schedule or refresh rate) needs a DDT with a condition encoder; "
                         f"this {type(model).__name__} has none")


class Sampler:
    """A compiled sampler for one model graph and one SampleSettings; batches are sharded over `mesh`.

    time_scale: a flow model reads t * time_scale (a run's flow.time_scale; 1 for DDT). progress=True shows a
    tqdm bar over the steps of ddpm/ddim (a Python loop of one compiled step, the same numbers as the scan); the
    other methods run as one compiled loop."""

    def __init__(self, model: nnx.Module, settings: SampleSettings | None = None, *, time_scale: float = 1.0,
                 mesh: Mesh | None = None):
        settings = settings or SampleSettings()
        check_model(model, settings)
        self.settings, self.time_scale = settings, float(time_scale)
        self.graphdef, state = nnx.split(model)
        self.mesh = mesh if mesh is not None else data_mesh()
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.state = jax.device_put(state, self.replicated)
        self.num_classes = model.num_classes
        self.shape_tail = sample_shape(model, 0)[1:]
        self.encoder_calls = 0  # how often a DDT's condition encoder ran (0 for a model without one)
        encoder = getattr(model, "num_encoder_blocks", 0) and settings.objective == "flow"
        self._encoder_per_call = (settings.encoder_calls or settings.num_steps) if encoder else 0
        self._attn_impl = "splash" if uses_splash(model) else "xla"  # splash traces under the sampler's mesh
        method = METHODS[settings.sampler]

        def run(state: Any, labels: jax.Array, keys: jax.Array) -> jax.Array:
            return method(nnx.merge(self.graphdef, state), settings, labels, keys, self.time_scale)

        self._run = jax.jit(run, in_shardings=(self.replicated, self.batch_sharding, self.batch_sharding),
                            out_shardings=self.batch_sharding)
        self._start = self._step = None

    def with_state(self, state: Any) -> Sampler:
        """The same compiled sampler over other weights of the same graph (e.g. fresh EMA params)."""
        self.state = jax.device_put(state, self.replicated)
        return self

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
            if progress and self.settings.respaced:
                out = self._progressive(labels, keys)
            else:
                out = self._run(self.state, labels, keys)
        self.encoder_calls += self._encoder_per_call
        return out[:n]

    def _progressive(self, labels: jax.Array, keys: jax.Array) -> jax.Array:
        """ddpm / ddim step by step with a progress bar: GaussianDiffusion.loop_noise and loop_step, jitted with the
        weights as an argument."""
        from tqdm.auto import tqdm

        s = self.settings
        diffusion = s.diffusion()
        if self._step is None:
            kw = dict(clip_denoised=s.clip_denoised, **(dict(eta=s.eta) if s.sampler == "ddim" else {}))

            def step(state: Any, x: jax.Array, i: jax.Array, step_keys: jax.Array, labels: jax.Array) -> jax.Array:
                fn = diffusion_model_fn(nnx.merge(self.graphdef, state), s)
                return diffusion.loop_step(s.sampler, fn, x, i, step_keys, dict(y=labels), **kw)

            self._start = jax.jit(lambda k: diffusion.loop_noise((k.shape[0], *self.shape_tail), k),
                                  in_shardings=(self.batch_sharding,))
            self._step = jax.jit(step, donate_argnums=(1,))
        x, step_keys = self._start(keys)
        total = diffusion.num_timesteps
        for n in tqdm(range(total), desc=f"{s.sampler} steps", unit="step", leave=False):
            x = self._step(self.state, x, jnp.int32(total - 1 - n), step_keys[n], labels)
        return x


_CACHE: dict[tuple, Sampler] = {}
_CACHE_SIZE = 4


def sampler_for(graphdef: nnx.GraphDef, state: Any, settings: SampleSettings, time_scale: float = 1.0) -> Sampler:
    """A Sampler for (graph, settings, time_scale), compiled once and reused across calls with new weights (the
    trainer's periodic EMA grids). state: an nnx.State, or a tuple of parts merged in order."""
    cache_key = (graphdef, settings, float(time_scale), tuple(d.id for d in jax.local_devices()))
    parts = state if isinstance(state, tuple) else (state,)
    sampler = _CACHE.pop(cache_key, None)
    if sampler is None:
        sampler = Sampler(nnx.merge(graphdef, *parts), settings, time_scale=time_scale)
        while len(_CACHE) >= _CACHE_SIZE:  # drop the least recently used (it holds a copy of its weights)
            _CACHE.pop(next(iter(_CACHE)))
    _CACHE[cache_key] = sampler  # most recently used last
    return sampler.with_state(nnx.split(nnx.merge(graphdef, *parts))[1])


def sample_latents(model: nnx.Module, labels: Any, *, key: jax.Array | int, settings: SampleSettings | None = None,
                   time_scale: float = 1.0, progress: bool = False) -> np.ndarray:
    """labels (n,) int -> samples (n, H, W, C) float32 in the model's input space (latents, or pixels).
    Example i uses the key fold_in(key, i); the compiled sampler is cached per (model graph, settings)."""
    graphdef, state = nnx.split(model)
    labels = np.asarray(labels)
    keys = example_keys(key, np.arange(labels.shape[0]))
    sampler = sampler_for(graphdef, state, settings or SampleSettings(), time_scale)
    return np.asarray(sampler(labels, keys, progress=progress))
