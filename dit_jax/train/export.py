"""The EMA model of a training run: what `dit-jax sample --ckpt WORKDIR`, `sample-fid` and `sample-ddt` load.

    model, config, step = load_ema_model("runs/dit_s2")          # newest complete checkpoint
    model, config, step = load_ema_model("runs/dit_s2", step=20000)
    model, config, step = load_ema_model("runs/ddt_s2")          # a DDT run (config.model.arch == "ddt")

The run's config comes from the checkpoint itself (the "config" item the trainer saves beside the state), so
the model is rebuilt exactly as trained; the EMA parameters replace the trained ones (as the official
sample.py loads `checkpoint["ema"]`). The run is opened read-only, so reading a live run never disturbs its
trainer; a corrupt newest checkpoint (a missing or altered file: checked against its checksums) falls back to the
previous one with a warning and stays where it is (dit_jax.train.checkpoint.Checkpointer.restore). Only the
weights are read (`weights_only`: the EMA params and the model's non-param state), not Adam's moments, the other
params copy or a REPA run's frozen target encoder; a REPA run returns the DDT, whose projector sampling never calls.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dit_jax.models import DDT, DiT
from dit_jax.models.families import DTYPES, FAMILIES, family_of
from dit_jax.train.checkpoint import SKIP, Checkpointer, CheckpointError, Restored
from dit_jax.train.config_load import config_from_dict
from dit_jax.train.optim import EmaState, ema_params, make_optimizer
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


def weights_only(abstract: dict, *, use_ema: bool = True) -> dict:
    """The abstract train state with every leaf but the model's weights marked SKIP: the EMA params inside the
    optimizer state (use_ema) or the trained params, and the model's non-param state ("rest"). Adam's moments, the
    other copy of the params, REPA's frozen target encoder, the step and the rng are not read."""
    def skip(tree: Any) -> Any:
        return jax.tree.map(lambda _: SKIP, tree)

    out = {k: skip(v) for k, v in abstract.items()}
    out["rest"] = abstract["rest"]
    if use_ema:
        out["opt_state"] = jax.tree.map(lambda x: x if isinstance(x, EmaState) else skip(x), abstract["opt_state"],
                                        is_leaf=lambda x: isinstance(x, EmaState))
    else:
        out["params"] = abstract["params"]
    return out


def restore_run(path: str | os.PathLike, step: int | None = None, *,
                only: Callable[[dict], dict] | None = None) -> tuple[Any, Any, Restored]:
    """-> (graphdef, the run's config, Restored) of a training run's checkpoint (newest complete step by default),
    restored onto this process's first device whatever topology wrote it. only: abstract state -> the same with
    SKIP where nothing is to be read (e.g. `weights_only`); those leaves stay SKIP in Restored.state."""
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
        return graphdef, config, ckpt.restore(only(abstract) if only else abstract, step)


def load_ema_model(
    path: str | os.PathLike, step: int | None = None, *, use_ema: bool = True, **overrides: Any
) -> tuple[DiT | DDT, Any, int]:
    """-> (the DiT or DDT holding the EMA weights (or the trained ones with use_ema=False), the run's config, step).

    overrides: DiT options that do not change the weights (dtype, attn_impl, remat_policy)."""
    fixed = sorted(set(overrides) - {"dtype", "attn_impl", "remat_policy"})
    if fixed:
        raise ValueError(f"{fixed} cannot be overridden when loading a training run")
    # only the weights sampling uses are read (not Adam's moments, nor REPA's frozen encoder: ~4x the model)
    graphdef, config, restored = restore_run(path, step, only=lambda a: weights_only(a, use_ema=use_ema))
    state = restored.state
    params = ema_params(state["opt_state"]) if use_ema else state["params"]
    model = nnx.merge(graphdef, params, state["rest"])
    if overrides:
        model = _with_options(model, config, overrides)
    return model, config, restored.step


def _with_options(model: DiT | DDT, config: Any, overrides: dict[str, Any]) -> DiT | DDT:
    fam = family_of(model)
    kw = fam.kwargs(config.model, config.repa)
    for k in overrides:
        if k not in kw:  # remat_policy on a DDT
            readers = " or ".join(f.title for f in FAMILIES.values() if k in f.model_keys)
            raise ValueError(f"{k} applies to {readers} runs only")
    for k, v in overrides.items():
        kw[k] = DTYPES.get(v, v) if k == "dtype" else v
    target = nnx.eval_shape(lambda: fam.cls(**kw, rngs=nnx.Rngs(0)))
    nnx.update(target, nnx.state(model))
    return target
