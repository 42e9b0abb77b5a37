"""The SD VAE (dit_jax.models.vae) against diffusers' AutoencoderKL (PyTorch, fp32, eval) at random weights.

Every diffusers parameter is randomised (weights and biases N(0, 0.03), GroupNorm scales 1 + N(0, 0.1)) so
that no zero-initialised or identity parameter hides a transposition or naming error, the weights go through
dit_jax.convert.diffusers_vae, and both models run on the same inputs: posterior mean and logvar of encode,
and decode(z), must agree to 1e-4 (max abs, fp32).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers import AutoencoderKL as TorchAutoencoderKL  # noqa: E402

from dit_jax.convert.common import CheckpointMismatchError  # noqa: E402
from dit_jax.convert.diffusers_vae import (  # noqa: E402
    load_diffusers_vae,
    load_diffusers_vae_folder,
    vae_kwargs_from_diffusers_config,
)
from dit_jax.models.vae import SD_VAE_SCALE, AutoencoderKL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
FULL = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)


@pytest.fixture(autouse=True, scope="module")
def torch_fp32_no_grad():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        yield
    torch.set_default_dtype(prev)


def torch_vae(cfg: dict, seed: int = 0) -> TorchAutoencoderKL:
    """A diffusers AutoencoderKL (SD block types) with every parameter randomised, in eval mode."""
    n = len(cfg["block_out_channels"])
    torch.manual_seed(seed)
    vae = TorchAutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        **cfg,
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in vae.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        is_norm_scale = name.endswith(".weight") and p.ndim == 1
        p.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.03 * noise)
    return vae


def jax_vae(tvae: TorchAutoencoderKL, cfg: dict) -> AutoencoderKL:
    model = nnx.eval_shape(lambda: AutoencoderKL(**cfg, rngs=nnx.Rngs(0)))
    return load_diffusers_vae(model, tvae.state_dict())


def run_both(tvae: TorchAutoencoderKL, model: AutoencoderKL, size: int, batch: int = 2, seed: int = 0):
    """Max abs differences (mean, logvar, decode) and the reference magnitudes."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    f = 2 ** (len(tvae.config.block_out_channels) - 1)
    z = rng.normal(size=(batch, size // f, size // f, 4)).astype(np.float32)

    post = tvae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    t_mean = post.mean.permute(0, 2, 3, 1).numpy()
    t_logvar = post.logvar.permute(0, 2, 3, 1).numpy()
    t_dec = tvae.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()

    mean, logvar = nnx.jit(lambda m, x: m.encode(x))(model, jnp.asarray(x))
    dec = nnx.jit(lambda m, z: m.decode(z))(model, jnp.asarray(z))
    assert mean.shape == t_mean.shape and logvar.shape == t_logvar.shape and dec.shape == t_dec.shape
    diffs = {
        "mean": float(np.max(np.abs(np.asarray(mean) - t_mean))),
        "logvar": float(np.max(np.abs(np.asarray(logvar) - t_logvar))),
        "decode": float(np.max(np.abs(np.asarray(dec) - t_dec))),
    }
    scales = {"mean": np.abs(t_mean).max(), "logvar": np.abs(t_logvar).max(), "decode": np.abs(t_dec).max()}
    return diffs, scales


@pytest.fixture(scope="module")
def small():
    tvae = torch_vae(SMALL)
    return tvae, jax_vae(tvae, SMALL)


def test_shapes_and_param_count():
    model = nnx.eval_shape(lambda: AutoencoderKL(rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == 83_653_863  # diffusers AutoencoderKL with the SD config
    assert SD_VAE_SCALE == 0.18215
    m = nnx.eval_shape(lambda: AutoencoderKL(**SMALL, rngs=nnx.Rngs(0)))
    mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), m, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
    assert mean.shape == logvar.shape == (1, 8, 8, 4)
    assert nnx.eval_shape(lambda m, z: m.decode(z), m, mean).shape == (1, 16, 16, 3)


def test_parity_small(small):
    tvae, model = small
    diffs, scales = run_both(tvae, model, size=32)
    print("small parity", diffs, "reference magnitudes", scales)
    assert all(s > 0.05 for s in scales.values()), scales  # activations are not degenerate
    assert all(d < ATOL for d in diffs.values()), diffs


def test_parity_full_sd_config():
    tvae = torch_vae(FULL, seed=1)
    model = jax_vae(tvae, FULL)
    diffs, scales = run_both(tvae, model, size=64, batch=1, seed=1)
    print("full parity", diffs, "reference magnitudes", scales)
    assert all(s > 0.05 for s in scales.values()), scales
    assert all(d < ATOL for d in diffs.values()), diffs


def _legacy(sd: dict, conv_shaped: bool) -> dict:
    out = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for k, v in sd.items():
        for new, old in names.items():
            marker = f".attentions.0.{new}."
            if marker in k:
                k = k.replace(marker, f".attentions.0.{old}.")
                if conv_shaped and k.endswith(".weight"):
                    v = v[:, :, None, None]
                break
        out[k] = v
    return out


@pytest.mark.parametrize("conv_shaped", [False, True])
def test_legacy_attention_names(small, conv_shaped):
    tvae, model = small
    sd = {k: v.numpy() for k, v in tvae.state_dict().items()}
    legacy = _legacy(sd, conv_shaped)
    assert any(".proj_attn." in k for k in legacy) and not any(".to_q." in k for k in legacy)
    other = load_diffusers_vae(nnx.eval_shape(lambda: AutoencoderKL(**SMALL, rngs=nnx.Rngs(0))), legacy)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(other))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(other(x)))


def test_mismatch_lists_every_key(small):
    tvae, _ = small
    sd = {k: v.numpy() for k, v in tvae.state_dict().items()}
    del sd["encoder.conv_in.weight"]
    del sd["decoder.mid_block.attentions.0.to_k.bias"]
    sd["encoder.extra.weight"] = np.zeros(3, np.float32)
    sd["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    model = nnx.eval_shape(lambda: AutoencoderKL(**SMALL, rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointMismatchError) as e:
        load_diffusers_vae(model, sd)
    msg = str(e.value)
    for k in ("encoder.conv_in.weight", "decoder.mid_block.attentions.0.to_k.bias", "encoder.extra.weight"):
        assert k in msg
    assert "quant_conv.weight: expected (8, 8, 1, 1), got (8, 8, 3, 3)" in msg
    assert "2 missing, 1 unexpected, 1 mis-shaped" in msg
    # Another configuration: the report starts with a hint naming the differing config fields.
    sd = {k: v.numpy() for k, v in tvae.state_dict().items()}
    bigger = nnx.eval_shape(lambda: AutoencoderKL(block_out_channels=(32, 64, 64), layers_per_block=2,
                                                  norm_num_groups=8, rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointMismatchError) as e:
        load_diffusers_vae(bigger, sd)
    hint = str(e.value).splitlines()[1]
    assert "block_out_channels (32, 64) (model: (32, 64, 64))" in hint and "layers_per_block 1 (model: 2)" in hint


def test_unsupported_config():
    base = dict(_class_name="AutoencoderKL", block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8)
    assert vae_kwargs_from_diffusers_config(base)["block_out_channels"] == (32, 64)
    bad = dict(base, down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"], use_quant_conv=False)
    with pytest.raises(ValueError, match="AttnDownEncoderBlock2D") as e:
        vae_kwargs_from_diffusers_config(bad)
    assert "use_quant_conv" in str(e.value)


def test_folder_load_numpy_only(small, tmp_path):
    tvae, _ = small
    tvae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    x = np.random.default_rng(3).uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ref = tvae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist.mean.permute(0, 2, 3, 1).numpy()
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any torch import now fails
        import numpy as np
        import jax
        jax.config.update("jax_default_matmul_precision", "highest")
        from dit_jax.convert.diffusers_vae import load_diffusers_vae_folder
        vae = load_diffusers_vae_folder({str(tmp_path)!r})  # a pipeline-style folder: finds vae/
        mean, logvar = vae.encode(np.load({str(tmp_path / 'x.npy')!r}))
        np.save({str(tmp_path / 'mean.npy')!r}, np.asarray(mean))
        print(vae.block_out_channels, vae.scaling_factor)
        """
    )
    env = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(32, 64) 0.18215" in proc.stdout
    np.testing.assert_allclose(np.load(tmp_path / "mean.npy"), ref, atol=ATOL, rtol=0)


def test_bf16_compute(small):
    """dtype=bfloat16: fp32 params and moments, bf16 decode output, close to the fp32 model."""
    tvae, model = small
    m16 = load_diffusers_vae(nnx.eval_shape(lambda: AutoencoderKL(**SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))),
                             tvae.state_dict())
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
    enc = nnx.jit(lambda m, x: m.encode(x))
    (mean, logvar), (mean16, logvar16) = enc(model, x), enc(m16, x)
    assert mean16.dtype == logvar16.dtype == jnp.float32
    dec16 = nnx.jit(lambda m, z: m.decode(z))(m16, mean)
    assert dec16.dtype == jnp.bfloat16
    dec = nnx.jit(lambda m, z: m.decode(z))(model, mean)
    np.testing.assert_allclose(np.asarray(mean16), np.asarray(mean), atol=0.05)
    np.testing.assert_allclose(np.asarray(dec16, np.float32), np.asarray(dec), atol=0.1)
