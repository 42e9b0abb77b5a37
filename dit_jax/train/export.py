"""The EMA model of a training run: what `dit-jax sample --ckpt WORKDIR`, `sample-fid` and `sample-ddt` load.

    model, config, step = load_ema_model("runs/dit_s2")          # newest complete checkpoint
    model, config, step = load_ema_model("runs/dit_s2", step=20000)
    model, config, step = load_ema_model("runs/ddt_s2")          # a DDT run (config.model.arch == "ddt")

The run's config comes from the checkpoint itself (the "config" item the trainer saves beside the state), so
the model is rebuilt exactly as trained; the EMA parameters replace the trained ones (as the official
sample.py loads `checkpoint["ema"]`). The run is opened read-only, so reading a live run never disturbs its
trainer; a corrupt newest checkpoint (a missing or altered file: checked against its checksums) falls back to the
previous one with a warning and stays where it is (dit_jax.train.checkpoint.Checkpointer.restore). A run trained with REPA restores its whole state (the REPA target
encoder included) and returns the DDT, whose projector sampling never calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax.models import DDT, DiT
from dit_jax.train.checkpoint import Checkpointer, CheckpointError, Restored
from dit_jax.train.config_io import config_from_dict
from dit_jax.train.optim import ema_params, make_optimizer
from dit_jax.train.state import abstract_state


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """A training workdir (holding checkpoints/) or its checkpoints/ folder -> the checkpoints folder."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    return path


def is_training_run(path: str | os.PathLike) -> bool:
    """True if `path` is a dit-jax training workdir or checkpoints folder (numbered step folders inside)."""
    d = checkpoint_dir(path)
    return d.is_dir() and any(p.name.isdigit() and (p / "state").is_dir() for p in d.iterdir())


def _saved_config(ckpt_dir: Path, steps: list[int]) -> dict[str, Any]:
    for s in sorted(steps, reverse=True):
        f = ckpt_dir / str(s) / "config" / "metadata"
        try:
            return json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    raise CheckpointError(f"no readable config saved with the checkpoints in {ckpt_dir}")


def restore_run(path: str | os.PathLike, step: int | None = None) -> tuple[Any, Any, Restored]:
    """-> (graphdef, the run's config, Restored) of a training run's checkpoint (newest complete step by default),
    restored onto this process's first device whatever topology wrote it."""
    ckpt_dir = checkpoint_dir(path)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{path}: no such training run (expected a workdir with checkpoints/)")
    with Checkpointer(ckpt_dir, read_only=True) as ckpt:  # a reader: never cleans up, moves aside or saves
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"{ckpt_dir}: no complete checkpoint")
        config = config_from_dict(_saved_config(ckpt_dir, steps), fill_defaults=True)
        graphdef, abstract = abstract_state(config.model, make_optimizer(config.optim), config.seed, config.repa)
        replicated = NamedSharding(jax.sharding.Mesh(jax.local_devices()[:1], ("d",)), P())
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract)
        return graphdef, config, ckpt.restore(abstract, step)


def load_ema_model(
    path: str | os.PathLike, step: int | None = None, *, use_ema: bool = True, **overrides: Any
) -> tuple[DiT | DDT, Any, int]:
    """-> (the DiT or DDT holding the EMA weights (or the trained ones with use_ema=False), the run's config, step).

    overrides: DiT options that do not change the weights (dtype, attn_impl, remat_policy)."""
    fixed = sorted(set(overrides) - {"dtype", "attn_impl", "remat_policy"})
    if fixed:
        raise ValueError(f"{fixed} cannot be overridden when loading a training run")
    graphdef, config, restored = restore_run(path, step)
    state = restored.state
    params = ema_params(state["opt_state"]) if use_ema else state["params"]
    model = nnx.merge(graphdef, params, state["rest"])
    if overrides:
        model = _with_options(model, config, overrides)
    return model, config, restored.step


def _with_options(model: DiT | DDT, config: Any, overrides: dict[str, Any]) -> DiT | DDT:
    from dit_jax.train.state import DTYPES, ddt_kwargs, model_kwargs

    ddt = isinstance(model, DDT)
    if ddt and "remat_policy" in overrides:
        raise ValueError("remat_policy applies to DiT runs only")
    kw = ddt_kwargs(config.model, config.repa) if ddt else model_kwargs(config.model)
    for k, v in overrides.items():
        kw[k] = DTYPES.get(v, v) if k == "dtype" else v
    cls = DDT if ddt else DiT
    target = nnx.eval_shape(lambda: cls(**kw, rngs=nnx.Rngs(0)))
    nnx.update(target, nnx.state(model))
    return target
