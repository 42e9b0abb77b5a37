"""EMA samples during training: the sample grids (train.sample_every) and sample quality (train.eval_every), both
drawn with the run's train.sample_* settings (dit_jax.sampling.settings.run_sample_settings).

    draw(graphdef, params, rest, config, labels, key, chunk)  -> samples in the model's space
    sample_grid(graphdef, params, rest, config, key)   -> labels, uint8 images; one class per row
    write_grid(writer, graphdef, state, config, step)  an EMA grid into the run's samples/ and TensorBoard
    QualityEval(config)                            built when a run starts (fails fast on a missing reference);
        .keys                                      the metric names it logs
        .due(step), .logged(metrics_jsonl, step)   whether a step is evaluated, and was (a resume catches up)
        (graphdef, state, step) -> {name: value}   on every process (a collective gathers the EMA weights);
                                                   the scores on process 0, {} on the others

Quality is scored on eval_num_samples EMA samples whose labels cycle through the classes and whose noise is the
same at every evaluation (per-example keys of a fixed seed), so the curve follows the weights, not the draw:
- data.source=digits without train.eval_reference: the digits Frechet distance and classifier accuracy
  (dit_jax/evaluate/digits_classifier.py), logged as digits_fd and digits_accuracy;
- with train.eval_reference (an ADM reference batch .npz; its mu/sigma, else statistics of its arr_0 computed
  once at the start): the Inception FID of dit_jax/evaluate (ADM's network and formula), logged as fid. Latent
  models are decoded with data.vae first; one-channel images are repeated to RGB. With N well below the
  reference's 50,000 the value is biased upwards (dit_jax.evaluate.fid.fid_from_images): compare evaluations of
  one run, not with the paper's FID-50K.
Sampling and scoring run on process 0's devices in chunks of the rows one process trains per step
(train.global_batch / processes), so they fit wherever training fits.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from flax import nnx

from dit_jax.images import make_grid, to_uint8
from dit_jax.train.config_schema import ConfigError, data_space
from dit_jax.train.optim import ema_params

EVAL_SEED = 20231  # the evaluation's noise: fixed, so that successive evaluations differ only by the weights


def draw(graphdef: nnx.GraphDef, params: dict, rest: dict, config: Any, labels: np.ndarray,
          key: jax.Array, chunk: int | None = None) -> np.ndarray:
    """labels (n,) -> float32 samples (n, H, W, C) in the model's space, drawn in chunks of `chunk` rows with the
    per-example keys of `key` (so the chunking does not change a sample). The sampler is compiled once per
    (graph, settings, chunk shape): periodic grids and evaluations do not recompile."""
    from dit_jax.sampling import example_keys, sampler_for
    from dit_jax.sampling.settings import run_sample_settings

    sampler = sampler_for(graphdef, (params, rest), run_sample_settings(config), float(config.flow.time_scale))
    keys = example_keys(key, np.arange(len(labels)))
    chunk = chunk or len(labels)
    parts = [np.asarray(sampler(labels[i:i + chunk], keys[i:i + chunk])) for i in range(0, len(labels), chunk)]
    return np.concatenate(parts, axis=0)


def sample_grid(graphdef: nnx.GraphDef, params: dict, rest: dict, config: Any, key: jax.Array) -> tuple:
    """EMA samples -> (labels, uint8 images (N, H, W, C)), sample_per_class of each of the first
    sample_num_classes classes, one class per row (pixel space: x in [-1, 1] to uint8)."""
    n_cls = min(config.train.sample_num_classes, config.model.num_classes)
    labels = np.repeat(np.arange(n_cls), config.train.sample_per_class)
    x = draw(graphdef, params, rest, config, labels, key)
    return labels, to_uint8(np.clip(x, -1, 1))


def _host_ema(state: dict) -> tuple[dict, dict] | None:
    """The EMA params and the rest of the state where process 0 can sample them: as they are with one process;
    with several, gathered (a collective: every process takes part) and returned on process 0 only (None else)."""
    params, rest = ema_params(state["opt_state"]), state["rest"]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params, rest = multihost_utils.process_allgather((params, rest), tiled=True)
        if jax.process_index() != 0:
            return None
    return params, rest


def write_grid(writer: Any, graphdef: nnx.GraphDef, state: dict, config: Any, step: int) -> None:
    """An EMA sample grid (pixel-space models only), one class per row, written by process 0."""
    if data_space(config) == "latent":
        return  # the grids stay cheap: decoding latents is the quality evaluation's (QualityEval)
    ema = _host_ema(state)
    if ema is None:
        return
    _, images = sample_grid(graphdef, *ema, config, jax.random.key(step))
    writer.write_images(step, "ema_samples", make_grid(images, nrow=config.train.sample_per_class))


class QualityEval:
    """train.eval_every's scorer (see the module docstring). Built on every process when the run starts: for the
    FID, process 0 loads the Inception network, the reference statistics and (latent models) the VAE then, so a
    missing or unreadable file stops the run before its first step; the digits yardsticks are fitted on first use
    (dit_jax.evaluate.digits_classifier caches them per process)."""

    def __init__(self, config: Any):
        self.config = config
        self.every = int(config.train.eval_every)
        self.num_samples = int(config.train.eval_num_samples)
        self.labels = (np.arange(self.num_samples) % config.model.num_classes).astype(np.int32)
        self.chunk = max(config.train.global_batch // jax.process_count(), 1)
        self.inception = bool(config.train.eval_reference)
        self.keys = ("fid",) if self.inception else ("digits_fd", "digits_accuracy")
        self.is_main = jax.process_index() == 0
        self._evaluator = self._reference = self._decoder = None
        if self.every and self.inception:  # the digits yardsticks are fitted on first use: they cannot be missing
            from dit_jax import distributed

            ok, _ = distributed.on_process_0("dit_jax/train/quality-eval", self._load)  # process 0 re-raises
            if not ok:
                raise ConfigError("process 0 could not load what train.eval_every scores with (its error says why)")

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def logged(self, jsonl_path: Any, step: int) -> bool:
        """Whether the run's metrics.jsonl holds this evaluation's scores of `step`."""
        from dit_jax.train.metrics import read_jsonl

        return any(r.get("step") == step and self.keys[0] in r for r in read_jsonl(jsonl_path))

    def _load(self) -> None:
        config = self.config
        from dit_jax.convert.inception import resolve_weights
        from dit_jax.evaluate.evaluator import Evaluator
        from dit_jax.evaluate.fid import compute_statistics
        from dit_jax.evaluate.npz import NpzFormatError, read_reference_statistics

        t = config.train
        try:
            weights = resolve_weights(t.eval_inception or None, flag="train.eval_inception")
            self._evaluator = Evaluator.from_file(str(weights), batch_size=self.chunk, progress=False)
            stats = read_reference_statistics(t.eval_reference)
            if stats is None:  # ADM: statistics of the reference's own images
                stats = (compute_statistics(self._evaluator.read_activations(t.eval_reference).pool), None)
        except (FileNotFoundError, NpzFormatError, ValueError) as e:
            raise ConfigError(f"train.eval_every={self.every} cannot score the samples: {e}") from e
        self._reference = stats[0]
        if data_space(config) == "latent":
            from dit_jax import weights as weights_lib
            from dit_jax.sampling.decode import Decoder
            from dit_jax.sampling.sampler import data_mesh

            self._decoder = Decoder(weights_lib.pretrained_vae(config.data.vae), data_mesh(jax.local_devices()))

    def __call__(self, graphdef: nnx.GraphDef, state: dict, step: int) -> dict[str, float]:
        ema = _host_ema(state)
        if ema is None:
            return {}
        t0 = time.perf_counter()
        x = draw(graphdef, *ema, self.config, self.labels, jax.random.key(EVAL_SEED), self.chunk)
        if self._decoder is not None:
            images = np.concatenate([self._decoder(x[i:i + self.chunk]) for i in range(0, len(x), self.chunk)])
        else:
            images = to_uint8(np.clip(x, -1, 1))
        try:
            if not np.all(np.isfinite(x)):
                raise FloatingPointError("the EMA weights sample non-finite values")
            scores = self._score(images)
        except (ValueError, FloatingPointError, np.linalg.LinAlgError) as e:  # e.g. NaN samples: logged, not fatal
            print(f"quality evaluation at step {step} failed: {e}", flush=True)
            scores = {k: float("nan") for k in self.keys}
        scores["eval_seconds"] = time.perf_counter() - t0
        return scores

    def _score(self, images: np.ndarray) -> dict[str, float]:
        if self.inception:
            from dit_jax.evaluate.fid import fid_from_images

            rgb = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
            return dict(fid=fid_from_images(rgb, self._reference, self._evaluator))
        from dit_jax.evaluate.digits_classifier import digits_fd, sample_accuracy

        size = self.config.data.image_size
        return dict(digits_fd=digits_fd(images, size)["digits_fd"],
                    digits_accuracy=sample_accuracy(images, self.labels, size)["sample_accuracy"])
