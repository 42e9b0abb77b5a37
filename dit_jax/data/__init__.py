"""Training data: grain pipelines over TFDS, an image folder, scikit-learn's digits, or VAE latents.

    from dit_jax.data import make_train_iterator
    it = make_train_iterator(config.data, global_batch=256, seed=0)
    batch = next(it)  # {"x": float32 (256 // process_count, H, W, C), "y": int32}

See pipeline.py (order, sharding, resume, bad records), transforms.py (the ADM centre crop), sources.py
and latents.py (the latent ArrayRecord format).
"""

from dit_jax.data.latents import (
    LATENT_SCALE,
    DecodeLatents,
    LatentsSource,
    decode_latent_record,
    encode_latent_record,
    read_latents_meta,
    write_latents,
)
from dit_jax.data.pipeline import GlobalOrder, TrainIterator, build_source, make_train_iterator
from dit_jax.data.sources import DigitsSource, ImageFolderSource, TfdsSource, load_digits_arrays
from dit_jax.data.transforms import DecodeImage, RandomFlip, ToFloat, center_crop_arr, to_model_range

__all__ = [
    "LATENT_SCALE",
    "DecodeImage",
    "DecodeLatents",
    "DigitsSource",
    "GlobalOrder",
    "ImageFolderSource",
    "LatentsSource",
    "RandomFlip",
    "TfdsSource",
    "ToFloat",
    "TrainIterator",
    "build_source",
    "center_crop_arr",
    "decode_latent_record",
    "encode_latent_record",
    "load_digits_arrays",
    "make_train_iterator",
    "read_latents_meta",
    "to_model_range",
    "write_latents",
]
