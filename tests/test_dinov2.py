"""The DINOv2 REPA target encoder (dit_jax.models.dinov2) and its loader (dit_jax.convert.dinov2).

Parity: random weights in the official dinov2 layout are torch.save'd, read back by load_dinov2_file (architecture
inferred from the shapes) and must reproduce an independent PyTorch transcription (tests/dinov2_torch.py) of the
DINOv2 ViT and of DDT's REPA wrapper (Normalize -> bicubic 224/256 resize -> timm resample_abs_pos_embed ->
x_norm_patchtokens) on 256 and 128 px images, with pretraining grids 37 (resampled down) and 8 (resampled up, and
used as it is at 128 px). The bicubic resize matrices are checked against torch.nn.functional.interpolate.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from dinov2_torch import (  # noqa: E402
    DDTDINOv2,
    build_reference,
    random_dinov2_state_dict,
    resample_abs_pos_embed as resample_torch,
    to_nchw,
)

from dit_jax.convert.common import CheckpointMismatchError, CheckpointReadError  # noqa: E402
from dit_jax.convert.dinov2 import infer_dinov2_arch, load_dinov2, load_dinov2_file  # noqa: E402
from dit_jax.models.dinov2 import (  # noqa: E402
    DinoViT,
    TargetEncoder,
    bicubic_matrix,
    dinov2_vitb14,
    random_target_encoder,
    resample_abs_pos_embed,
    resize_bicubic,
)

ATOL = 1e-4  # features are O(1) after the final LayerNorm; measured errors are ~1e-6
DEPTH, DIM, HEADS, PATCH = 2, 64, 2, 14  # heads = 64 // 64 = 1 is what the loader infers; HEADS overrides it


# ----------------------------------------------------------------------------------------------------------
# Bicubic resizing.
# ----------------------------------------------------------------------------------------------------------
RESIZES = [
    ((8, 8), (16, 16)),  # pos grid up
    ((37, 37), (16, 16)),  # pos grid down (518 -> 224 px)
    ((37, 37), (8, 8)),
    ((256, 256), (224, 224)),  # DDT's image resize
    ((128, 96), (112, 84)),
    ((5, 7), (13, 3)),  # up on one axis, down on the other
    ((37, 37), (50, 23)),
    ((10, 10), (3, 3)),  # strong downsampling (antialias support 2 * 10/3)
    ((1, 4), (3, 2)),
    ((6, 6), (6, 6)),  # identity
]


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("src,dst", RESIZES, ids=[f"{a[0]}x{a[1]}-{b[0]}x{b[1]}" for a, b in RESIZES])
def test_resize_matches_torch(src, dst, antialias):
    x = np.random.default_rng(0).standard_normal((2, *src, 3)).astype(np.float32)
    want = F.interpolate(to_nchw(x), size=dst, mode="bicubic", align_corners=False, antialias=antialias)
    got = np.asarray(resize_bicubic(x, dst, antialias=antialias))
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("antialias", [False, True], ids=["plain", "antialias"])
@pytest.mark.parametrize("n_in,n_out", [(37, 50), (37, 16), (8, 16), (256, 224), (301, 100), (100, 301)])
def test_resize_matrix_matches_torch_weights(n_in, n_out, antialias):
    # Resizing the identity gives torch's weight matrix column by column.
    eye = torch.eye(n_in).reshape(n_in, 1, n_in, 1).expand(n_in, 1, n_in, 2).contiguous()
    want = F.interpolate(eye, size=(n_out, 2), mode="bicubic", align_corners=False, antialias=antialias)
    want = want[:, 0, :, 0].T.numpy()
    got = bicubic_matrix(n_in, n_out, antialias)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-12)


def test_resize_kernels_differ():
    # Guard against testing a kernel against itself: the two modes (and jax.image.resize) disagree on downsampling.
    plain, aa = bicubic_matrix(37, 16, False), bicubic_matrix(37, 16, True)
    assert np.abs(plain - aa).max() > 1e-2
    x = np.random.default_rng(1).standard_normal((1, 37, 37, 1)).astype(np.float32)
    jx = np.asarray(jax.image.resize(x, (1, 16, 16, 1), "bicubic"))
    assert np.abs(jx - np.asarray(resize_bicubic(x, (16, 16)))).max() > 1e-3


@pytest.mark.parametrize("new", [(16, 16), (8, 8), (37, 37), (12, 20)])
def test_resample_pos_embed_matches_timm(new):
    pos = np.random.default_rng(2).standard_normal((1, 1 + 37 * 37, 16)).astype(np.float32)
    want = resample_torch(torch.from_numpy(pos), list(new)).numpy()
    got = np.asarray(resample_abs_pos_embed(jnp.asarray(pos), new))
    assert got.shape == (1, 1 + new[0] * new[1], 16)
    np.testing.assert_array_equal(got[:, 0], pos[:, 0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Model parity against the torch transcription.
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[37, 8], ids=["grid37", "grid8"])
def pair(request, tmp_path_factory):
    """(our DinoViT loaded from a .pth, the torch reference with the same weights, the grid)."""
    grid = request.param
    sd = random_dinov2_state_dict(DEPTH, DIM, PATCH, grid, seed=grid)
    path = tmp_path_factory.mktemp("dinov2") / f"dinov2_grid{grid}.pth"
    torch.save(sd, path)
    ours = load_dinov2_file(path, num_heads=HEADS)
    ref = build_reference(sd, DEPTH, DIM, HEADS, PATCH, grid)
    return ours, ref, grid


def _images(size: tuple[int, int], seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 1.0, (batch, *size, 3)).astype(np.float32)


def test_loader_infers_architecture(pair):
    ours, _, grid = pair
    assert (ours.depth, ours.width, ours.num_heads, ours.patch_size, ours.pos_grid) == (DEPTH, DIM, HEADS, PATCH, grid)
    assert ours.pos_embed[...].shape == (1, 1 + grid * grid, DIM)
    assert isinstance(ours, TargetEncoder)


@pytest.mark.parametrize("side", [224, 112])
def test_forward_features_match(pair, side):
    ours, ref, grid = pair
    x = np.random.default_rng(side).standard_normal((2, side, side, 3)).astype(np.float32)
    n = side // PATCH
    with torch.no_grad():  # as the DDT wrapper: the table resampled by timm, then forward_features
        want = ref.forward_features(to_nchw(x), pos_embed=resample_torch(ref.pos_embed.data, [n, n]))
    got = jax.jit(lambda m, v: m.forward_features(v))(ours, jnp.asarray(x))
    for key in ("x_norm_patchtokens", "x_norm_clstoken"):
        w = want[key].numpy()
        g = np.asarray(got[key])
        assert g.shape == w.shape
        err = np.abs(g - w).max()
        print(f"grid {grid} side {side} {key}: max abs err {err:.2e}")
        assert err <= ATOL


@pytest.mark.parametrize("size", [(256, 256), (128, 128), (128, 192)], ids=["256", "128", "128x192"])
def test_repa_features_match_ddt_wrapper(pair, size):
    ours, ref, grid = pair
    images = _images(size, seed=size[0] + size[1])
    wrapper = DDTDINOv2(build_reference({k: v.clone() for k, v in ref.state_dict().items()},
                                        DEPTH, DIM, HEADS, PATCH, grid))
    want = wrapper(to_nchw(images)).numpy()
    got = np.asarray(nnx.jit(lambda m, v: m.repa_features(v))(ours, jnp.asarray(images)))
    assert got.shape == (2, ours.num_tokens(size), DIM) == want.shape
    err = np.abs(got - want).max()
    print(f"grid {grid} images {size}: repa_features max abs err {err:.2e}")
    assert err <= ATOL
    # the preprocessing alone, against the wrapper's
    pre = np.asarray(ours.preprocess(jnp.asarray(images)))
    np.testing.assert_allclose(pre, wrapper.preprocess(to_nchw(images)).permute(0, 2, 3, 1).numpy(), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Loader errors and architecture.
# ----------------------------------------------------------------------------------------------------------
def _small_model(grid: int = 8) -> DinoViT:
    return nnx.eval_shape(lambda: DinoViT(depth=DEPTH, width=DIM, num_heads=HEADS, patch_size=PATCH, pos_grid=grid,
                                          rngs=nnx.Rngs(0)))


def test_load_reports_every_bad_key():
    sd = {k: v.numpy() for k, v in random_dinov2_state_dict(DEPTH, DIM, PATCH, 8).items()}
    del sd["blocks.1.ls2.gamma"]
    sd["register_tokens"] = np.zeros((1, 4, DIM), np.float32)
    sd["blocks.0.attn.qkv.weight"] = np.zeros((DIM, DIM), np.float32)
    with pytest.raises(ValueError) as info:
        load_dinov2(_small_model(), sd)
    err = info.value
    assert isinstance(err, CheckpointMismatchError)
    assert err.missing == ["blocks.1.ls2.gamma"]
    assert err.unexpected == ["register_tokens"]
    assert err.mismatched == [("blocks.0.attn.qkv.weight", (3 * DIM, DIM), (DIM, DIM))]
    text = str(err)
    for key in ("blocks.1.ls2.gamma", "register_tokens", "blocks.0.attn.qkv.weight", "with registers"):
        assert key in text


def test_load_wrong_grid_hints_architecture():
    sd = {k: v.numpy() for k, v in random_dinov2_state_dict(DEPTH, DIM, PATCH, 37).items()}
    shapes = r"pos_embed: expected \(1, 65, 64\), got \(1, 1370, 64\)"
    with pytest.raises(CheckpointMismatchError, match=shapes) as info:
        load_dinov2(_small_model(grid=8), sd)
    assert "pos_grid 37 (model: 8)" in str(info.value)


def test_load_leaves_model_untouched_on_error():
    model = random_target_encoder(depth=DEPTH, width=DIM, heads=HEADS, pos_grid=8)
    before = np.asarray(model.pos_embed[...]).copy()
    sd = {k: v.numpy() for k, v in random_dinov2_state_dict(DEPTH, DIM, PATCH, 8).items()}
    del sd["norm.bias"]
    with pytest.raises(CheckpointMismatchError, match="norm.bias"):
        load_dinov2(model, sd)
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), before)


def test_load_file_errors(tmp_path):
    with pytest.raises(CheckpointReadError, match="no such file"):
        load_dinov2_file(tmp_path / "absent.pth")
    path = tmp_path / "not_dino.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="cannot tell"):
        load_dinov2_file(path)


def test_load_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = random_dinov2_state_dict(1, DIM, 7, 4)
    path = tmp_path / "dino.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = load_dinov2_file(path)
    assert (model.depth, model.width, model.num_heads, model.patch_size, model.pos_grid) == (1, DIM, 1, 7, 4)
    np.testing.assert_array_equal(np.asarray(model.blocks[0].attn.qkv.kernel[...]),
                                  sd["blocks.0.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(model.patch_embed.proj.kernel[...]),
                                  sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))


def test_vitb14_layout():
    model = nnx.eval_shape(lambda: dinov2_vitb14())
    from dit_jax.convert.dinov2 import expected_dinov2_keys

    keys = expected_dinov2_keys(model)
    assert keys["patch_embed.proj.weight"] == (768, 3, 14, 14)
    assert keys["pos_embed"] == (1, 1 + 37 * 37, 768)
    assert keys["cls_token"] == (1, 1, 768) and keys["mask_token"] == (1, 768)
    assert keys["blocks.11.ls2.gamma"] == (768,) and "blocks.12.norm1.weight" not in keys
    assert sum(int(np.prod(s)) for s in keys.values()) == 86_580_480  # dinov2_vitb14: 86.6 M parameters
    assert len(keys) == 5 + 12 * 14 + 2  # cls, pos, mask, patch conv w/b; 14 per block; final norm
    assert infer_dinov2_arch({k: np.empty(s, np.float32) for k, s in keys.items()}) == dict(
        depth=12, in_channels=3, patch_size=14, width=768, num_heads=12, pos_grid=37, mlp_ratio=4.0)
    assert model.num_tokens((256, 256)) == 256 and model.num_tokens((512, 512)) == 1024


# ----------------------------------------------------------------------------------------------------------
# The random target encoder for REPA tests.
# ----------------------------------------------------------------------------------------------------------
def test_random_target_encoder_jit_and_no_grad():
    enc = random_target_encoder(depth=2, width=32, heads=2, patch=7, seed=0)
    assert isinstance(enc, TargetEncoder) and enc.feature_dim == 32
    images = jnp.asarray(_images((64, 64), seed=3))
    n = enc.num_tokens((64, 64))
    assert n == (56 // 7) ** 2
    closed = jax.jit(lambda x: enc(x))(images)  # parameters baked in as constants
    graphdef, state = nnx.split(enc)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, images)  # parameters as arguments
    assert jitted.shape == (2, n, 32)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(closed), atol=1e-5)
    assert np.isfinite(np.asarray(jitted)).all() and float(jnp.std(jitted)) > 0.1

    # The encoder is frozen by its caller: wrapped in stop_gradient no gradient reaches its parameters (nor the
    # images through it); without the wrap they would get one.
    def loss(s, x, stop):
        feats = nnx.merge(graphdef, s)(x)
        feats = jax.lax.stop_gradient(feats) if stop else feats
        return jnp.sum(feats * jnp.cos(feats))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    g_state, g_images = grad(state, images, True)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g_state))
    assert float(jnp.abs(g_images).max()) == 0.0
    g_state, _ = grad(state, images, False)
    assert max(float(jnp.abs(v).max()) for v in jax.tree.leaves(g_state)) > 0.0


def test_random_target_encoder_default_sizes():
    enc = random_target_encoder()
    out = jax.jit(lambda x: enc(x))(jnp.asarray(_images((256, 256), seed=4, batch=1)))
    assert out.shape == (1, 256, 32)
    # non-multiple encoder sizes are refused, as the official PatchEmbed does
    with pytest.raises(ValueError, match="multiple of the patch size"):
        enc.forward_features(jnp.zeros((1, 20, 28, 3)))
