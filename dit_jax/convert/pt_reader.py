"""Read PyTorch checkpoints safely: never full unpickling.

Official DiT releases (DiT-XL-2-256x256.pt) are flat state_dicts, which `torch.load(weights_only=True)` reads.
train.py checkpoints are {"model", "ema", "opt", "args"} where "args" is a pickled argparse.Namespace, which
torch >= 2.6 refuses under weights_only; we allow exactly that one class (torch.serialization.safe_globals)
and still load with weights_only=True, so any other pickled object (a code-execution vector) is refused.

torch is optional: it is imported only here, only when a .pt is read (MissingDependencyError without it).
"""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dit_jax.convert.common import CheckpointReadError, read_safetensors, to_numpy, unwrap_checkpoint
from dit_jax.errors import import_optional
from dit_jax.paths import check_input_file

TORCH_INSTALL = ("pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu (or convert the "
                 "checkpoint to .safetensors elsewhere)")
PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _import_torch():
    return import_optional("torch", "reading a PyTorch checkpoint (.pt)", TORCH_INSTALL)


def read_pt(path: str | os.PathLike) -> Any:
    """torch.load(path, weights_only=True), allowing argparse.Namespace (train.py's "args") and nothing else.

    Zip-format files are memory-mapped. Raises CheckpointReadError naming the file when it is missing,
    truncated or corrupt, or holds pickled objects outside the weights-only allowlist.
    """
    path = os.fspath(path)
    check_input_file(path, what="a PyTorch checkpoint", error=CheckpointReadError)
    torch = _import_torch()
    # mmap needs the zip format (torch >= 1.6 default); a truncated zip has no central directory and fails
    # is_zipfile, so it takes the plain path and gets torch's own error, wrapped below.
    mmap = zipfile.is_zipfile(path)

    def load(**extra: Any) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap, **extra)

    try:
        try:
            return load()
        except pickle.UnpicklingError as e:
            if "argparse.Namespace" not in str(e):
                raise
        # train.py checkpoint: allow the one class it pickles besides tensors and containers.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return load()
    except pickle.UnpicklingError as e:
        detail = str(e).strip().splitlines()
        unsupported = [line.strip() for line in detail if "GLOBAL" in line or "Unsupported" in line]
        if not any("GLOBAL" in line for line in unsupported):  # an opcode no pickle has there: not a pickle
            raise CheckpointReadError(
                f"{path}: cannot read this PyTorch checkpoint: it looks truncated or corrupt, or is no torch.save "
                f"file ({'; '.join(unsupported) or 'not a pickle'}); download or save it again"
            ) from e
        raise CheckpointReadError(
            f"{path}: refusing to unpickle objects outside the weights-only allowlist "
            f"({'; '.join(unsupported) or detail[-1] if detail else 'unknown object'}). Only tensors, containers "
            "and argparse.Namespace are accepted; if you trust the file, re-save its state_dict in a trusted "
            "environment (or as .safetensors)"
        ) from e
    except PermissionError:
        raise  # the file is fine, its permissions are not: the OSError names it
    except (RuntimeError, EOFError, OSError, KeyError, ValueError, IndexError, TypeError, AttributeError) as e:
        raise CheckpointReadError(
            f"{path}: cannot read this PyTorch checkpoint: it looks truncated or corrupt, or is no torch.save file "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'no detail'}); download "
            "or save it again"
        ) from e


def read_state_dict(path: str | os.PathLike, which: str = "ema") -> dict[str, np.ndarray]:
    """Flat state_dict (name -> numpy) of a checkpoint file: .pt/.pth/.bin/.ckpt via read_pt (official release
    or train.py checkpoint: `which` = "ema" or "model"), or .safetensors (numpy only).
    "module." / "_orig_mod." prefixes are removed. torch bfloat16 tensors come back as float32."""
    p = Path(path)
    if p.suffix == ".safetensors":
        obj: Any = read_safetensors(p)
    elif p.suffix in PT_SUFFIXES:
        obj = read_pt(p)
    else:
        raise CheckpointReadError(
            f"{p}: unknown checkpoint type {p.suffix!r}; expected one of {PT_SUFFIXES + ('.safetensors',)}"
        )
    try:
        sd = unwrap_checkpoint(obj, which)
    except (TypeError, ValueError) as e:
        raise CheckpointReadError(f"{p}: {e}") from e
    return {k: to_numpy(v) for k, v in sd.items()}


def read_train_args(path: str | os.PathLike) -> argparse.Namespace | None:
    """The argparse.Namespace that train.py stores under "args" (model name, image size, ...), or None."""
    obj = read_pt(path)
    if isinstance(obj, dict) and isinstance(obj.get("args"), argparse.Namespace):
        return obj["args"]
    return None
