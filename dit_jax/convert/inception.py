"""Weights of the FID Inception-v3 (pytorch-fid / torch-fidelity layout) -> dit_jax.models.InceptionV3.

The file is `pt_inception-2015-12-05-6726825d.pth` (95 MB), the constants of TensorFlow's 2015-12-05
classify_image_graph_def.pb renamed to a torchvision-style tree. Get it from pytorch-fid's release

    https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

(torch-fidelity's weights-inception-2015-12-05-6726825d.pth, from its v0.2.0 release, is the same file) and pass
its local path; nothing here downloads anything. Reading a .pth needs torch and goes through
dit_jax.convert.pt_reader (torch.load(weights_only=True), never full unpickling); the same tensors saved as
.safetensors are read with numpy alone.

Key layout (our module tree mirrors it, see dit_jax/models/inception.py):

    <layer>.conv.weight        (O, I, kh, kw)  -> <layer>.conv.kernel (kh, kw, I, O)
    <layer>.bn.weight          (C,)            -> <layer>.bn.scale          (TF batchnorm/gamma)
    <layer>.bn.bias            (C,)            -> <layer>.bn.bias           (TF batchnorm/beta)
    <layer>.bn.running_mean    (C,)            -> <layer>.bn.mean           (TF batchnorm/moving_mean)
    <layer>.bn.running_var     (C,)            -> <layer>.bn.var            (TF batchnorm/moving_variance)
    <layer>.bn.num_batches_tracked ()          ignored when present
    fc.weight                  (1008, 2048)    -> fc.kernel (2048, 1008)     (TF softmax/weights, transposed)
    fc.bias                    (1008,)         -> fc.bias                    (TF softmax/biases; unused by ADM)

for <layer> in Conv2d_1a_3x3 ... Conv2d_4a_3x3 and Mixed_5b.branch1x1 ... Mixed_7c.branch_pool.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from dit_jax.convert.common import assign_torch_named, check_keys, torch_named_shapes, unwrap_checkpoint
from dit_jax.models.inception import InceptionV3

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILENAME}"
WEIGHTS_ENV = "DIT_JAX_INCEPTION_WEIGHTS"
WEIGHTS_HINT = (
    f"the FID Inception weights are {WEIGHTS_FILENAME} from {WEIGHTS_URL} (torch-fidelity's "
    "weights-inception-2015-12-05-6726825d.pth is the same file): download it, then pass --inception-weights PATH "
    f"or set ${WEIGHTS_ENV}=PATH"
)

# our leaf name -> (torch leaf name, kind)
_LEAVES = {
    "kernel": ("weight", "kernel"),
    "scale": ("weight", "plain"),
    "bias": ("bias", "plain"),
    "mean": ("running_mean", "plain"),
    "var": ("running_var", "plain"),
}


def _source_name(ours: str) -> tuple[str, str]:
    """(torch key, kind) of one of our variable paths; kind is "kernel" (transposed) or "plain"."""
    stem, leaf = ours.rsplit(".", 1)
    if leaf not in _LEAVES:
        raise RuntimeError(f"internal converter error: unexpected variable {ours!r} in InceptionV3")
    name, kind = _LEAVES[leaf]
    return f"{stem}.{name}", kind


def expected_inception_keys(model: InceptionV3) -> dict[str, tuple[int, ...]]:
    """pytorch-fid key -> torch shape for every variable (parameters and batch-norm statistics) of `model`."""
    return torch_named_shapes(model, _source_name)


def _hint(sd: Mapping[str, Any]) -> str:
    keys = list(sd)
    if any(k.startswith("AuxLogits.") for k in keys) or tuple(getattr(sd.get("fc.weight"), "shape", ()))[:1] == (1000,):
        return (
            "this looks like torchvision's ImageNet Inception-v3 (AuxLogits, a 1000-class fc): FID needs the TF "
            f"2015-12-05 graph's weights instead; {WEIGHTS_HINT}"
        )
    if any(k.startswith(("x_embedder.", "t_embedder.", "pos_embed.proj.", "transformer_blocks.")) for k in keys):
        return f"this looks like a DiT checkpoint, not the Inception network's weights; {WEIGHTS_HINT}"
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in keys):
        return "this looks like pytorch-fid's InceptionV3 wrapper (blocks.*): pass the underlying FID weight file"
    return WEIGHTS_HINT


def load_inception(model: InceptionV3, state_dict: Mapping[str, Any]) -> InceptionV3:
    """Fill `model` in place from a pytorch-fid / torch-fidelity state_dict (numpy arrays or torch tensors).

    Everything is validated before the model is touched: one CheckpointMismatchError names every missing,
    unexpected and mis-shaped key. `*.bn.num_batches_tracked` entries are accepted and ignored. Works on an
    abstract model (nnx.eval_shape) too. Returns the model.
    """
    if not isinstance(model, InceptionV3):
        raise TypeError(f"expected a dit_jax.models.InceptionV3, got {type(model).__name__}")
    sd = unwrap_checkpoint(state_dict)
    required = expected_inception_keys(model)
    optional = {k: tuple(sd[k].shape) for k in sd if k.endswith(".bn.num_batches_tracked")
                and k[: -len("num_batches_tracked")] + "running_mean" in required}
    check_keys(sd, required, optional, hint=lambda: _hint(sd), what="FID Inception-v3 weight file")
    assign_torch_named(model, sd, _source_name)
    return model


def load_inception_file(path: str | os.PathLike, *, dtype: Any = None, precision: Any = None) -> InceptionV3:
    """An InceptionV3 with the weights of a local .pth (needs torch) or .safetensors file (see the module docstring).

    The model is built abstractly (no random init) and filled by load_inception. dtype: compute dtype of the
    convolutions (None = float32, as the metrics assume); precision: None keeps the model's default (HIGHEST).
    Raises CheckpointReadError for a missing or unreadable file.
    """
    from dit_jax.convert.pt_reader import read_state_dict

    state = read_state_dict(path)
    kw: dict[str, Any] = {} if precision is None else dict(precision=precision)
    model = nnx.eval_shape(lambda: InceptionV3(dtype=dtype, rngs=nnx.Rngs(0), **kw))
    return load_inception(model, state)


def resolve_weights(path: str | None, flag: str = "--inception-weights") -> Path:
    """`path` (given as `flag`: a command-line flag, or a config key such as train.eval_inception), else
    $DIT_JAX_INCEPTION_WEIGHTS; FileNotFoundError saying where to get the file and how to pass it."""
    from dit_jax.paths import check_input_file

    hint = WEIGHTS_HINT if flag.startswith("-") else WEIGHTS_HINT.replace("--inception-weights PATH",
                                                                          f"--config.{flag}=PATH")
    given = path or os.environ.get(WEIGHTS_ENV)
    if not given:
        raise FileNotFoundError(f"no Inception weights given: {hint}")
    source = flag if path else f"${WEIGHTS_ENV}"
    return check_input_file(given, source, what="the weight file", hint=hint)
