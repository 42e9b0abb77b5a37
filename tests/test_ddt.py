"""DDT (dit_jax/models/ddt.py) and its converter: a numpy reference block, encode/decode, parity with a PyTorch
restatement of MCG-NJU/DDT loaded through load_official_ddt, init, sizes and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.convert import CheckpointMismatchError, load_official_ddt
from dit_jax.models import DDT, DDT_models, ImprovedDiT_models
from dit_jax.models.ddt import DDT_SIZES, DDTBlock, decode_ddt_variant, fold_patches, rope_2d_angles, unfold_patches
from dit_jax.constants import MODEL_SIZES
from tests.ddt_torch import TorchDDT


def randomize(module: nnx.Module, seed: int, scale: float = 0.2) -> None:
    """Every parameter random (the zero-initialised final layer too), so each path is exercised."""
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(module, jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))


# ---------------------------------------------------------------------------------------------- numpy reference
def np_rmsnorm(x, w, eps=1e-6):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def np_block(p: dict, x: np.ndarray, c: np.ndarray, heads: int, grid: int) -> np.ndarray:
    """One DDT block in float64 numpy: RoPE as complex multiplication of adjacent channel pairs, with the
    x (column) and y (row) angles interleaved, positions linspace(0, 16, grid)."""
    b, n, d = x.shape
    hd = d // heads
    mod = c @ p["ada_w"] + p["ada_b"]
    s1, c1, g1, s2, c2, g2 = np.split(mod, 6, axis=-1)
    h = np_rmsnorm(x, p["norm1"]) * (1 + c1) + s1
    q, k, v = np.split(h @ p["qkv"], 3, axis=-1)
    q, k, v = (a.reshape(b, n, heads, hd) for a in (q, k, v))
    q, k = np_rmsnorm(q, p["q_norm"]), np_rmsnorm(k, p["k_norm"])
    pos = np.linspace(0, 16, grid)
    rows, cols = np.meshgrid(pos, pos, indexing="ij")
    freqs = 1.0 / 10000 ** (np.arange(0, hd, 4)[: hd // 4] / hd)
    ang = np.empty((n, hd // 2))
    ang[:, 0::2] = np.outer(cols.reshape(-1), freqs)
    ang[:, 1::2] = np.outer(rows.reshape(-1), freqs)
    rot = np.exp(1j * ang)[None, :, None, :]

    def rope(a):
        z = (a[..., 0::2] + 1j * a[..., 1::2]) * rot
        out = np.empty_like(a)
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
        return out

    q, k = rope(q), rope(k)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    att = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, d) @ p["proj_w"] + p["proj_b"]
    x = x + g1 * att
    h = np_rmsnorm(x, p["norm2"]) * (1 + c2) + s2
    a1, a3 = h @ p["w1"], h @ p["w3"]
    x = x + g2 * ((a1 / (1 + np.exp(-a1)) * a3) @ p["w2"])
    return x


def test_block_matches_numpy_reference_with_tokenwise_modulation():
    d, heads, grid, b = 64, 4, 4, 2
    block = DDTBlock(d, heads, rngs=nnx.Rngs(0))
    randomize(block, 1, scale=0.1)  # O(1) activations: the comparison is about the maths, not fp32 cancellation
    f = lambda m: np.asarray(m[...], np.float64)  # noqa: E731
    p = dict(norm1=f(block.norm1.weight), norm2=f(block.norm2.weight), qkv=f(block.attn.qkv.kernel),
             q_norm=f(block.attn.q_norm.weight), k_norm=f(block.attn.k_norm.weight),
             proj_w=f(block.attn.proj.kernel), proj_b=f(block.attn.proj.bias), w1=f(block.mlp.w1.kernel),
             w3=f(block.mlp.w3.kernel), w2=f(block.mlp.w2.kernel),
             ada_w=f(block.adaLN_modulation.layers[0].kernel), ada_b=f(block.adaLN_modulation.layers[0].bias))
    assert block.mlp.w1.kernel.shape == (d, int(2 * 4 * d / 3))  # SwiGLU hidden int(2 * int(4D) / 3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, grid * grid, d))
    for c in (rng.standard_normal((b, grid * grid, d)), rng.standard_normal((b, 1, d))):  # token-wise, shared
        ours = block(jnp.asarray(x, jnp.float32), jnp.asarray(c, jnp.float32),
                     jnp.asarray(rope_2d_angles(d // heads, grid, grid)))
        ref = np_block(p, x, c, heads, grid)
        np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)


def test_patches_are_unfold_order_and_fold_inverts():
    x = np.random.default_rng(0).standard_normal((2, 6, 4, 3)).astype(np.float32)
    tokens = np.asarray(unfold_patches(jnp.asarray(x), 2))
    ref = torch.nn.functional.unfold(torch.from_numpy(x).permute(0, 3, 1, 2), 2, stride=2).transpose(1, 2).numpy()
    np.testing.assert_array_equal(tokens, ref)
    np.testing.assert_array_equal(np.asarray(fold_patches(jnp.asarray(tokens), 2, 6, 4)), x)


# ---------------------------------------------------------------------------------------------- model
def tiny(**kw) -> DDT:
    args = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
                num_encoder_blocks=2, num_classes=10, rngs=nnx.Rngs(0))
    return DDT(**{**args, **kw})


def inputs(b=3, seed=0):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal((b, 8, 8, 4)), jnp.float32), jnp.asarray(r.uniform(0, 1, b), jnp.float32),
            jnp.asarray(r.integers(0, 11, b), jnp.int32))


def test_output_is_zero_at_init_and_encode_then_decode_is_the_forward():
    model = tiny()
    x, t, y = inputs()
    v, s = model(x, t, y)
    assert v.shape == x.shape and s.shape == (3, 16, 32)
    np.testing.assert_array_equal(np.asarray(v), 0.0)  # zero-initialised final layer
    randomize(model, 2)
    v, s = model(x, t, y)
    s2 = model.encode(x, t, y)
    np.testing.assert_array_equal(np.asarray(s2), np.asarray(s))
    np.testing.assert_array_equal(np.asarray(model.decode(x, s2)), np.asarray(v))
    v3, s3 = model(x, jnp.zeros_like(t), jnp.zeros_like(y), s)  # given s, t and y are unused
    np.testing.assert_array_equal(np.asarray(v3), np.asarray(v))
    s_k, h = model.encode(x, t, y, return_block=1)
    np.testing.assert_array_equal(np.asarray(s_k), np.asarray(s))
    assert h.shape == s.shape and not np.allclose(np.asarray(h), np.asarray(s))


@pytest.mark.parametrize("wrap", ["flat", "lightning"])
def test_matches_pytorch_reference_through_load_official_ddt(wrap):
    torch.manual_seed(0)
    ref = TorchDDT()
    with torch.no_grad():
        for prm in ref.parameters():
            prm.copy_(0.2 * torch.randn_like(prm))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    if wrap == "lightning":  # the released layout: EMA and raw copies, REPA projector, other trainer keys
        sd = {"state_dict": {**{f"ema_denoiser.{k}": v for k, v in sd.items()},
                             **{f"denoiser.{k}": 0 * v for k, v in sd.items()},
                             "diffusion_trainer.proj.0.0.weight": np.zeros((3, 3), np.float32)}}
    model = load_official_ddt(tiny(), sd)
    x, t, y = inputs()
    v, s = model(x, t, y)
    with torch.no_grad():
        tv, ts = ref(torch.tensor(np.asarray(x)).permute(0, 3, 1, 2), torch.tensor(np.asarray(t)),
                     torch.tensor(np.asarray(y)).long())
    for ours, theirs in ((np.asarray(v), tv.permute(0, 2, 3, 1).numpy()), (np.asarray(s), ts.numpy())):
        assert np.abs(theirs).max() > 1.0
        rel = np.abs(ours - theirs).max() / np.abs(theirs).max()  # max |ours - ref| / max |ref|, fp32 both
        assert rel < 1e-5, rel


def test_converter_names_every_bad_key():
    ref = TorchDDT()
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    del sd["blocks.0.attn.q_norm.weight"]
    sd["blocks.1.mlp.w1.weight"] = np.zeros((5, 32), np.float32)
    sd["extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_official_ddt(tiny(), sd)
    text = str(e.value)
    assert "blocks.0.attn.q_norm.weight" in text and "blocks.1.mlp.w1.weight" in text and "extra.weight" in text
    with pytest.raises(ValueError, match="ema_denoiser"):
        load_official_ddt(tiny(), {"state_dict": {f"denoiser.{k}": v for k, v in sd.items()}})


def test_ddt_sizes_are_dits_split_into_encoder_and_decoder():
    """DDT's depth, width and heads per size are DiT's (dit_jax.constants.MODEL_SIZES, their one owner); DDT adds
    only the encoder/decoder split: the paper's 8En4De (B), 20En4De (L), 22En6De (XL), and B's split for S."""
    assert list(DDT_SIZES) == list(MODEL_SIZES)
    for size, arch in DDT_SIZES.items():
        assert {k: v for k, v in arch.items() if k != "num_encoder_blocks"} == MODEL_SIZES[size], size
        assert 0 < arch["num_encoder_blocks"] < arch["depth"], size
    assert {s: a["num_encoder_blocks"] for s, a in DDT_SIZES.items()} == {"S": 8, "B": 8, "L": 20, "XL": 22}
    assert decode_ddt_variant("L/2") == dict(depth=24, hidden_size=1024, num_heads=16, num_encoder_blocks=20,
                                             patch_size=2)


def test_sizes_init_and_single_stream_baseline():
    abstract = nnx.eval_shape(lambda: DDT_models["DDT-XL/2"](rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == 674_646_352  # DDT-XL/2 (22 encoder + 6 decoder blocks) as MCG-NJU/DDT builds it
    assert abstract.num_encoder_blocks == 22 and abstract.depth == 28
    model = tiny()
    gates = np.asarray(model.blocks[0].adaLN_modulation.layers[0].kernel[...])
    assert np.abs(gates).max() > 0  # block modulations keep torch's default init (not adaLN-Zero)
    assert np.abs(gates).max() <= 1 / np.sqrt(32) + 1e-7
    base = ImprovedDiT_models["ImprovedDiT-S/2"](input_size=8, num_classes=10, rngs=nnx.Rngs(0))
    assert base.num_encoder_blocks == 0 and not hasattr(base, "s_embedder")
    randomize(base, 3)
    v, s = base(*inputs())
    assert v.shape == (3, 8, 8, 4) and s is None and np.abs(np.asarray(v)).max() > 0
    with pytest.raises(ValueError, match="no condition encoder"):
        base.encode(*inputs())


def test_label_dropout_and_input_errors():
    model = tiny(class_dropout_prob=0.5)
    randomize(model, 4)
    x, t, y = inputs(b=8)
    v_drop, _ = model(x, t, y, train=True, rng=jax.random.key(0))
    v_null, _ = model(x, t, jnp.full_like(y, 10))
    v_cond, _ = model(x, t, y)
    dropped = [np.allclose(a, b, atol=1e-6) for a, b in zip(np.asarray(v_drop), np.asarray(v_null))]
    kept = [np.allclose(a, b, atol=1e-6) for a, b in zip(np.asarray(v_drop), np.asarray(v_cond))]
    assert any(dropped) and any(kept) and all(d or k for d, k in zip(dropped, kept))
    with pytest.raises(ValueError, match="NHWC"):
        model(x[0], t, y)
    with pytest.raises(ValueError, match="labels out of range"):
        model(x, t, y.at[0].set(11))
    with pytest.raises(ValueError, match="s has shape"):
        model.decode(x, jnp.zeros((8, 4, 32)))
