"""DiT model: init, fixed tables, official parameter layout, conditioning designs, input errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.models import BLOCK_TYPES, DiT, DiT_models, decode_variant
from dit_jax.models.layers import FixedEmbed, get_2d_sincos_pos_embed, timestep_embedding


def tiny(**kw) -> DiT:
    seed = kw.pop("seed", 0)
    cfg = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    cfg.update(kw)
    return DiT(**cfg, rngs=nnx.Rngs(seed))


def inputs(b=4, size=8, c=4, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(k1, (b, size, size, c))
    t = jnp.array([0, 1, 500, 999][:b] + [7] * max(0, b - 4), jnp.int32)
    y = jnp.arange(b, dtype=jnp.int32) % 10
    return x, t, y


def randomize(model: nnx.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every Param (including the zero-initialised adaLN and final layers) random values."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, l.shape, l.dtype) for k, l in zip(keys, leaves)]
    nnx.update(model, jax.tree.unflatten(treedef, new))


# --------------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scan", [False, True])
def test_output_exactly_zero_at_init(scan):
    model = tiny(scan_blocks=scan)
    out = model(*inputs())
    assert out.shape == (4, 8, 8, 8)
    assert np.all(np.asarray(out) == 0.0)


def test_s2_output_zero_at_init_and_init_statistics():
    model = DiT_models["DiT-S/2"](input_size=32, num_classes=1000, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 4))
    out = model(x, jnp.array([3, 999]), jnp.array([5, 1000]))
    assert out.shape == (2, 32, 32, 8) and np.all(np.asarray(out) == 0.0)
    blk = model.blocks[0]
    # adaLN-Zero: block modulation zero; xavier elsewhere: U(-a, a) with a = sqrt(6 / (fan_in + fan_out)).
    assert np.all(np.asarray(blk.adaLN_modulation.layers[1].kernel.value) == 0)
    qkv = np.asarray(blk.attn.qkv.kernel.value)
    a = math.sqrt(6 / (384 + 3 * 384))
    assert qkv.max() <= a and qkv.min() >= -a and qkv.std() == pytest.approx(a / math.sqrt(3), rel=0.02)
    assert np.all(np.asarray(blk.attn.qkv.bias.value) == 0)
    # patch conv Xavier'd as a (D, C*p*p) matrix: fan_in = 4*2*2, fan_out = 384
    w = np.asarray(model.x_embedder.proj.kernel.value)
    assert w.shape == (2, 2, 4, 384)
    a = math.sqrt(6 / (16 + 384))
    assert w.max() <= a and w.std() == pytest.approx(a / math.sqrt(3), rel=0.05)
    # label table and timestep MLP weights N(0, 0.02)
    assert np.asarray(model.y_embedder.embedding_table.embedding.value).std() == pytest.approx(0.02, rel=0.02)
    assert np.asarray(model.t_embedder.mlp.layers[0].kernel.value).std() == pytest.approx(0.02, rel=0.05)
    assert np.all(np.asarray(model.final_layer.linear.kernel.value) == 0)


# --------------------------------------------------------------------------------------------------
# Fixed tables
# --------------------------------------------------------------------------------------------------
def test_timestep_embedding_official_formula_hand_computed():
    # dim 4: half = 2, freqs = exp(-ln(1e4) * k / 2) = [1, 1/100]; layout [cos | sin]
    e = np.asarray(timestep_embedding(jnp.array([1.0, 10.0]), 4))
    np.testing.assert_allclose(e[0], [math.cos(1), math.cos(0.01), math.sin(1), math.sin(0.01)], rtol=1e-6)
    np.testing.assert_allclose(e[1], [math.cos(10), math.cos(0.1), math.sin(10), math.sin(0.1)], rtol=1e-5)
    # dim 256 (DiT): the last frequency is 10000^(-127/128), divided by half = 128, not half - 1
    e = np.asarray(timestep_embedding(jnp.array([999]), 256))
    f = 10000.0 ** (-127 / 128)
    assert e[0, 127] == pytest.approx(math.cos(999 * f), abs=2e-6)
    assert e[0, 255] == pytest.approx(math.sin(999 * f), abs=2e-6)
    assert e[0, 1] == pytest.approx(math.cos(999 * 10000.0 ** (-1 / 128)), abs=2e-5)
    # diffusers' variant (divide by half - 1) is a different table
    d = np.asarray(timestep_embedding(jnp.array([999]), 256, downscale_freq_shift=1.0))
    assert d[0, 127] == pytest.approx(math.cos(999 * 1e-4), abs=2e-6)
    assert abs(d[0, 1] - e[0, 1]) > 1e-2
    # odd dims are zero-padded
    assert timestep_embedding(jnp.array([3.0]), 5).shape == (1, 5)


def test_pos_embed_layout_hand_computed():
    d, g = 8, 3
    table = get_2d_sincos_pos_embed(d, g)
    assert table.shape == (9, 8) and table.dtype == np.float64
    omega = 1.0 / 10000 ** (np.arange(2) / 2)  # D/4 = 2 frequencies per axis
    for row in range(g):
        for col in range(g):
            n = row * g + col
            expect = np.concatenate(
                [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
            )
            np.testing.assert_allclose(table[n], expect, rtol=0, atol=1e-15)


def test_pos_embed_is_fixed_not_trained():
    model = tiny()
    assert isinstance(model.pos_embed, FixedEmbed) and not isinstance(model.pos_embed, nnx.Param)
    np.testing.assert_array_equal(
        np.asarray(model.pos_embed.value[0]), get_2d_sincos_pos_embed(64, 4).astype(np.float32)
    )
    randomize(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    paths = {"/".join(map(str, p)) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    assert not any("pos_embed" in p for p in paths)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params, rest)(*inputs()) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["x_embedder"]["proj"]["kernel"].value).sum()) > 0


# --------------------------------------------------------------------------------------------------
# Label dropout
# --------------------------------------------------------------------------------------------------
def test_label_dropout_maps_to_null_class():
    model = tiny(class_dropout_prob=0.1)
    emb = model.y_embedder
    labels = jnp.arange(20000) % 10
    dropped = emb.token_drop(labels, jax.random.key(0))
    frac = float(jnp.mean(dropped == 10))
    assert 0.09 < frac < 0.11
    assert np.all(np.asarray(dropped)[np.asarray(dropped) != 10] == np.asarray(labels)[np.asarray(dropped) != 10])
    force = emb.token_drop(jnp.array([1, 2, 3]), force_drop_ids=jnp.array([1, 0, 1]))
    np.testing.assert_array_equal(force, [10, 2, 10])
    # in the model: train=True with every label dropped == eval with the null label
    m1 = tiny(class_dropout_prob=1.0)
    randomize(m1)
    x, t, y = inputs()
    out_drop = m1(x, t, y, train=True, rng=jax.random.key(3))
    out_null = m1(x, t, jnp.full_like(y, 10))
    np.testing.assert_allclose(out_drop, out_null, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rng"):
        m1(x, t, y, train=True)
    # eval mode never drops
    m2 = tiny(class_dropout_prob=0.5)
    randomize(m2)
    np.testing.assert_array_equal(m2(x, t, y), m2(x, t, y))
    assert not np.allclose(m2(x, t, y), m2(x, t, jnp.full_like(y, 10)))


def test_no_null_row_without_dropout():
    model = tiny(class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.num_embeddings == 10
    x, t, y = inputs()
    with pytest.raises(ValueError, match="out of range"):
        model(x, t, jnp.full_like(y, 10))


# --------------------------------------------------------------------------------------------------
# The official parameter layout, for all twelve variants, without allocating
# --------------------------------------------------------------------------------------------------
def official_shapes(variant: str, input_size=32, in_channels=4, num_classes=1000, learn_sigma=True):
    """The official DiT state_dict layout (models.py), written out from the architecture."""
    v = decode_variant(variant)
    d, p, depth = v["hidden_size"], v["patch_size"], v["depth"]
    out_c = in_channels * (2 if learn_sigma else 1)
    s = {
        "pos_embed": (1, (input_size // p) ** 2, d),
        "x_embedder.proj.weight": (d, in_channels, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (num_classes + 1, d),
        "final_layer.linear.weight": (p * p * out_c, d),
        "final_layer.linear.bias": (p * p * out_c,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        s.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (4 * d, d), b + "mlp.fc1.bias": (4 * d,),
            b + "mlp.fc2.weight": (d, 4 * d), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return s


def torch_view(state: nnx.State) -> dict[str, tuple]:
    """Our state -> {official name: official shape} by the naming rules alone."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.to_pure_dict())[0]:
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        keys = [k for k in keys if k != "layers"]
        shape = tuple(leaf.shape)
        last = keys[-1]
        if last == "kernel" and len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])  # (p, p, C, D) -> (D, C, p, p)
        elif last == "kernel":
            shape = shape[::-1]
        name = ".".join(keys[:-1] + (["weight"] if last in ("kernel", "embedding") else [last]))
        if name == "pos_embed.value" or name == "pos_embed":
            name = "pos_embed"
        out[name] = shape
    return out


@pytest.mark.parametrize("variant", sorted(DiT_models))
def test_every_variant_matches_official_layout(variant):
    abstract = nnx.eval_shape(lambda: DiT_models[variant](input_size=32, rngs=nnx.Rngs(0)))
    ours = torch_view(nnx.state(abstract))
    expected = official_shapes(variant)
    assert set(ours) == set(expected), (set(ours) ^ set(expected))
    bad = {k: (ours[k], expected[k]) for k in expected if ours[k] != expected[k]}
    assert not bad


def test_decode_variant_and_unknown_variant():
    assert decode_variant("XL/2") == dict(depth=28, hidden_size=1152, num_heads=16, patch_size=2)
    assert decode_variant("DiT-S/8")["hidden_size"] == 384
    assert len(DiT_models) == 12
    for bad in ("XXL/2", "S/3", "DiT-B", "B/16x"):
        with pytest.raises(ValueError, match="unknown DiT variant"):
            decode_variant(bad)


# --------------------------------------------------------------------------------------------------
# Scan over blocks, remat and dtype give the same function
# --------------------------------------------------------------------------------------------------
def stack_into(scan_model: DiT, model: DiT) -> None:
    """Copy an unstacked model's weights into a scan_blocks model."""
    blocks = [nnx.state(b, nnx.Param) for b in model.blocks]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    nnx.update(scan_model.blocks, stacked)
    for name in ("x_embedder", "t_embedder", "y_embedder", "final_layer"):
        nnx.update(getattr(scan_model, name), nnx.state(getattr(model, name)))


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_scan_and_remat_equal_loop(block_type):
    base = tiny(block_type=block_type)
    randomize(base)
    x, t, y = inputs()
    forward = nnx.jit(lambda m: m(x, t, y))
    ref = forward(base)
    for scan, remat in ((True, "none"), (True, "full"), (False, "dots"), (True, "dots_no_batch")):
        other = tiny(block_type=block_type, scan_blocks=scan, remat_policy=remat, seed=5)
        if scan:
            stack_into(other, base)
        else:
            nnx.update(other, nnx.state(base))
        np.testing.assert_allclose(forward(other), ref, rtol=1e-5, atol=1e-6)

    def loss(m):
        return jnp.mean(m(x, t, y) ** 2)

    grad = nnx.jit(nnx.grad(loss))
    g_ref = grad(base)
    scanned = tiny(block_type=block_type, scan_blocks=True, remat_policy="full", seed=5)
    stack_into(scanned, base)
    g = grad(scanned)
    np.testing.assert_allclose(
        g["blocks"]["attn"]["qkv"]["kernel"].value[1], g_ref["blocks"][1]["attn"]["qkv"]["kernel"].value,
        rtol=1e-4, atol=1e-7,
    )


def test_bf16_compute_keeps_fp32_params():
    m32 = tiny()
    randomize(m32)
    m16 = tiny(dtype=jnp.bfloat16)
    nnx.update(m16, nnx.state(m32))
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(nnx.state(m16, nnx.Param)))
    x, t, y = inputs()
    a, b = np.asarray(m32(x, t, y)), np.asarray(m16(x, t, y))
    assert b.dtype == np.float32
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 0.05


# --------------------------------------------------------------------------------------------------
# Block designs (paper section 3.2)
# --------------------------------------------------------------------------------------------------
def test_block_designs_structure():
    n_params = {}
    for bt in BLOCK_TYPES:
        m = tiny(block_type=bt)
        n_params[bt] = sum(l.size for l in jax.tree.leaves(nnx.state(m, nnx.Param)))
        assert m(*inputs()).shape == (4, 8, 8, 8)
    d = 64
    # adaLN regresses 4D (no gates) where adaLN-Zero regresses 6D, per block (2 blocks)
    assert n_params["adaLN-Zero"] - n_params["adaLN"] == 2 * (2 * d * d + 2 * d)
    # the adaLN block is not an identity at init; adaLN-Zero's is
    x, t, y = inputs()
    h = jax.random.normal(jax.random.key(1), (4, 16, d))
    c = jax.random.normal(jax.random.key(2), (4, d))
    cond = jnp.stack([c, c], 1)
    assert np.all(np.asarray(tiny().blocks[0](h, c, cond)) == np.asarray(h))
    assert not np.allclose(tiny(block_type="adaLN").blocks[0](h, c, cond), h)
    assert hasattr(tiny(block_type="cross-attn").blocks[0], "cross_attn")


def test_in_context_tokens_take_part_in_attention():
    m = tiny(block_type="in-context")
    randomize(m)
    x, t, y = inputs()
    # labels only enter through the appended tokens: changing them must change the output
    assert not np.allclose(m(x, t, y), m(x, t, (y + 1) % 10))


# --------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------
def test_forward_with_cfg():
    m = tiny()
    randomize(m)
    x, t, _ = inputs()
    y = jnp.array([1, 2, 10, 10])
    plain = np.asarray(m(jnp.concatenate([x[:2], x[:2]]), t, y))
    s = 4.0
    for n in (3, None):
        out = np.asarray(m.forward_with_cfg(x, t, y, s, cfg_channels=n))
        k = 4 if n is None else n
        guided = plain[2:, ..., :k] + s * (plain[:2, ..., :k] - plain[2:, ..., :k])
        np.testing.assert_allclose(out[:2, ..., :k], guided, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[2:, ..., :k], guided, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(out[..., k:], plain[..., k:])
    # scale 1 leaves the conditional half unchanged
    np.testing.assert_allclose(m.forward_with_cfg(x, t, y, 1.0, None)[:2], plain[:2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="even batch"):
        m.forward_with_cfg(x[:3], t[:3], y[:3], 2.0)


def test_jit_and_grad_with_label_dropout():
    m = tiny()
    randomize(m)
    graphdef, params, rest = nnx.split(m, nnx.Param, ...)
    x, t, y = inputs()

    @jax.jit
    def loss(params, key):
        out = nnx.merge(graphdef, params, rest)(x, t, y, train=True, rng=key)
        return jnp.mean(out**2)

    g = jax.grad(loss)(params, jax.random.key(0))
    assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(g))
    assert float(loss(params, jax.random.key(0))) == float(loss(params, jax.random.key(0)))


# --------------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    m = tiny()
    x, t, y = inputs()
    with pytest.raises(ValueError, match="rank 4"):
        m(x[0], t, y)
    with pytest.raises(ValueError, match=r"\(B, 8, 8, 4\)"):
        m(jnp.zeros((4, 16, 16, 4)), t, y)
    with pytest.raises(ValueError, match=r"\(B, 8, 8, 4\)"):
        m(jnp.zeros((4, 8, 8, 3)), t, y)
    with pytest.raises(ValueError, match="NHWC|8, 8, 4"):
        m(jnp.zeros((4, 4, 8, 8)), t, y)  # NCHW by mistake
    with pytest.raises(ValueError, match="t must have shape"):
        m(x, t[:2], y)
    with pytest.raises(ValueError, match="y must have shape"):
        m(x, t, y[:, None])
    with pytest.raises(ValueError, match=r"out of range.*\[11, 42\]|out of range.*11"):
        m(x, t, jnp.array([0, 11, 42, -0]))
    with pytest.raises(ValueError, match="out of range"):
        m(x, t, jnp.array([0, -1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        m(x, t, y.astype(jnp.float32))
    with pytest.raises(ValueError, match="block_type"):
        tiny(block_type="film")
    with pytest.raises(ValueError, match="attn_impl"):
        tiny(attn_impl="flash")
    with pytest.raises(ValueError, match="remat_policy"):
        tiny(remat_policy="some")
    with pytest.raises(ValueError, match="divisible"):
        tiny(input_size=9)
    with pytest.raises(ValueError, match="divisible by 5 heads"):
        tiny(num_heads=5)
