"""Weight converters into dit_jax models.

    load_official_dit(model, state_dict)        facebookresearch/DiT key layout (releases, train.py checkpoints)
    to_official_state_dict(model)               the inverse: our weights in the official layout
    load_diffusers_dit(model, state_dict)       diffusers DiTTransformer2DModel key layout
    load_diffusers_dit_folder(model, path)      a diffusers folder (config.json + safetensors), numpy only
    dit_from_diffusers_config(config)           the DiT a diffusers config.json describes
    read_state_dict(path) / read_pt(path)       .pt (weights_only, torch optional) or .safetensors -> numpy
    load_converted(path)                        the output of `dit-jax convert` (convert/folder.py)
    load_official_ddt(model, state_dict)        MCG-NJU/DDT checkpoints (Lightning, ema_denoiser.*) -> DDT
"""

from dit_jax.convert.common import (
    Arch,
    CheckpointMismatchError,
    CheckpointReadError,
    model_to_numpy,
    read_safetensors,
    unwrap_checkpoint,
)
from dit_jax.convert.diffusers_dit import (
    EmbedderCopiesDisagreeError,
    dit_from_diffusers_config,
    dit_kwargs_from_diffusers_config,
    infer_diffusers_arch,
    load_diffusers_dit,
    load_diffusers_dit_folder,
    read_diffusers_folder,
)
from dit_jax.convert.diffusers_vae import load_diffusers_vae, load_diffusers_vae_folder
from dit_jax.convert.official_dit import infer_official_arch, load_official_dit, to_official_state_dict
from dit_jax.convert.ddt import load_official_ddt
from dit_jax.convert.folder import load_converted
from dit_jax.convert.pt_reader import read_pt, read_state_dict, read_train_args
from dit_jax.convert.inception import load_inception, load_inception_file  # noqa: F401  (FID Inception-v3)

__all__ = [
    "load_official_ddt",
    "Arch",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "EmbedderCopiesDisagreeError",
    "dit_from_diffusers_config",
    "dit_kwargs_from_diffusers_config",
    "infer_diffusers_arch",
    "infer_official_arch",
    "load_converted",
    "load_diffusers_dit",
    "load_diffusers_dit_folder",
    "load_diffusers_vae",
    "load_diffusers_vae_folder",
    "load_official_dit",
    "model_to_numpy",
    "read_diffusers_folder",
    "read_pt",
    "read_safetensors",
    "read_state_dict",
    "read_train_args",
    "to_official_state_dict",
    "unwrap_checkpoint",
]

