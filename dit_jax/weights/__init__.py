"""The weights manager: pretrained DiT and VAE weights, downloaded into a cache, checked, converted once.

    from dit_jax.weights import pretrained_dit, pretrained_vae
    model = pretrained_dit("DiT-XL-2-256x256", dtype=jnp.bfloat16)   # download + convert on first use
    vae = pretrained_vae("ema")                                     # stabilityai/sd-vae-ft-ema
    # command line: dit-jax download --list | dit-jax download DiT-XL-2-256x256.pt ema

Sources (as the official code): https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{256x256,512x512}.pt
(facebookresearch/DiT download.py) and https://huggingface.co/stabilityai/sd-vae-ft-{ema,mse}/resolve/main/
{config.json, diffusion_pytorch_model.safetensors} (sample.py). Mirrors: $DIT_JAX_DIT_URL_BASE replaces
https://dl.fbaipublicfiles.com/DiT/models, $DIT_JAX_HF_URL_BASE (or $HF_ENDPOINT) replaces https://huggingface.co.

Cache ($DIT_JAX_CACHE, else $XDG_CACHE_HOME/dit_jax or ~/.cache/dit_jax; `cache_dir=` / `--cache-dir` override):

    downloads/DiT-XL-2-256x256.pt (+ .sha256)    official checkpoint, as downloaded
    converted/DiT-XL-2-256x256/                   its Orbax conversion (state/ + dit_config.json)
    converted/<stem>-<sha256[:16]>/               conversion of a local file or folder passed by path
    vae/sd-vae-ft-ema/config.json, diffusion_pytorch_model.safetensors (+ .sha256 each)

Checksum policy. The publishers state no sha256 for these files, so none is pinned in the registry; an entry
may pin `size` and `sha256`, and a pinned value is always enforced. Otherwise the expected sha256 and size come
from the server when it states them (Hugging Face: X-Linked-Etag / X-Linked-Size of its redirect, or a
64-hex ETag, which are the LFS sha256 and size) and else the size from Content-Length (Content-Range when
resuming). A download streams into `<file>.part` (an interrupted one resumes with an HTTP Range request; a
server that ignores Range makes it start over), is checked for size and sha256, and only then renamed into
place, so a file in the cache is always complete and verified. A size or sha256 mismatch deletes the .part and
raises ChecksumMismatchError (expected vs got, the URL, what to do); a transfer cut short is retried with
backoff, then raises IncompleteDownloadError and keeps the .part for the next attempt to resume. The sha256
of every verified file is recorded next to it (`<file>.sha256`, sha256sum format) and checked on every later
use: a file changed since raises CorruptCacheError naming it and the fix (delete it, or
`dit-jax download --force NAME`). A file placed by hand (for offline use) is accepted once and recorded.

Offline (`offline=True`, `--offline`, DIT_JAX_OFFLINE=1 or HF_HUB_OFFLINE=1): no network at all; a missing
file raises OfflineError naming the path it must be copied to and the URL to fetch it from elsewhere.
"""

from dit_jax.weights.transfer import (
    ChecksumMismatchError,
    CorruptCacheError,
    DownloadError,
    IncompleteDownloadError,
    OfflineError,
    WeightsError,
    fetch,
)
from dit_jax.weights.pretrained import converted_dit, download, pretrained_dit, pretrained_vae
from dit_jax.weights.registry import (
    ALIASES,
    REGISTRY,
    Entry,
    RemoteFile,
    UnknownWeightsError,
    cache_dir,
    is_offline,
    resolve_name,
)

__all__ = [
    "ALIASES",
    "REGISTRY",
    "ChecksumMismatchError",
    "CorruptCacheError",
    "DownloadError",
    "Entry",
    "IncompleteDownloadError",
    "OfflineError",
    "RemoteFile",
    "UnknownWeightsError",
    "WeightsError",
    "cache_dir",
    "converted_dit",
    "download",
    "fetch",
    "is_offline",
    "pretrained_dit",
    "pretrained_vae",
    "resolve_name",
]
