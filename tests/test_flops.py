"""Analytic DiT parameter and compute counts (dit_jax.perf.flops) against the paper, the model itself and XLA; the
`dit-jax flops` command (dit_jax.perf.cli); forward_macs of every model family.

Paper values: Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (arXiv:2212.09748), as
printed in the CVF open-access version (read from a text conversion of it, github.com/Bili-Sakura/
coding-diffusers-from-scratch, tutorials/assets/Peebles_2023_ICCV.md, commit 05dd853e):
  * Appendix A, Table 4 "Details of all DiT models": columns "Flops (G)" and "Params (M)" for the twelve
    adaLN-Zero models at 256x256, the XL/2 block-design ablations and the 512x512 XL/2. Its caption: "Parameter
    and flop counts exclude the VAE model".
  * Table 1 "Details of DiT models": "Gflops (I=32, p=4)" per model size, one decimal.
  * Section 5 "DiT block design" (the models of Figure 5): in-context 119.4, cross-attention 137.6,
    adaLN 118.6, adaLN-Zero 118.6 Gflops. Sections 1 and 5.1: DiT-XL/2 118.6 Gflops at 256 px, 524.6 at 512 px.
  * facebookresearch/DiT README.md, table of pre-trained models: Gflops 119 (256x256) and 525 (512x512).
The paper prints Params (M) as whole millions; the tests check 0.5% and also the exact printed value after
rounding, which holds for all sixteen rows when the fixed pos_embed is left out (the module's convention).
"""

from __future__ import annotations

import argparse
import functools
import json
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dit_jax.errors import UsageError
from dit_jax.models import BLOCK_TYPES, DiT
from dit_jax.perf import cli as perf_cli
from dit_jax.perf import flops
from dit_jax.models.layers import FixedEmbed

# Table 4, the twelve adaLN-Zero models at 256x256: name -> (Flops (G), Params (M)).
PAPER_TABLE4 = {
    "DiT-S/8": (0.36, 33),
    "DiT-S/4": (1.41, 33),
    "DiT-S/2": (6.06, 33),
    "DiT-B/8": (1.42, 131),
    "DiT-B/4": (5.56, 130),
    "DiT-B/2": (23.01, 130),
    "DiT-L/8": (5.01, 459),
    "DiT-L/4": (19.70, 458),
    "DiT-L/2": (80.71, 458),
    "DiT-XL/8": (7.39, 676),
    "DiT-XL/4": (29.05, 675),
    "DiT-XL/2": (118.64, 675),
}
# Table 4, DiT-XL/2 at 256x256 with each block design: block_type -> (Flops (G), Params (M)).
PAPER_TABLE4_BLOCKS = {
    "in-context": (119.37, 449),
    "cross-attn": (137.62, 598),  # "cross-attention"
    "adaLN": (118.56, 600),
    "adaLN-Zero": (118.64, 675),
}
PAPER_TABLE4_XL2_512 = (524.60, 675)  # Table 4, DiT-XL/2 at 512x512
# Section 5 "DiT block design" (Figure 5), Gflops of the four XL/2 designs, one decimal.
PAPER_FIGURE5 = {"in-context": 119.4, "cross-attn": 137.6, "adaLN": 118.6, "adaLN-Zero": 118.6}
# Table 1, "Gflops (I=32, p=4)", i.e. the /4 models at 256x256.
PAPER_TABLE1 = {"S": 1.4, "B": 5.6, "L": 19.7, "XL": 29.1}

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)

GFLOPS_RTOL = 0.01
PARAMS_RTOL = 0.005


def test_block_types_are_the_models():
    assert flops.BLOCK_TYPES == BLOCK_TYPES


def test_variant_names_in_paper_order():
    assert flops.variant_names() == list(PAPER_TABLE4)
    assert [r["name"] for r in flops.flops_table()] == list(PAPER_TABLE4)


# --------------------------------------------------------------------------------------------------------------
# The paper's numbers
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PAPER_TABLE4))
def test_paper_table4(name):
    gflops, params_m = PAPER_TABLE4[name]
    cfg = flops.variant_config(name, image_size=256)
    macs, params = flops.dit_macs(**cfg), flops.dit_params(**cfg)
    assert macs / 1e9 == pytest.approx(gflops, rel=GFLOPS_RTOL), (name, macs / 1e9, gflops)
    assert params / 1e6 == pytest.approx(params_m, rel=PARAMS_RTOL), (name, params / 1e6, params_m)
    assert round(params / 1e6) == params_m  # exact at the printed precision
    row = next(r for r in flops.flops_table() if r["name"] == name)
    assert (row["macs"], row["params"]) == (macs, params)


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_paper_block_designs(block_type):
    cfg = flops.variant_config("DiT-XL/2", image_size=256, block_type=block_type)
    gmacs, params_m = flops.dit_macs(**cfg) / 1e9, flops.dit_params(**cfg) / 1e6
    gflops, printed_params = PAPER_TABLE4_BLOCKS[block_type]
    assert gmacs == pytest.approx(gflops, rel=GFLOPS_RTOL)
    assert gmacs == pytest.approx(PAPER_FIGURE5[block_type], rel=GFLOPS_RTOL)
    assert params_m == pytest.approx(printed_params, rel=PARAMS_RTOL)
    assert round(params_m) == printed_params


def test_paper_xl2_512_and_readme():
    cfg = flops.variant_config("DiT-XL/2", image_size=512)
    assert cfg["input_size"] == 64
    gmacs, params_m = flops.dit_macs(**cfg) / 1e9, flops.dit_params(**cfg) / 1e6
    assert gmacs == pytest.approx(PAPER_TABLE4_XL2_512[0], rel=GFLOPS_RTOL)
    assert round(params_m) == PAPER_TABLE4_XL2_512[1]
    # the official README rounds to whole Gflops: 119 at 256 px, 525 at 512 px
    assert round(gmacs) == 525
    assert round(flops.dit_macs(**flops.variant_config("DiT-XL/2", image_size=256)) / 1e9) == 119


@pytest.mark.parametrize("size", list(PAPER_TABLE1))
def test_paper_table1(size):
    gmacs = flops.dit_macs(**flops.variant_config(f"{size}/4", image_size=256)) / 1e9
    # Table 1 is Table 4's /4 column to one decimal (XL: 29.05 -> 29.1; we count 29.04)
    assert gmacs == pytest.approx(PAPER_TABLE1[size], rel=GFLOPS_RTOL)


def test_pos_embed_convention():
    """Default: trainable parameters (paper); include_pos_embed adds the fixed table (official train.py count)."""
    cfg = flops.variant_config("DiT-XL/2")
    assert flops.dit_params(**cfg) == 674_834_720
    assert flops.dit_params(include_pos_embed=True, **cfg) == 675_129_632 == 674_834_720 + 256 * 1152
    assert flops.param_breakdown(**cfg)["pos_embed"] == 256 * 1152


def test_macs_breakdown_formula_xl2():
    """The count spelled out for DiT-XL/2 at 256 px: T = 256 tokens, D = 1152, 28 blocks."""
    t, d, n = 256, 1152, 28
    parts = flops.macs_breakdown(**flops.variant_config("DiT-XL/2"))
    assert parts["blocks.attn_linear"] == n * 4 * t * d * d
    assert parts["blocks.attn_scores"] == n * 2 * t * t * d
    assert parts["blocks.mlp"] == n * 8 * t * d * d
    assert parts["blocks.adaLN"] == n * 6 * d * d
    assert parts["x_embedder"] == t * (2 * 2 * 4) * d
    assert parts["t_embedder"] == 256 * d + d * d
    assert parts["final_layer"] == 2 * d * d + t * d * (2 * 2 * 8)
    assert parts["y_embedder"] == parts["blocks.cross_attn"] == 0


def test_config_errors():
    with pytest.raises(ValueError, match="block_type"):
        flops.dit_macs(**flops.variant_config("S/2", block_type="film"))
    with pytest.raises(ValueError, match="divisible"):
        flops.dit_params(depth=1, hidden_size=10, num_heads=3, patch_size=2)
    with pytest.raises(ValueError, match="divisible"):
        flops.dit_macs(depth=1, hidden_size=12, num_heads=3, patch_size=3, input_size=8)
    with pytest.raises(ValueError, match="unknown DiT variant"):
        flops.variant_config("DiT-M/2")
    with pytest.raises(ValueError, match="image_size"):
        flops.variant_config("S/2", image_size=100)


# --------------------------------------------------------------------------------------------------------------
# Against the model: nnx.Param leaves and a count of the matmuls in its jaxpr (all abstract, nothing allocated)
# --------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _abstract(cfg_items: tuple, scan_blocks: bool):
    """(graphdef, abstract state) of DiT(**cfg) from nnx.eval_shape; cached so each size is built once (the
    arguments are positional and always both given, so that the cache key is the same for every caller)."""
    cfg = dict(cfg_items)
    model = nnx.eval_shape(lambda: DiT(**cfg, scan_blocks=scan_blocks, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def _abstract_inputs(cfg: dict) -> tuple:
    i, c = cfg["input_size"], cfg.get("in_channels", 4)
    return (
        jax.ShapeDtypeStruct((1, i, i, c), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.float32),
        jax.ShapeDtypeStruct((1,), jnp.int32),
    )


def _forward(graphdef):
    return lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, y)


def _check_against_model(cfg: dict, scan_blocks: bool = False) -> None:
    graphdef, state = _abstract(tuple(sorted(cfg.items())), scan_blocks)
    n_param = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.filter_state(state, nnx.Param)))
    n_fixed = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.filter_state(state, FixedEmbed)))
    assert n_param == flops.dit_params(**cfg)
    assert n_fixed == flops.param_breakdown(**cfg)["pos_embed"]
    assert n_param + n_fixed == flops.dit_params(include_pos_embed=True, **cfg)
    traced = flops.traced_macs(_forward(graphdef), state, *_abstract_inputs(cfg))
    assert traced == flops.dit_macs(**cfg), (traced, flops.macs_breakdown(**cfg))


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-XL/2"])
def test_counts_match_model_full_size(name):
    _check_against_model(flops.variant_config(name, image_size=256))


@pytest.mark.parametrize("name", list(PAPER_TABLE4))
def test_counts_match_model_variants(name):
    """Every variant's widths and patch layers at 256 and 512 px; two blocks to keep nnx.eval_shape quick (the
    count is linear in depth, and full depth is checked above)."""
    _check_against_model(flops.variant_config(name, image_size=256, depth=2))
    _check_against_model(flops.variant_config(name, image_size=512, depth=2))


@pytest.mark.parametrize("block_type", BLOCK_TYPES)
def test_counts_match_model_block_types(block_type):
    _check_against_model(dict(TINY, block_type=block_type))
    _check_against_model(dict(TINY, block_type=block_type), scan_blocks=True)  # stacked blocks under lax.scan
    _check_against_model(flops.variant_config("S/2", block_type=block_type, depth=2))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(learn_sigma=False),
        dict(class_dropout_prob=0.0),  # no null-class row
        dict(in_channels=3, mlp_ratio=2.5, num_classes=7),
        dict(input_size=12, patch_size=4, block_type="in-context"),
    ],
)
def test_counts_match_model_options(overrides):
    _check_against_model(dict(TINY, **overrides))


def test_traced_macs_primitives():
    f32 = jnp.float32
    a, b = jax.ShapeDtypeStruct((3, 4), f32), jax.ShapeDtypeStruct((4, 5), f32)
    assert flops.traced_macs(jnp.matmul, a, b) == 3 * 4 * 5
    q = jax.ShapeDtypeStruct((2, 7, 3, 8), f32)  # (B, T, H, hd)
    assert flops.traced_macs(lambda q: jnp.einsum("bqhd,bkhd->bhqk", q, q), q) == 2 * 3 * 7 * 7 * 8
    x, w = jax.ShapeDtypeStruct((1, 8, 8, 6), f32), jax.ShapeDtypeStruct((3, 3, 2, 9), f32)  # 3 groups

    def conv(x, w):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=3)

    assert flops.traced_macs(conv, x, w) == (6 * 6 * 9) * (3 * 3 * 2)

    def scanned(a, b):
        return jax.lax.scan(lambda c, _: (c, c @ b), a, None, length=5)[1]

    assert flops.traced_macs(scanned, a, b) == 5 * 3 * 4 * 5
    assert flops.traced_macs(jax.jit(jnp.matmul), a, b) == 60  # inside a pjit
    assert flops.traced_macs(lambda a: jnp.take(a, jnp.array([0, 2]), axis=0) * 2.0, a) == 0
    with pytest.raises(NotImplementedError):
        flops.traced_macs(lambda a, b: jax.lax.while_loop(lambda c: c[0, 0] < 1, lambda c: c @ b[:, :4], a), a, b)


# --------------------------------------------------------------------------------------------------------------
# Against XLA's cost analysis
# --------------------------------------------------------------------------------------------------------------
def _elementwise_allowance(cfg: dict) -> int:
    """A bound on the non-matmul FLOPs that XLA's cost analysis adds to the 2 * MACs of the matmuls.

    Per block and token (L tokens): ~32 FLOPs per hidden channel (two LayerNorms ~8 each, two modulates, two
    gates, two residual adds, the biases of qkv/proj/fc2), ~12 per MLP hidden unit (tanh-GELU ~10, its bias) and
    ~8 per attention logit and head (scale, max, subtract, exp, sum, divide); the cross-attention block adds its
    LayerNorm and logits against 2 keys. Outside the blocks: the final LayerNorm + modulate, the pos_embed add,
    the sinusoidal timestep features, the SiLUs of the conditioning vector and the output bias. XLA's excess has
    been measured at 0.66-0.84 of this for shapes from attention-dominated (T=256, D=64) to XL/2.
    """
    p = flops._normalise(**cfg)
    d, t, depth, hidden, heads = p["d"], p["t"], p["depth"], p["mlp"], cfg["num_heads"]
    seq = t + flops.COND_TOKENS if p["block_type"] == "in-context" else t
    per_block = 32 * seq * d + 12 * seq * hidden + 8 * heads * seq * seq
    if p["block_type"] == "cross-attn":
        per_block += 16 * t * d + 8 * heads * t * flops.COND_TOKENS
    outside = 16 * t * d + 8 * p["freq"] + 16 * d * (depth + 2) + t * p["patch_out"]
    return depth * per_block + outside


def _xla_flops(cfg: dict) -> float:
    graphdef, state = _abstract(tuple(sorted(cfg.items())), False)
    compiled = jax.jit(_forward(graphdef)).lower(state, *_abstract_inputs(cfg)).compile()
    cost = compiled.cost_analysis()  # a dict, or a list with one dict per computation in older versions
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        pytest.skip(f"XLA gives no cost analysis on {jax.default_backend()}")
    return float(cost["flops"])


@pytest.mark.parametrize(
    "label, cfg",
    [(f"tiny {b}", dict(TINY, block_type=b)) for b in BLOCK_TYPES]
    + [
        ("tiny wide-attention", dict(TINY, input_size=32, depth=1, num_heads=8)),
        ("DiT-S/2 256px", flops.variant_config("S/2")),
        ("DiT-XL/2 256px", flops.variant_config("XL/2")),
    ],
)
def test_xla_cost_analysis(label, cfg):
    """2 * MACs <= XLA FLOPs <= 2 * MACs + elementwise allowance (XLA counts a multiply-add as 2 FLOPs)."""
    xla = _xla_flops(cfg)
    matmul = 2 * flops.dit_macs(**cfg)
    allowance = _elementwise_allowance(cfg)
    ratio, tol = xla / matmul, allowance / matmul
    msg = f"{label}: XLA {xla:.6g} FLOPs = {ratio:.5f} x 2*MACs ({matmul:.6g}); tolerance +{100 * tol:.2f}%"
    print(msg)
    assert matmul <= xla <= matmul + allowance, msg


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="dit-jax")
    perf_cli.register(parser.add_subparsers(dest="command"), "flops")
    args = parser.parse_args(["flops", *argv])
    return args.func(args)


@pytest.mark.parametrize("image_size, block_type", [(256, "adaLN-Zero"), (512, "cross-attn")])
def test_cli_table(capsys, image_size, block_type):
    argv = ["--image-size", str(image_size)] + ([] if block_type == "adaLN-Zero" else ["--block-type", block_type])
    assert _run_cli(argv) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("DiT-")]
    expected = flops.flops_table(image_size=image_size, block_type=block_type)
    assert len(rows) == 12
    for cols, row in zip(rows, expected):
        assert cols == [row["name"], str(row["tokens"]), f"{row['params_m']:.2f}", f"{row['gflops']:.2f}"]
    if image_size == 256:  # the paper's numbers as printed by the CLI
        printed = {cols[0]: float(cols[3]) for cols in rows}
        for name, (gflops, _) in PAPER_TABLE4.items():
            assert printed[name] == pytest.approx(gflops, rel=GFLOPS_RTOL)
    assert f"{image_size}x{image_size}" in out and block_type in out


def test_cli_json(capsys):
    assert _run_cli(["--json", "--block-type", "in-context"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == flops.flops_table(image_size=256, block_type="in-context")
    assert [r["name"] for r in rows] == list(PAPER_TABLE4)


def test_cli_rejects_bad_image_size(capsys):
    with pytest.raises(UsageError, match="multiple of 64"):
        _run_cli(["--image-size", "100"])
    from dit_jax import cli

    assert cli.main(["flops", "--image-size", "100"]) == 2  # a usage error: status 2, one line naming the flag
    err = capsys.readouterr().err
    assert "multiple of 64" in err and err.startswith("dit-jax flops: error: --image-size")
    assert len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit):
        _run_cli(["--block-type", "film"])


def test_cli_through_dit_jax_cli(capsys):
    """`dit-jax flops --json` through the top-level CLI's command table."""
    from dit_jax import cli

    args = cli.build_parser("flops").parse_args(["flops", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out) == flops.flops_table()


def test_variant_names_follow_the_model_tables():
    """The size list is the model's (dit_jax.constants.MODEL_SIZES, PATCH_SIZES), not a copy: every DiT_models
    entry, once."""
    from dit_jax.models.dit import DiT_models

    assert sorted(flops.variant_names()) == sorted(DiT_models)
    assert len(set(flops.variant_names())) == len(DiT_models)


def test_forward_macs_by_model_family():
    """forward_macs dispatches through dit_jax.models.families: the analytic count for a DiT (equal to dit_macs
    of its sizes, explicit sizes overriding the variant's), the traced count for a DDT (equal to traced_macs of
    the family's own model)."""
    from dit_jax.models.families import family
    from dit_jax.train.config_load import load_config

    cfg = load_config("configs/dit_imagenet.py:variant=XL/2,res=256", [])
    assert family(cfg.model.arch).analytic_macs
    assert flops.forward_macs(cfg.model) == flops.dit_macs(**flops.variant_config("DiT-XL/2", image_size=256))
    small = load_config("configs/dit_imagenet.py:variant=S/2,res=256", ["model.depth=2", "model.block_type=adaLN"])
    assert flops.forward_macs(small.model) == flops.dit_macs(
        **flops.variant_config("DiT-S/2", image_size=256, depth=2, block_type="adaLN"))

    ddt = load_config("configs/ddt_imagenet.py:variant=S/2,res=256,repa=False",
                      ["model.depth=2", "model.num_encoder_blocks=1"])
    fam = family(ddt.model.arch)
    assert not fam.analytic_macs
    graphdef, state = nnx.split(nnx.eval_shape(lambda: fam.build(ddt.model)))
    expected = flops.traced_macs(_forward(graphdef), state, *_abstract_inputs(
        dict(input_size=ddt.model.input_size, in_channels=ddt.model.in_channels)))
    assert flops.forward_macs(ddt.model) == expected > 0
    with pytest.raises(ValueError, match="unknown model.arch"):
        flops.forward_macs(type("Cfg", (), {"arch": "unet"})())
