"""TPU splash attention (Pallas) for `attention(..., impl="splash")`, under shard_map over the batch axes.

The technique follows MaxDiffusion / MaxText: the kernel works on one example's (heads, tokens, head_dim) arrays,
so it is vmapped over the local batch and wrapped in `jax.shard_map` over the mesh's data axes (a Pallas call
cannot be partitioned by XLA). The mesh comes from the ambient `jax.set_mesh(mesh)` context (the trainer and
`dit-jax bench` set it when model.attn_impl == "splash"); without one the kernel runs on the local arrays.

Guarded: on anything but a TPU this raises (CPU and GPU never reach Pallas-TPU code) unless `interpret=True`,
(or DIT_JAX_SPLASH_INTERPRET=1), which runs the same kernel in the Pallas interpreter (slow; the tests use it
on the CPU to check the numerics of the kernel, the sampler and the train step against the XLA path). Sequences shorter than SPLASH_MIN_TOKENS or not a multiple of the 128-token block fall
back to the XLA path (the cross-attention block's 2 condition tokens, small latents), where XLA's fused
attention is as fast.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

SPLASH_BLOCK = 128
SPLASH_MIN_TOKENS = 256
INTERPRET_ENV = "DIT_JAX_SPLASH_INTERPRET"  # test hook: "1" runs the kernel in the Pallas interpreter off a TPU


def splash_supported(q_len: int, kv_len: int) -> bool:
    """Whether splash runs for these sequence lengths (else the caller uses the XLA path)."""
    return min(q_len, kv_len) >= SPLASH_MIN_TOKENS and q_len % SPLASH_BLOCK == 0 and kv_len % SPLASH_BLOCK == 0


@functools.lru_cache(maxsize=16)
def _kernel(num_heads: int, q_len: int, kv_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.FullMask((q_len, kv_len)) for _ in range(num_heads)])  # DiT: no mask
    bq, bkv = min(512, q_len), min(512, kv_len)
    while q_len % bq:
        bq //= 2
    while kv_len % bkv:
        bkv //= 2
    blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                           block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sk.make_splash_mha(mask=mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _batch_axes(mesh) -> tuple[str, ...]:
    return tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, interpret: bool = False) -> jax.Array:
    """q: (B, Tq, H, hd), k and v: (B, Tk, H, hd) -> (B, Tq, H, hd); scale 1/sqrt(hd), no mask."""
    interpret = interpret or os.environ.get(INTERPRET_ENV) == "1"
    platform = jax.devices()[0].platform
    if platform != "tpu" and not interpret:
        raise ValueError(f"attn_impl='splash' needs a TPU (this process runs on {platform!r}); use 'xla' "
                         "(or 'cudnn' on an NVIDIA GPU)")
    b, tq, h, hd = q.shape
    tk = k.shape[1]
    kernel = _kernel(h, tq, tk, interpret)
    scale = 1.0 / math.sqrt(hd)
    dtype = q.dtype

    def local(qh: jax.Array, kh: jax.Array, vh: jax.Array) -> jax.Array:
        return jax.vmap(kernel)(qh, kh, vh)

    # (B, T, H, hd) -> (B, H, T, hd); the kernel takes the query pre-scaled (as MaxText / MaxDiffusion do)
    qh = (q * np.asarray(scale, dtype)).transpose(0, 2, 1, 3)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else _batch_axes(mesh)
    if axes:
        spec = P(axes)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(qh, kh, vh)
    else:
        out = local(qh, kh, vh)
    return out.transpose(0, 2, 1, 3).astype(dtype)


def uses_splash(model: object) -> bool:
    """Whether any attention module of an NNX model runs splash (callers then trace under `jax.set_mesh`)."""
    from flax import nnx

    return any(getattr(m, "attn_impl", None) == "splash" for _, m in nnx.iter_modules(model))


def mesh_context(mesh: jax.sharding.Mesh, attn_impl: str) -> Any:
    """`jax.set_mesh(mesh)` when the model needs the ambient mesh at trace time (splash attention runs its
    Pallas kernel under shard_map over the batch axes); a no-op context otherwise. set_mesh acts when it is
    constructed: call this in the `with` statement, not ahead of it."""
    if attn_impl == "splash":
        return jax.set_mesh(mesh)
    return contextlib.nullcontext()
