"""Shared machinery of the DiT weight converters: array coercion, checkpoint unwrapping, validation with a
complete mismatch report, architecture inference from shapes, and writing values into an NNX model.

A converter turns a source state_dict into a dict keyed by *our* parameter names in the unstacked layout
("blocks.3.attn.qkv.kernel"); `assign` writes that dict into a DiT in either block layout (a python list of
blocks, or one stacked block with a leading depth axis when `scan_blocks=True`). Nothing touches the model
before the whole checkpoint has been validated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.constants import MODEL_SIZES, PATCH_SIZES, VAE_DOWNSAMPLE
from dit_jax.errors import CheckpointMismatchError
from dit_jax.models.dit import DiT
from dit_jax.models.layers import get_2d_sincos_pos_embed
from dit_jax.paths import check_input_file

log = logging.getLogger("dit_jax.convert")

Shape = tuple[int, ...]
# Prefixes that wrappers add to every key: DistributedDataParallel ("module.") and torch.compile ("_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# ----------------------------------------------------------------------------------------------------------
# Errors (CheckpointMismatchError, shared with the trainer's checkpoints, lives in dit_jax.errors).
# ----------------------------------------------------------------------------------------------------------
class CheckpointReadError(ValueError):
    """A checkpoint file could not be read (missing, truncated, corrupt, or refused as unsafe)."""


# ----------------------------------------------------------------------------------------------------------
# Arrays and state_dicts.
# ----------------------------------------------------------------------------------------------------------
def to_numpy(x: Any) -> np.ndarray:
    """numpy view of a numpy / jax array or a torch tensor (torch is never imported here).

    torch bfloat16 has no numpy dtype, so such tensors are widened to float32 first (exact).
    """
    if isinstance(x, np.ndarray):
        return x
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch.Tensor, duck-typed so torch stays optional
        t = x.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _looks_like_tensor(x: Any) -> bool:
    return isinstance(x, np.ndarray) or (hasattr(x, "shape") and hasattr(x, "dtype"))


def unwrap_checkpoint(obj: Any, which: str = "ema") -> dict[str, Any]:
    """The flat state_dict inside `obj`.

    Accepts a flat state_dict (official releases), a train.py checkpoint {"model", "ema", "opt", "args"}
    (official DiT train.py; `which` picks "ema", the default and what sample.py uses, or "model"), a
    {"state_dict": ...} wrapper, and keys prefixed by "module." (DistributedDataParallel) or "_orig_mod."
    (torch.compile). Values are returned as they are (numpy, jax or torch).
    """
    if which not in ("ema", "model"):
        raise ValueError(f"which must be 'ema' or 'model', got {which!r}")
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to arrays), got {type(obj).__name__}")
    nested = {k for k, v in obj.items() if isinstance(v, Mapping)}
    if nested & {"ema", "model"}:
        if which not in obj:
            present = sorted(nested & {"ema", "model"})
            raise ValueError(
                f"the checkpoint has no {which!r} weights (it holds {present}); pass which={present[0]!r}"
            )
        obj = obj[which]
    elif "state_dict" in nested:
        obj = obj["state_dict"]
    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict keys must be strings, got {key!r}")
        name = key
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if name in out:
            raise ValueError(f"two keys map to {name!r} once wrapper prefixes {WRAPPER_PREFIXES} are removed")
        out[name] = value
    bad = [k for k, v in out.items() if not _looks_like_tensor(v)]
    if bad:
        raise TypeError(f"state_dict values must be arrays or tensors; not for {bad[:10]}")
    return out


def check_keys(
    given: Mapping[str, Any],
    required: Mapping[str, Shape],
    optional: Mapping[str, Shape] | None = None,
    hint: Callable[[], str] | None = None,
    what: str = "checkpoint",
) -> None:
    """Raise one CheckpointMismatchError naming every missing, unexpected and mis-shaped key."""
    optional = optional or {}
    missing = [k for k in required if k not in given]
    unexpected = sorted(k for k in given if k not in required and k not in optional)
    mismatched = []
    for key, shape in list(required.items()) + list(optional.items()):
        if key in given and tuple(given[key].shape) != tuple(shape):
            mismatched.append((key, tuple(shape), tuple(given[key].shape)))
    if missing or unexpected or mismatched:
        text = ""
        if hint is not None:
            try:
                text = hint()
            except Exception as e:  # a hint must never hide the real report
                log.debug("no hint: %s", e)
        raise CheckpointMismatchError(missing, unexpected, mismatched, text, what)


# ----------------------------------------------------------------------------------------------------------
# Architectures.
# ----------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Arch:
    """What shapes say about a DiT. None = could not be told."""

    depth: int | None = None
    hidden_size: int | None = None
    patch_size: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    num_classes: int | None = None  # table rows - 1 (the extra row is the CFG null class)
    input_size: int | None = None  # latent side = sqrt(tokens) * patch
    mlp_hidden: int | None = None
    num_heads: int | None = None

    @property
    def learn_sigma(self) -> bool | None:
        if self.in_channels is None or self.out_channels is None:
            return None
        return self.out_channels == 2 * self.in_channels

    @property
    def variant(self) -> str | None:
        """"DiT-XL/2" when depth, width and patch are one of the paper's twelve configurations."""
        return variant_name(self.depth, self.hidden_size, self.patch_size)

    def describe(self, name: bool = True) -> str:
        parts = []
        if name and self.variant:
            parts.append(self.variant)
        for name in ("depth", "hidden_size", "num_heads", "patch_size", "in_channels", "out_channels"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name} {value}")
        if self.mlp_hidden is not None and self.hidden_size and self.mlp_hidden != 4 * self.hidden_size:
            parts.append(f"mlp hidden {self.mlp_hidden}")
        if self.input_size is not None:
            parts.append(f"input_size {self.input_size} ({self.input_size * VAE_DOWNSAMPLE} px images)")
        if self.num_classes is not None:
            parts.append(f"{self.num_classes} classes")
        return ", ".join(parts)


def variant_name(depth: int | None, hidden_size: int | None, patch_size: int | None) -> str | None:
    for size, cfg in MODEL_SIZES.items():
        if cfg["depth"] == depth and cfg["hidden_size"] == hidden_size and patch_size in PATCH_SIZES:
            return f"DiT-{size}/{patch_size}"
    return None


def heads_for_width(hidden_size: int) -> int | None:
    """Number of heads of the paper's configuration with this width (S 6, B 12, L 16, XL 16), else None."""
    for cfg in MODEL_SIZES.values():
        if cfg["hidden_size"] == hidden_size:
            return cfg["num_heads"]
    return None


def model_arch(model: DiT) -> Arch:
    return Arch(
        depth=model.depth,
        hidden_size=model.hidden_size,
        patch_size=model.patch_size,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        num_classes=model.num_classes,
        input_size=model.input_size,
        mlp_hidden=int(model.hidden_size * model.mlp_ratio),
        num_heads=model.num_heads,
    )


def arch_hint(ckpt: Arch, model: DiT) -> str:
    """Say how the checkpoint's architecture differs from the model's ('' when nothing differs)."""
    mine = model_arch(model)
    diffs = []
    for f in dataclasses.fields(Arch):
        a, b = getattr(ckpt, f.name), getattr(mine, f.name)
        if a is not None and b is not None and a != b:
            diffs.append(f"{f.name} {a} (model: {b})")
    if not diffs:
        return ""
    seems = f"the checkpoint seems to be {ckpt.variant}" if ckpt.variant else "the checkpoint seems to be a custom DiT"
    text = f"{seems} ({ckpt.describe(name=False)}), but the model is {mine.describe()}; differing: {', '.join(diffs)}."
    if ckpt.variant and ckpt.input_size and ckpt.num_classes and ckpt.learn_sigma is not None:
        text += (
            f" Build the model with DiT_models[{ckpt.variant!r}](input_size={ckpt.input_size}, "
            f"in_channels={ckpt.in_channels}, num_classes={ckpt.num_classes}, learn_sigma={ckpt.learn_sigma})."
        )
    return text


def block_indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct i of keys "{prefix}{i}.…"."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def check_model_supported(model: Any) -> None:
    if not isinstance(model, DiT):
        raise TypeError(f"expected a dit_jax.models.DiT, got {type(model).__name__}")
    if model.block_type != "adaLN-Zero":
        raise ValueError(
            f"model.block_type is {model.block_type!r}: only 'adaLN-Zero' DiTs have released checkpoints "
            "(the official and diffusers layouts have no weights for the paper's adaLN, cross-attn or in-context "
            "ablations); build the model with block_type='adaLN-Zero'"
        )


# ----------------------------------------------------------------------------------------------------------
# Our model's variables.
# ----------------------------------------------------------------------------------------------------------
def _path_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def model_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """Dotted path -> Variable (the model's own objects) for every Param and FixedEmbed of the model."""
    return {_path_name(path): var for path, var in nnx.to_flat_state(nnx.state(model))}


def is_stacked(variables: Mapping[str, Any]) -> bool:
    """True when the blocks are one stacked module (scan_blocks=True): no "blocks.<int>." paths."""
    has_indexed = any(re.match(r"blocks\.\d+\.", k) for k in variables)
    has_blocks = any(k.startswith("blocks.") for k in variables)
    return has_blocks and not has_indexed


def unstacked_shapes(model: nnx.Module) -> dict[str, Shape]:
    """Shapes of the model's variables under unstacked names ("blocks.{i}.…"), whatever its layout."""
    variables = model_variables(model)
    out: dict[str, Shape] = {}
    if is_stacked(variables):
        for name, var in variables.items():
            shape = tuple(var.get_value().shape)
            if name.startswith("blocks."):
                for i in range(shape[0]):
                    out[f"blocks.{i}." + name[len("blocks."):]] = shape[1:]
            else:
                out[name] = shape
    else:
        out = {name: tuple(var.get_value().shape) for name, var in variables.items()}
    return out


def model_to_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's values as numpy under unstacked names (the inverse of `assign`)."""
    variables = model_variables(model)
    stacked = is_stacked(variables)
    out: dict[str, np.ndarray] = {}
    for name, var in variables.items():
        value = np.asarray(jax.device_get(var.get_value()))
        if stacked and name.startswith("blocks."):
            for i in range(value.shape[0]):
                out[f"blocks.{i}." + name[len("blocks."):]] = value[i]
        else:
            out[name] = value
    return out


def _place(value: np.ndarray, like: Any) -> jax.Array:
    """value as a jax.Array with the dtype and (when there is one) the sharding of `like`."""
    value = np.asarray(value, dtype=like.dtype)
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.Sharding):
        # Works for multi-host shardings too: each process builds only its addressable shards.
        return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])
    return jnp.asarray(value)


def assign(model: DiT, values: Mapping[str, np.ndarray]) -> None:
    """Write `values` (our unstacked names) into the model, stacking blocks when the model is scanned.

    `values` must cover every variable except possibly `pos_embed`, which then keeps its value (the exact
    sin-cos table; computed here when the model is abstract, e.g. from nnx.eval_shape). All new arrays are
    built before the first one is written.
    """
    variables = model_variables(model)
    stacked = is_stacked(variables)
    values = dict(values)
    if "pos_embed" not in values:
        current = variables["pos_embed"].get_value()
        if isinstance(current, jax.ShapeDtypeStruct):
            grid = model.input_size // model.patch_size
            values["pos_embed"] = get_2d_sincos_pos_embed(model.hidden_size, grid)[None].astype(np.float32)
    if stacked:
        merged: dict[str, np.ndarray] = {}
        per_block: dict[str, list[tuple[int, np.ndarray]]] = {}
        for name, value in values.items():
            m = re.match(r"blocks\.(\d+)\.(.*)$", name)
            if m:
                per_block.setdefault(m.group(2), []).append((int(m.group(1)), value))
            else:
                merged[name] = value
        for rest, items in per_block.items():
            items.sort(key=lambda iv: iv[0])
            if [i for i, _ in items] != list(range(len(items))):
                raise RuntimeError(f"blocks.*.{rest}: block indices {[i for i, _ in items]} are not 0..n-1")
            merged["blocks." + rest] = np.stack([v for _, v in items])
        values = merged
    # Internal consistency: the converter tables must cover exactly the model's variables.
    extra = sorted(set(values) - set(variables))
    uncovered = sorted(k for k in set(variables) - set(values) if k != "pos_embed")
    wrong = [
        (k, tuple(variables[k].get_value().shape), tuple(v.shape))
        for k, v in values.items()
        if k in variables and tuple(v.shape) != tuple(variables[k].get_value().shape)
    ]
    if extra or uncovered or wrong:
        raise RuntimeError(
            "internal converter error (the converter tables are out of date with dit_jax.models.DiT): "
            f"extra {extra}, uncovered {uncovered}, mis-shaped {wrong}"
        )
    placed = {k: _place(v, variables[k].get_value()) for k, v in values.items()}
    for k, v in placed.items():
        variables[k].set_value(v)


# ----------------------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------------------
# safetensors dtype codes (https://github.com/huggingface/safetensors, "Format") -> numpy dtypes.
_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": jnp.bfloat16,  # ml_dtypes' bfloat16, which numpy cannot name by itself
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a .safetensors file with numpy alone (memory-mapped, read-only arrays).

    Format: an 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}
    (plus an optional "__metadata__"), then the raw little-endian tensor bytes. Written out here rather than
    using safetensors.numpy because that cannot represent bfloat16. Every offset is checked, so a truncated
    or corrupt file gives a CheckpointReadError naming it.
    """
    path = os.fspath(path)
    check_input_file(path, what="a safetensors file", error=CheckpointReadError)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointReadError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise CheckpointReadError(
                    f"{path}: corrupt or truncated safetensors file (header length {n}): download or export it again"
                )
            header = json.loads(f.read(n))
    except PermissionError:
        raise  # the file is fine, its permissions are not: the OSError names it
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise CheckpointReadError(f"{path}: no such file") from e
        raise CheckpointReadError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    start = 8 + n
    data_len = size - start
    out: dict[str, np.ndarray] = {}
    mm = np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=(data_len,)) if data_len > 0 else None
    for name, info in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except KeyError as e:
            raise CheckpointReadError(f"{path}: tensor {name!r} has an unsupported or missing field {e}") from e
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or end > data_len:
            raise CheckpointReadError(
                f"{path}: corrupt or truncated safetensors file (tensor {name!r} needs bytes {begin}..{end} of "
                f"{data_len}): download or export it again"
            )
        if nbytes == 0:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = mm[begin:end].view(dtype).reshape(shape)
    return out


CONFIG_NAME = "config.json"


def resolve_model_folder(path: str | os.PathLike, subfolder: str, what: str) -> "os.PathLike":
    """The folder holding a diffusers model's config.json: `path` itself, or a pipeline's `subfolder`/ folder
    (transformer/ for a DiT, vae/ for the VAE). `what` names the model in the error."""
    from pathlib import Path

    p = Path(path)
    if (p / CONFIG_NAME).is_file():
        return p
    if (p / subfolder / CONFIG_NAME).is_file():
        return p / subfolder
    raise CheckpointReadError(f"{p}: not a diffusers {what} folder (no {CONFIG_NAME}, nor {subfolder}/{CONFIG_NAME})")


def read_config_json(file: Any) -> dict[str, Any]:
    """A diffusers model's config.json as a dict; CheckpointReadError naming the file when it cannot be read or
    is not a JSON object (a PermissionError stays itself: the OSError names the file)."""
    try:
        with open(file, "rb") as f:
            config = json.loads(f.read())
    except PermissionError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        what = "not valid JSON" if isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)) else "unreadable"
        raise CheckpointReadError(
            f"{file}: cannot read the diffusers config: {what} ({e}); it should be the model's config.json as "
            "save_pretrained writes it: download or save it again") from e
    if not isinstance(config, dict):
        raise CheckpointReadError(f"{file}: the diffusers config is a JSON {type(config).__name__}, not an object "
                                  "of settings: download or save it again")
    return config


def read_safetensors_files(files: Iterable[Any]) -> dict[str, np.ndarray]:
    """Merge the tensors of one or several safetensors shards (numpy only); a key in two shards is an error."""
    state: dict[str, np.ndarray] = {}
    for f in files:
        for k, v in read_safetensors(f).items():
            if k in state:
                raise CheckpointReadError(f"{f}: key {k!r} appears in more than one shard")
            state[k] = v
    return state


# ----------------------------------------------------------------------------------------------------------
# Torch-named checkpoints whose keys map one to one onto our variables (the VAE, the Inception network).
# ----------------------------------------------------------------------------------------------------------
def torch_layout_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Our shape -> torch's: a "kernel" of a conv (kh, kw, I, O) is (O, I, kh, kw) there, a Linear's (I, O) is
    (O, I); anything else is stored alike."""
    if kind == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def from_torch_layout(kind: str, value: np.ndarray) -> np.ndarray:
    """The inverse of torch_layout_shape, applied to a value."""
    if kind == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if kind == "kernel" and value.ndim == 2:
        return value.T
    return value


def torch_named_shapes(model: nnx.Module, source_name: Callable[[str], tuple[str, str]]) -> dict[str, Shape]:
    """source key -> torch shape for every variable of `model`; source_name(our name) -> (key, kind)."""
    out = {}
    for ours, var in model_variables(model).items():
        key, kind = source_name(ours)
        out[key] = torch_layout_shape(kind, tuple(var.get_value().shape))
    return out


def assign_torch_named(model: nnx.Module, sd: Mapping[str, Any], source_name: Callable[[str], tuple[str, str]]) -> None:
    """Fill every variable of `model` from the (already checked) torch-named `sd`; all values are converted and
    placed before the first one is set, so a failure leaves the model untouched."""
    variables = model_variables(model)
    placed = {}
    for ours, var in variables.items():
        key, kind = source_name(ours)
        placed[ours] = _place(from_torch_layout(kind, to_numpy(sd[key])), var.get_value())
    for ours, value in placed.items():
        variables[ours].set_value(value)
