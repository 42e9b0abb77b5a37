"""Parity with diffusers' DiTTransformer2DModel (PyTorch, fp32, CPU): the project's key acceptance test.

Every diffusers parameter is random (including those the official init zeroes: adaLN, final layer), the
weights go through dit_jax.convert.load_diffusers_dit, and both models run on the same inputs.

diffusers' DiT differs from the official DiT in two places, both handled explicitly here:
  * its Timesteps use downscale_freq_shift=1 (exponent / (half - 1)); the official divides by half. We patch
    diffusers to the official formula (time_proj.downscale_freq_shift = 0 in every block) for the main
    comparison, and test separately that our timestep_freq_shift=1 reproduces unpatched diffusers.
  * its MLP pre-norm uses config.norm_eps (default 1e-5); the official uses 1e-6, so we build it with 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel  # noqa: E402
from diffusers.models.embeddings import Timesteps  # noqa: E402

from dit_jax.convert import load_diffusers_dit  # noqa: E402
from dit_jax.models import DiT  # noqa: E402



@pytest.fixture(autouse=True, scope="module")
def torch_fp32_deterministic():
    """fp32, deterministic kernels, no autograd on CPU for the reference; restored afterwards."""
    prev = torch.get_default_dtype(), torch.are_deterministic_algorithms_enabled()
    torch.set_default_dtype(torch.float32)
    torch.use_deterministic_algorithms(True)
    with torch.no_grad():
        yield
    torch.set_default_dtype(prev[0])
    torch.use_deterministic_algorithms(prev[1])

TINY = dict(depth=2, hidden=64, heads=4, patch=2, sample=8, classes=10)
S2 = dict(depth=12, hidden=384, heads=6, patch=2, sample=32, classes=1000)


# ----------------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def make_diffusers(depth, hidden, heads, patch, sample, classes, seed=0, patch_timesteps=True):
    """A random diffusers DiT (fp32, eval) whose every parameter is noise, embedder copies shared."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=4,
        out_channels=8,
        num_layers=depth,
        sample_size=sample,
        patch_size=patch,
        num_embeds_ada_norm=classes,
        norm_eps=1e-6,  # the official DiT's LayerNorm eps (diffusers' default is 1e-5)
    ).eval().float()
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if name.endswith("embedding_table.weight"):
            std = 1.0  # class embeddings O(1), like the timestep embedding they are added to
        elif p.ndim >= 2:
            std = 1.0 / np.sqrt(np.prod(p.shape[1:]))  # unit-variance activations
        else:
            std = 0.1  # biases
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    # diffusers keeps one copy of the shared t/y embedders per block; a real (converted) checkpoint has equal
    # copies, so give all blocks block 0's.
    emb0 = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0.state_dict())
    if patch_timesteps:
        set_freq_shift(model, 0)
    return model


def set_freq_shift(model, shift):
    """Switch diffusers' timestep frequencies: 1 = diffusers' DiT, 0 = the official DiT formula."""
    for block in model.transformer_blocks:
        tp = block.norm1.emb.time_proj
        assert isinstance(tp, Timesteps) and hasattr(tp, "downscale_freq_shift")
        tp.downscale_freq_shift = shift


def ours_from(torch_model, depth, hidden, heads, patch, sample, classes, **kw) -> DiT:
    """Our DiT with the diffusers model's weights. Built abstractly (nnx.eval_shape, no random init):
    load_diffusers_dit makes it concrete."""
    model = nnx.eval_shape(
        lambda: DiT(
            input_size=sample,
            patch_size=patch,
            in_channels=4,
            hidden_size=hidden,
            depth=depth,
            num_heads=heads,
            num_classes=classes,
            learn_sigma=True,
            rngs=nnx.Rngs(0),
            **kw,
        )
    )
    sd = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}
    return load_diffusers_dit(model, sd)


@nnx.jit
def ours_forward(model, x, t, y):
    return model(x, t, y)


@nnx.jit(static_argnums=(5,))
def ours_cfg(model, x, t, y, scale, channels):
    return model.forward_with_cfg(x, t, y, scale, channels)


def make_inputs(sample, classes, seed=0):
    """x NCHW, 6 timesteps (integer, fractional, the ends 0 and 999) and labels including the null class."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((6, 4, sample, sample)).astype(np.float32)
    t = np.array([0, 1, 500, 999, 0.5, 250.25], np.float32)
    y = np.array([0, classes - 1, classes, 3, classes, 1], np.int64)
    return x, t, y


def torch_forward(model, x, t, y):
    out = model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample
    return out.numpy()


def official_cfg(model_out, cfg_scale, channels):
    """The guidance step of facebookresearch/DiT models.py DiT.forward_with_cfg, given the model output of the
    duplicated batch [half | half] (NCHW torch tensor); guidance on the first `channels` channels."""
    eps, rest = model_out[:, :channels], model_out[:, channels:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    eps = torch.cat([half_eps, half_eps], dim=0)
    return torch.cat([eps, rest], dim=1)


def nhwc(x):
    return jnp.asarray(np.transpose(x, (0, 2, 3, 1)))


def to_nchw(y):
    return np.transpose(np.asarray(y), (0, 3, 1, 2))


def rel_err(ours, ref):
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


# ----------------------------------------------------------------------------------------------------------
# Forward and CFG parity.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,cfg,tol", [("tiny", TINY, 1e-5), ("S/2", S2, 1e-4)], ids=["tiny", "S2"])
def test_forward_and_cfg_match_diffusers(name, cfg, tol):
    torch_model = make_diffusers(**cfg)
    ours = ours_from(torch_model, **cfg)
    x, t, y = make_inputs(cfg["sample"], cfg["classes"])

    ref = torch_forward(torch_model, x, t, y)
    out = to_nchw(ours_forward(ours, nhwc(x), jnp.asarray(t), jnp.asarray(y, jnp.int32)))
    assert out.shape == ref.shape == (6, 8, cfg["sample"], cfg["sample"])
    # The test means something only if the output is far from zero and depends on t, y and position.
    assert np.max(np.abs(ref)) > 0.1 and np.std(ref) > 0.05
    err = rel_err(out, ref)
    print(f"{name} forward: max|out| {np.max(np.abs(ref)):.3g}, relative error {err:.2e}")
    assert err <= tol

    # CFG batch: [conditional | unconditional], the second half holds the null class. The official
    # forward_with_cfg uses only the first half of x, duplicated.
    n = cfg["classes"]
    x_cfg = x[:4]
    y_cfg = np.array([y[0], y[1], n, n])
    t_cfg = np.array([t[3], t[5], t[3], t[5]])
    model_out = torch.from_numpy(torch_forward(torch_model, np.concatenate([x_cfg[:2], x_cfg[:2]]), t_cfg, y_cfg))
    for channels, ours_channels in ((3, 3), (4, None)):
        ref_cfg = official_cfg(model_out, 4.0, channels).numpy()
        out_cfg = to_nchw(
            ours_cfg(ours, nhwc(x_cfg), jnp.asarray(t_cfg), jnp.asarray(y_cfg, jnp.int32), 4.0, ours_channels)
        )
        err = rel_err(out_cfg, ref_cfg)
        print(f"{name} forward_with_cfg (channels {channels}): relative error {err:.2e}")
        assert err <= tol
        # guidance was really applied, and only to the chosen channels
        assert np.max(np.abs(ref_cfg[:, :channels] - model_out.numpy()[:, :channels])) > 1e-2
        np.testing.assert_array_equal(ref_cfg[:, channels:], model_out.numpy()[:, channels:])


def test_scan_blocks_model_matches_diffusers():
    torch_model = make_diffusers(**TINY, seed=3)
    ours = ours_from(torch_model, **TINY, scan_blocks=True)
    x, t, y = make_inputs(TINY["sample"], TINY["classes"], seed=3)
    ref = torch_forward(torch_model, x, t, y)
    out = to_nchw(ours_forward(ours, nhwc(x), jnp.asarray(t), jnp.asarray(y, jnp.int32)))
    assert rel_err(out, ref) <= 1e-5


def test_position_table_matches_diffusers_patch_embed():
    """diffusers' PatchEmbed computes its own (non-persistent) sin-cos table: it must equal ours."""
    torch_model = make_diffusers(**TINY)
    ours = ours_from(torch_model, **TINY)
    assert "pos_embed.pos_embed" not in torch_model.state_dict()
    theirs = torch_model.pos_embed.pos_embed.numpy()
    np.testing.assert_allclose(np.asarray(ours.pos_embed[...]), theirs, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# The timestep-frequency difference.
# ----------------------------------------------------------------------------------------------------------
def test_timestep_freq_shift_is_the_only_difference():
    """Unpatched diffusers (downscale_freq_shift=1) = our model with timestep_freq_shift=1; with our default
    (official, shift 0) the two disagree, and only through the timestep embedding."""
    torch_model = make_diffusers(**TINY, seed=5, patch_timesteps=False)
    assert torch_model.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 1
    x, t, y = make_inputs(TINY["sample"], TINY["classes"], seed=5)
    ref = torch_forward(torch_model, x, t, y)
    args = (nhwc(x), jnp.asarray(t), jnp.asarray(y, jnp.int32))

    shifted = ours_from(torch_model, **TINY, timestep_freq_shift=1)
    assert rel_err(to_nchw(ours_forward(shifted, *args)), ref) <= 1e-5

    official = ours_from(torch_model, **TINY)  # default timestep_freq_shift=0
    assert rel_err(to_nchw(ours_forward(official, *args)), ref) > 1e-3

    # the embedders themselves: diffusers' time_proj + timestep_embedder against our t_embedder
    emb = torch_model.transformer_blocks[0].norm1.emb
    tt = torch.from_numpy(t)
    theirs_1 = emb.timestep_embedder(emb.time_proj(tt)).numpy()
    np.testing.assert_allclose(np.asarray(shifted.t_embedder(jnp.asarray(t))), theirs_1, atol=2e-5, rtol=1e-5)
    set_freq_shift(torch_model, 0)
    theirs_0 = emb.timestep_embedder(emb.time_proj(tt)).numpy()
    np.testing.assert_allclose(np.asarray(official.t_embedder(jnp.asarray(t))), theirs_0, atol=2e-5, rtol=1e-5)
    # t = 0 is the one timestep both formulas agree on
    np.testing.assert_allclose(theirs_0[0], theirs_1[0], atol=1e-6)
    assert np.max(np.abs(theirs_0[1:] - theirs_1[1:])) > 1e-3
