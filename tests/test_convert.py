"""Weight conversion: the official layout (checked against a compact PyTorch re-statement of the official
models.py), the diffusers layout and folder reader, safe .pt reading, error reports, and `dit-jax convert`."""

from __future__ import annotations

import argparse
import json
import math
import os
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
from torch import nn  # noqa: E402

from dit_jax.convert import (  # noqa: E402
    CheckpointMismatchError,
    CheckpointReadError,
    EmbedderCopiesDisagreeError,
    dit_kwargs_from_diffusers_config,
    load_converted,
    load_diffusers_dit,
    load_diffusers_dit_folder,
    load_official_dit,
    model_to_numpy,
    read_pt,
    read_safetensors,
    read_state_dict,
    read_train_args,
)
from dit_jax.convert import folder as convert_folder  # noqa: E402
from official_dit_torch import OfficialDiT, numpy_sd, official_sincos_2d, randomize_torch  # noqa: E402
from dit_jax.models import DiT, DiT_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(autouse=True, scope="module")
def torch_inference_mode():
    with torch.no_grad():
        yield


def tiny_model(abstract: bool = True, **kw) -> DiT:
    cfg = dict(TINY, **kw)
    if abstract:
        return nnx.eval_shape(lambda: DiT(**cfg, rngs=nnx.Rngs(0)))
    return DiT(**cfg, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, x, t, y):
    return model(x, t, y)


@nnx.jit
def forward_cfg3(model, x, t, y):
    return model.forward_with_cfg(x, t, y, 4.0, 3)


def inputs(n=6, size=8, classes=10, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4, size, size)).astype(np.float32)
    t = np.array([0, 1, 500, 999, 0.5, 250.25], np.float32)[:n]
    y = np.array([0, classes - 1, classes, 3, classes, 1], np.int64)[:n]
    return x, t, y


def run_ours(model, x, t, y, fn=forward):
    out = fn(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(y, jnp.int32))
    return np.asarray(out).transpose(0, 3, 1, 2)


def rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def official_torch():
    torch.manual_seed(0)
    return randomize_torch(OfficialDiT(), seed=1)


# ----------------------------------------------------------------------------------------------------------
# Official layout.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan_blocks,abstract", [(False, False), (True, False), (True, True)])
def test_official_state_dict_gives_official_outputs(official_torch, scan_blocks, abstract):
    model = tiny_model(abstract=abstract, scan_blocks=scan_blocks)
    assert load_official_dit(model, numpy_sd(official_torch)) is model
    x, t, y = inputs()
    ref = official_torch(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    assert np.max(np.abs(ref)) > 0.1
    assert rel_err(run_ours(model, x, t, y), ref) <= 1e-5
    # forward_with_cfg: [cond | null] labels, guidance on the first 3 channels as the release does
    yc = np.array([1, 7, 10, 10])
    tc = np.array([999.0, 3.0, 999.0, 3.0], np.float32)
    ref_cfg = official_torch.forward_with_cfg(torch.from_numpy(x[:4]), torch.from_numpy(tc), torch.from_numpy(yc), 4.0)
    assert rel_err(run_ours(model, x[:4], tc, yc, forward_cfg3), ref_cfg.numpy()) <= 1e-5
    # pos_embed is the checkpoint's copy (drifted from the exact table), not the exact table
    np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), official_torch.pos_embed.numpy())


def test_official_accepts_torch_tensors_and_keeps_exact_table_without_pos_embed(official_torch):
    sd = dict(official_torch.state_dict())
    del sd["pos_embed"]
    model = load_official_dit(tiny_model(), sd)
    mine = model_to_numpy(model)
    np.testing.assert_array_equal(mine["blocks.1.attn.qkv.kernel"], sd["blocks.1.attn.qkv.weight"].numpy().T)
    np.testing.assert_array_equal(
        mine["x_embedder.proj.kernel"], sd["x_embedder.proj.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_allclose(mine["pos_embed"][0], official_sincos_2d(64, 4), atol=1e-7, rtol=0)


def test_train_checkpoint_and_ddp_prefix(official_torch):
    ema = numpy_sd(official_torch)
    raw = {f"module.{k}": v + 1.0 for k, v in ema.items()}  # DDP-prefixed "model" weights, different values
    ckpt = {"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": argparse.Namespace(a=1)}
    got = model_to_numpy(load_official_dit(tiny_model(), ckpt))
    np.testing.assert_array_equal(got["final_layer.linear.bias"], ema["final_layer.linear.bias"])
    got = model_to_numpy(load_official_dit(tiny_model(), ckpt, which="model"))
    np.testing.assert_array_equal(got["final_layer.linear.bias"], ema["final_layer.linear.bias"] + 1.0)


def test_mismatch_report_lists_every_problem_and_leaves_model_untouched(official_torch):
    sd = numpy_sd(official_torch)
    del sd["blocks.1.mlp.fc2.bias"], sd["final_layer.linear.weight"]
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    sd["blocks.2.attn.qkv.weight"] = np.zeros((192, 64), np.float32)
    sd["blocks.0.attn.qkv.weight"] = np.zeros((192, 65), np.float32)
    sd["pos_embed"] = np.zeros((1, 9, 64), np.float32)
    model = tiny_model(abstract=False)
    before = model_to_numpy(model)
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_dit(model, sd)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.missing == ["blocks.1.mlp.fc2.bias", "final_layer.linear.weight"]
    assert err.unexpected == ["blocks.0.attn.extra", "blocks.2.attn.qkv.weight"]
    assert sorted(k for k, _, _ in err.mismatched) == ["blocks.0.attn.qkv.weight", "pos_embed"]
    text = str(err)
    for key in err.missing + err.unexpected:
        assert key in text
    assert "blocks.0.attn.qkv.weight: expected (192, 64), got (192, 65)" in text
    assert "pos_embed: expected (1, 16, 64), got (1, 9, 64)" in text
    after = model_to_numpy(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def official_shapes(depth, hidden, patch, size=32, classes=1000, cin=4) -> dict[str, np.ndarray]:
    """A zero-cost official-layout state_dict of the given shapes (broadcast zeros)."""
    cout = 2 * cin
    shapes = {
        "x_embedder.proj.weight": (hidden, cin, patch, patch), "x_embedder.proj.bias": (hidden,),
        "t_embedder.mlp.0.weight": (hidden, 256), "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden), "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden), "pos_embed": (1, (size // patch) ** 2, hidden),
        "final_layer.linear.weight": (patch * patch * cout, hidden), "final_layer.linear.bias": (patch * patch * cout,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        for name, (o, n) in {"attn.qkv": (3 * hidden, hidden), "attn.proj": (hidden, hidden),
                             "mlp.fc1": (4 * hidden, hidden), "mlp.fc2": (hidden, 4 * hidden),
                             "adaLN_modulation.1": (6 * hidden, hidden)}.items():
            shapes[f"blocks.{i}.{name}.weight"] = (o, n)
            shapes[f"blocks.{i}.{name}.bias"] = (o,)
    return {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}


def test_other_variant_gives_a_variant_hint():
    model = nnx.eval_shape(lambda: DiT_models["DiT-S/2"](rngs=nnx.Rngs(0)))
    with pytest.raises(CheckpointMismatchError) as info:
        load_official_dit(model, official_shapes(depth=28, hidden=1152, patch=2, size=64))
    text = str(info.value)
    assert "seems to be DiT-XL/2" in text and "depth 28 (model: 12)" in text
    assert "input_size 64 (model: 32)" in text and "512 px" in text
    assert "blocks.27.attn.qkv.weight" in info.value.unexpected
    with pytest.raises(CheckpointMismatchError, match=r"seems to be DiT-S/4.*patch_size 4 \(model: 2\)"):
        load_official_dit(model, official_shapes(depth=12, hidden=384, patch=4))
    # a depth-only difference on a custom model
    with pytest.raises(CheckpointMismatchError, match=r"depth 3 \(model: 2\)"):
        load_official_dit(tiny_model(), official_shapes(depth=3, hidden=64, patch=2, size=8, classes=10))


def test_unsupported_block_types_are_refused(official_torch):
    for block_type in ("adaLN", "cross-attn", "in-context"):
        model = tiny_model(block_type=block_type)
        with pytest.raises(ValueError, match=f"block_type is '{block_type}'"):
            load_official_dit(model, numpy_sd(official_torch))
        with pytest.raises(ValueError, match="block_type"):
            load_diffusers_dit(model, {})


# ----------------------------------------------------------------------------------------------------------
# diffusers layout.
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def make_diffusers(depth=2, seed=0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=depth,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6,
    ).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        std = 1.0 if name.endswith("embedding_table.weight") else (
            1.0 / math.sqrt(np.prod(p.shape[1:])) if p.ndim >= 2 else 0.1
        )
        p.copy_(torch.randn(p.shape, generator=gen) * std)
    emb0 = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(emb0.state_dict())
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # the official timestep formula
    emb0.time_proj.downscale_freq_shift = 0
    return model


def diffusers_ref(model, x, t, y):
    return model(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()


def test_diffusers_embedder_copies_must_agree():
    tm = make_diffusers(depth=3)
    sd = numpy_sd(tm)
    key = "transformer_blocks.{}.norm1.emb.class_embedder.embedding_table.weight"
    sd[key.format(1)] = sd[key.format(1)] + 1e-3
    sd[key.format(2)] = sd[key.format(2)] + 1.0
    model = tiny_model(depth=3, abstract=False)
    before = model_to_numpy(model)
    with pytest.raises(EmbedderCopiesDisagreeError, match=r"block 1 differs from block 0 \(transformer_blocks\.1\."):
        load_diffusers_dit(model, sd)
    assert np.array_equal(before["blocks.0.attn.qkv.kernel"], model_to_numpy(model)["blocks.0.attn.qkv.kernel"])
    with pytest.raises(EmbedderCopiesDisagreeError, match="block 2"):
        load_diffusers_dit(model, sd, embedder_atol=1e-2)
    load_diffusers_dit(model, sd, embedder_atol=2.0)  # block 0's copy is used
    np.testing.assert_array_equal(
        model_to_numpy(model)["y_embedder.embedding_table.embedding"], sd[key.format(0)]
    )


def test_diffusers_mismatch_report_and_layout_hints(official_torch):
    sd = numpy_sd(make_diffusers())
    del sd["transformer_blocks.1.attn1.to_k.bias"]
    sd["proj_out_2.weight"] = np.zeros((16, 64), np.float32)  # learn_sigma=False shape
    with pytest.raises(CheckpointMismatchError) as info:
        load_diffusers_dit(tiny_model(), sd)
    assert info.value.missing == ["transformer_blocks.1.attn1.to_k.bias"]
    assert info.value.mismatched == [("proj_out_2.weight", (32, 64), (16, 64))]
    assert "out_channels 4 (model: 8)" in str(info.value)
    # each loader recognises the other layout
    with pytest.raises(CheckpointMismatchError, match="use load_official_dit"):
        load_diffusers_dit(tiny_model(), numpy_sd(official_torch))
    with pytest.raises(CheckpointMismatchError, match="use dit_jax.convert.load_diffusers_dit"):
        load_official_dit(tiny_model(), numpy_sd(make_diffusers()))


def test_diffusers_config_validation():
    good = dict(_class_name="DiTTransformer2DModel", num_attention_heads=16, attention_head_dim=72, in_channels=4,
                out_channels=8, num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
    kw = dit_kwargs_from_diffusers_config(good)
    assert kw == dict(input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                      mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True)
    assert dit_kwargs_from_diffusers_config(dict(good, out_channels=None))["learn_sigma"] is False
    # the older class name and null fields of the Transformer2DModel configs that DiT pipelines were saved with
    legacy = dict(good, _class_name="Transformer2DModel", cross_attention_dim=None, num_vector_embeds=None,
                  use_linear_projection=False, only_cross_attention=False, activation_fn="gelu-approximate",
                  norm_type="ada_norm_zero", norm_elementwise_affine=False, attention_bias=True, dropout=0.0)
    assert dit_kwargs_from_diffusers_config(legacy) == kw
    bad = dict(good, norm_type="ada_norm_single", out_channels=5, activation_fn="geglu")
    with pytest.raises(ValueError) as info:
        dit_kwargs_from_diffusers_config(bad)
    text = str(info.value)
    assert "norm_type='ada_norm_single'" in text and "out_channels=5" in text and "activation_fn='geglu'" in text
    with pytest.raises(ValueError, match="patch_size is null"):
        dit_kwargs_from_diffusers_config(dict(good, _class_name="Transformer2DModel", patch_size=None))
    with pytest.raises(ValueError, match="_class_name 'UNet2DModel'"):
        dit_kwargs_from_diffusers_config(dict(good, _class_name="UNet2DModel"))


# ----------------------------------------------------------------------------------------------------------
# Files: safetensors, .pt, diffusers folders.
# ----------------------------------------------------------------------------------------------------------
def test_read_safetensors_matches_safetensors_and_handles_bf16(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "e": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "x.safetensors")
    got = read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(got["a"], tensors["a"].numpy())
    np.testing.assert_array_equal(got["b"].astype(np.float32), tensors["b"].float().numpy())
    np.testing.assert_array_equal(got["c"], tensors["c"].numpy())
    assert got["e"].shape == (0, 3)
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointReadError, match=r"cut\.safetensors.*truncated"):
        read_safetensors(tmp_path / "cut.safetensors")


def test_read_pt_release_and_train_checkpoint(tmp_path, official_torch):
    sd = official_torch.state_dict()
    torch.save(sd, tmp_path / "release.pt")
    got = read_state_dict(tmp_path / "release.pt")
    assert set(got) == set(sd)
    assert all(isinstance(v, np.ndarray) and np.array_equal(v, sd[k].numpy()) for k, v in got.items())

    ns = argparse.Namespace(model="DiT-XL/2", image_size=256, num_classes=1000, global_seed=0)
    half = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # bf16 on purpose: numpy has no bf16
    ckpt = {"model": half, "ema": sd, "opt": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
            "args": ns}
    torch.save(ckpt, tmp_path / "0001000.pt")
    with pytest.raises(Exception, match="argparse.Namespace"):  # what plain weights_only does
        torch.load(tmp_path / "0001000.pt", weights_only=True)
    assert read_pt(tmp_path / "0001000.pt")["args"] == ns
    assert read_train_args(tmp_path / "0001000.pt") == ns
    ema = read_state_dict(tmp_path / "0001000.pt")
    np.testing.assert_array_equal(ema["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"].numpy())
    raw = read_state_dict(tmp_path / "0001000.pt", which="model")
    assert raw["blocks.0.attn.qkv.weight"].dtype == np.float32
    np.testing.assert_array_equal(raw["blocks.0.attn.qkv.weight"], half["blocks.0.attn.qkv.weight"].float().numpy())


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_read_pt_refuses_bad_files(tmp_path, official_torch):
    torch.save(official_torch.state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "empty.pt"):
        with pytest.raises(CheckpointReadError, match=rf"{name}.*truncated or corrupt"):
            read_pt(tmp_path / name)
    with pytest.raises(CheckpointReadError, match="no such file"):
        read_pt(tmp_path / "absent.pt")
    # a pickled callable is refused, never run
    marker = tmp_path / "pwned"
    torch.save({"x": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointReadError, match=r"evil\.pt: refusing to unpickle"):
        read_pt(tmp_path / "evil.pt")
    assert not marker.exists()
    # behind an argparse.Namespace (which takes the train.py retry path) too: the retry stays weights_only
    torch.save({"args": argparse.Namespace(a=1), "x": _Evil(str(marker))}, tmp_path / "evil_train.pt")
    with pytest.raises(CheckpointReadError, match=r"evil_train\.pt: refusing to unpickle"):
        read_pt(tmp_path / "evil_train.pt")
    assert not marker.exists()


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    tm = make_diffusers(seed=7)
    path = tmp_path_factory.mktemp("diffusers") / "transformer"
    tm.save_pretrained(path, safe_serialization=True)
    sharded = path.parent / "sharded"
    tm.save_pretrained(sharded, safe_serialization=True, max_shard_size="100KB")
    return tm, path, sharded


def test_diffusers_folder_loads_without_torch(diffusers_folder, tmp_path):
    tm, path, sharded = diffusers_folder
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    x, t, y = inputs(seed=2)
    np.savez(tmp_path / "in.npz", x=x, t=t, y=y)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any `import torch` now fails
        import jax.numpy as jnp, numpy as np
        from dit_jax.convert import load_diffusers_dit_folder, read_pt
        try:
            read_pt({str(tmp_path / "in.npz")!r})
        except ImportError as e:
            assert "pip install torch" in str(e), e
        else:
            raise SystemExit("read_pt worked without torch")
        d = np.load({str(tmp_path / "in.npz")!r})
        outs = []
        for folder in ({str(path)!r}, {str(sharded)!r}, {str(path.parent)!r}):
            model = load_diffusers_dit_folder(None, folder)
            out = model(jnp.asarray(d["x"].transpose(0, 2, 3, 1)), jnp.asarray(d["t"]), jnp.asarray(d["y"], jnp.int32))
            outs.append(np.asarray(out).transpose(0, 3, 1, 2))
        assert sys.modules["torch"] is None
        np.save({str(tmp_path / "out.npy")!r}, np.stack(outs))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = np.load(tmp_path / "out.npy")
    ref = diffusers_ref(tm, x, t, y)
    for out in outs:  # single file, sharded, and a pipeline folder with transformer/
        assert rel_err(out, ref) <= 1e-5


def test_diffusers_folder_checks_config_against_model(diffusers_folder):
    _, path, _ = diffusers_folder
    with pytest.raises(ValueError, match="num_heads 4 in config vs 8 in model"):
        load_diffusers_dit_folder(tiny_model(num_heads=8), path)
    with pytest.raises(CheckpointReadError, match="not a diffusers model folder"):
        load_diffusers_dit_folder(None, path / "nowhere")


# ----------------------------------------------------------------------------------------------------------
# dit-jax convert.
# ----------------------------------------------------------------------------------------------------------
def cli(argv: list[str]) -> int:
    """`dit-jax ARGV` in this process: errors are one `dit-jax convert: error: ...` line and an exit status."""
    from dit_jax.cli import main

    return main(argv)


def test_cli_converts_diffusers_folder_and_load_converted_restores_it(diffusers_folder, tmp_path, capsys):
    tm, path, _ = diffusers_folder
    out_dir = tmp_path / "converted"
    assert cli(["convert", str(path), str(out_dir)]) == 0
    assert "converted diffusers custom DiT" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temp folders left
    meta = json.loads((out_dir / "dit_config.json").read_text())
    assert meta["source"] == "diffusers" and meta["variant"] is None and meta["image_size"] == 64
    assert meta["model"]["depth"] == 2 and meta["model"]["num_heads"] == 4 and meta["model"]["learn_sigma"] is True
    import hashlib

    weights = path / "diffusion_pytorch_model.safetensors"
    assert meta["input_files_sha256"][weights.name] == hashlib.sha256(weights.read_bytes()).hexdigest()

    direct = load_diffusers_dit(tiny_model(), numpy_sd(tm))
    x, t, y = inputs(seed=4)
    want = run_ours(direct, x, t, y)
    restored = load_converted(out_dir)
    assert isinstance(restored, DiT) and not restored.scan_blocks
    np.testing.assert_array_equal(run_ours(restored, x, t, y), want)
    stacked = load_converted(out_dir, scan_blocks=True)  # re-stacked on load
    assert stacked.scan_blocks
    np.testing.assert_allclose(run_ours(stacked, x, t, y), want, rtol=0, atol=1e-5 * np.max(np.abs(want)))

    # an existing output is not replaced without --overwrite
    assert cli(["convert", str(path), str(out_dir)]) == 1
    assert "exists" in capsys.readouterr().err
    assert cli(["convert", "--variant", "DiT-S/2", str(path), str(tmp_path / "other")]) == 1
    assert "does not match config.json" in capsys.readouterr().err
    assert cli(["convert", "--overwrite", "--scan-blocks", str(path), str(out_dir)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]
    assert json.loads((out_dir / "dit_config.json").read_text())["model"]["scan_blocks"] is True


def test_cli_converts_official_pt_inferring_the_architecture(official_torch, tmp_path, capsys):
    pt = tmp_path / "ckpt.pt"
    torch.save({"model": official_torch.state_dict(), "ema": official_torch.state_dict(), "opt": {},
                "args": argparse.Namespace(image_size=64, global_seed=0)}, pt)
    assert cli(["convert", str(pt), str(tmp_path / "a")]) == 1  # width 64 is no paper variant: heads unknown
    assert "--num-heads" in capsys.readouterr().err
    assert cli(["convert", "--num-heads", "4", "--scan-blocks", str(pt), str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "dit_config.json").read_text())
    assert meta["source"] == "official" and meta["weights"] == "ema" and meta["train_args"]["image_size"] == 64
    assert meta["model"]["input_size"] == 8 and meta["model"]["num_classes"] == 10 and meta["model"]["scan_blocks"]
    import hashlib

    assert meta["input_sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    model = load_converted(tmp_path / "a")
    x, t, y = inputs(seed=5)
    ref = official_torch(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    assert rel_err(run_ours(model, x, t, y), ref) <= 1e-5
    assert cli(["convert", "--num-heads", "4", "--image-size", "128", str(pt), str(tmp_path / "b")]) == 1
    assert "pos_embed is for 8x8" in capsys.readouterr().err


def test_cli_interrupted_write_leaves_nothing(diffusers_folder, tmp_path, monkeypatch):
    _, path, _ = diffusers_folder

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_folder, "_save_state", boom)
    assert cli(["convert", str(path), str(tmp_path / "out")]) == 130  # Ctrl-C's exit status
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_full_xl2_state_dict_round_trip_through_pt_and_orbax(tmp_path):
    """A generated state_dict of the full DiT-XL/2 256 layout (675M random values, nothing downloaded) ->
    .pt -> `dit-jax convert` (architecture inferred from the shapes) -> Orbax -> load_converted ->
    to_official_state_dict: every tensor back bit for bit, under its official key and shape."""
    from dit_jax.convert import to_official_state_dict

    rng = np.random.default_rng(0)
    shapes = {k: v.shape for k, v in official_shapes(28, 1152, 2, size=32).items()}
    sd = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    assert sum(v.size for v in sd.values()) == 675_129_632  # official train.py's count for XL/2 (pos_embed incl.)
    pt = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, pt)
    meta = convert_folder.convert(pt, tmp_path / "converted")
    pt.unlink()
    assert meta["variant"] == "DiT-XL/2" and meta["image_size"] == 256 and meta["model"]["num_heads"] == 16
    back = to_official_state_dict(load_converted(tmp_path / "converted"))
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == np.float32, k
        assert np.array_equal(back[k], v), k


@pytest.mark.parametrize("scan_blocks", [False, True])
def test_to_official_state_dict_inverts_load_official_dit(official_torch, scan_blocks):
    from dit_jax.convert import to_official_state_dict

    sd = numpy_sd(official_torch)
    back = to_official_state_dict(load_official_dit(tiny_model(scan_blocks=scan_blocks), sd))
    assert set(back) == set(sd)
    for k, v in sd.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    # and the official model built from it computes the same function
    twin = OfficialDiT()
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    x, t, y = inputs()
    args = (torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y))
    np.testing.assert_array_equal(twin(*args).numpy(), official_torch(*args).numpy())
