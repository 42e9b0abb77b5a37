"""configs/*.py, dit_jax.train.config_schema and config_load: the schema, loading, locked overrides, runlocal,
serialisation, the sweeps."""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import sweeps
from dit_jax.models import DiT, DiT_models, decode_variant
from dit_jax.train.config_load import (
    config_from_dict,
    config_to_dict,
    load_config,
    parse_config_spec,
    split_config_argv,
)
from dit_jax.diffusion.objectives import OBJECTIVES
from dit_jax.constants import MODEL_SIZES
from dit_jax.models.families import DTYPES, FAMILIES
from dit_jax.train.config_schema import (
    DATA_SPACES,
    ConfigError,
    apply_runlocal,
    base_config,
    data_space,
    validate_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.stem not in ("__init__", "common", "sweeps"))

# Params (M, without the fixed position table) at 256 px: the paper's Table 4, as README's flops table lists them.
PAPER_PARAMS_M = {
    "S/8": 33.14, "S/4": 32.92, "S/2": 32.87, "B/8": 130.87, "B/4": 130.43, "B/2": 130.32,
    "L/8": 458.58, "L/4": 457.99, "L/2": 457.84, "XL/8": 675.66, "XL/4": 675.00, "XL/2": 674.83,
}


def abstract_dit(model_cfg) -> DiT:
    """The DiT a config describes, as shapes only: the variant, then the explicit sizes (> 0) over it."""
    explicit = {k: model_cfg[k] for k in ("depth", "hidden_size", "num_heads", "patch_size") if model_cfg[k] > 0}
    kwargs = dict(
        input_size=model_cfg.input_size, in_channels=model_cfg.in_channels, num_classes=model_cfg.num_classes,
        learn_sigma=model_cfg.learn_sigma, class_dropout_prob=model_cfg.class_dropout_prob,
        block_type=model_cfg.block_type, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_cfg.dtype],
        attn_impl=model_cfg.attn_impl, scan_blocks=model_cfg.scan_blocks, remat_policy=model_cfg.remat_policy,
    )
    if explicit:
        make = lambda: DiT(**{**decode_variant(model_cfg.variant), **explicit}, **kwargs, rngs=nnx.Rngs(0))  # noqa: E731
    else:
        make = lambda: DiT_models["DiT-" + model_cfg.variant](**kwargs, rngs=nnx.Rngs(0))  # noqa: E731
    return nnx.eval_shape(make)


def n_params(model: DiT) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ----------------------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CONFIG_FILES)
@pytest.mark.parametrize("arg", ["", ":runlocal=True"])
def test_every_config_file_loads_locked_and_valid(name, arg):
    config = load_config(f"configs/{name}{arg}")
    assert config.is_locked
    validate_config(config)
    assert config.runlocal == bool(arg)
    with pytest.raises(AttributeError):
        config.no_such_field = 1  # locked: a typo cannot add a field


def test_config_files_have_a_launch_command_docstring():
    for name in CONFIG_FILES:
        doc = importlib.import_module(f"configs.{Path(name).stem}").__doc__
        assert f"dit-jax train --config configs/{name}" in doc, name


def test_dit_imagenet_has_the_papers_numbers():
    c = load_config("configs/dit_imagenet.py:variant=XL/2,res=256")
    assert (c.optim.lr, c.optim.weight_decay, c.optim.ema_decay) == (1e-4, 0.0, 0.9999)
    assert (c.optim.b1, c.optim.b2, c.optim.grad_clip_norm, c.optim.warmup_steps) == (0.9, 0.999, 0.0, 0)
    assert (c.train.global_batch, c.train.steps) == (256, 400_000)
    assert (c.model.variant, c.model.input_size, c.model.in_channels, c.model.num_classes) == ("XL/2", 32, 4, 1000)
    assert c.model.learn_sigma and c.diffusion.learn_sigma and c.model.class_dropout_prob == 0.1
    assert (c.model.block_type, c.model.dtype, c.model.scan_blocks, c.model.remat_policy) == (
        "adaLN-Zero", "bfloat16", True, "none")
    assert all(c.model[k] == 0 for k in ("depth", "hidden_size", "num_heads", "patch_size"))  # sizes = the variant's
    assert (c.diffusion.diffusion_steps, c.diffusion.noise_schedule, c.diffusion.timestep_respacing) == (1000, "linear", "")
    assert c.data.random_flip and c.data.latent_scale == 0.18215 and c.data.vae == "stabilityai/sd-vae-ft-ema"
    assert (c.data.source, c.data.image_size) == ("latents", 256)
    assert load_config("configs/dit_imagenet.py:variant=XL/2,res=512").model.input_size == 64
    # images for a latent model: the trainer does not VAE-encode on the fly, so the config says what to use instead
    for source in ("tfds", "folder"):
        with pytest.raises(ValueError, match=r"does not VAE-encode them on the fly: extract latents"):
            load_config(f"configs/dit_imagenet.py:variant=S/4,source={source}")
    with pytest.raises(ValueError, match="unknown DiT variant"):
        load_config("configs/dit_imagenet.py:variant=XXL/2")


def test_digits_config_is_a_small_pixel_space_dit():
    c = load_config("configs/digits.py")
    assert (c.data.source, c.data.image_size, c.data.channels, c.data.num_classes) == ("digits", 16, 1, 10)
    assert not c.data.random_flip and c.model.dtype == "float32"
    assert (c.train.global_batch, c.train.steps, c.optim.ema_decay, c.train.sample_cfg_scale) == (32, 3000, 0.99, 4.0)
    model = abstract_dit(c.model)
    assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == (4, 128, 4, 4)
    assert (model.input_size, model.in_channels, model.out_channels, model.num_classes) == (16, 1, 2, 10)


def test_spec_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/digits.py").data.source == "digits"
    assert load_config(str(REPO / "configs" / "digits.py") + ":runlocal=1").runlocal
    with pytest.raises(ConfigError, match="not found; tried"):
        load_config("configs/nope.py")
    assert parse_config_spec("configs/x.py:variant=XL/2,res=256") == ("configs/x.py", "variant=XL/2,res=256")
    assert parse_config_spec("configs/x.py") == ("configs/x.py", None)
    with pytest.raises(ConfigError, match="path/to/config.py"):
        parse_config_spec("configs/x")


# ----------------------------------------------------------------------------------------------------------
# overrides
# ----------------------------------------------------------------------------------------------------------
def test_unknown_override_key_is_named_with_suggestions():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim\.lrr'; did you mean 'optim\.lr'"):
        load_config("configs/digits.py", ["optim.lrr=1"])
    with pytest.raises(ConfigError, match=r"'optimm\.lr'; did you mean 'optim\.lr'"):
        load_config("configs/digits.py", ["--config.optimm.lr=1"])
    with pytest.raises(ConfigError, match="unknown config key 'nonsense'"):
        load_config("configs/digits.py", ["nonsense=1"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config("configs/digits.py", ["optim=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=abc", "'optim.lr' expects a float, got 'abc'"),
        ("train.steps=1.5", "'train.steps' expects an int"),
        ("train.steps=many", "'train.steps' expects an int"),
        ("runlocal=maybe", "'runlocal' expects a bool"),
        ("data.data_dir=None", "None is not allowed"),
        ("train.steps", "needs a value"),
    ],
)
def test_bad_override_value_is_an_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits.py", [override])


def test_overrides_are_typed_by_the_field():
    c = load_config(
        "configs/dit_imagenet.py:variant=B/4",
        [
            "--config.optim.lr=3e-4",  # float
            "config.train.steps=4e5",  # int written as a float
            "train.global_batch=1_024",
            "optim.grad_clip_norm=1",  # int text into a float field
            "train.nan_check=false",
            "--config.fsdp",  # a bool alone means True
            "data.path='gs://b/latents'",  # quotes stripped
            "data.name=imagenet2012_subset",
        ],
    )
    assert c.optim.lr == 3e-4 and isinstance(c.optim.lr, float)
    assert c.train.steps == 400_000 and isinstance(c.train.steps, int)
    assert c.train.global_batch == 1024
    assert c.optim.grad_clip_norm == 1.0 and isinstance(c.optim.grad_clip_norm, float)
    assert c.train.nan_check is False and c.fsdp is True
    assert c.data.path == "gs://b/latents" and c.data.name == "imagenet2012_subset"
    assert load_config("configs/digits.py", ["runlocal=0"]).runlocal is False


def test_split_config_argv():
    spec, overrides, rest = split_config_argv(
        ["--config", "configs/digits.py:runlocal=1", "--workdir", "/tmp/w", "--config.optim.lr", "3e-4",
         "--config.fsdp", "--config.train.steps=7"]
    )
    assert spec == "configs/digits.py:runlocal=1"
    assert overrides == ["--config.optim.lr=3e-4", "--config.fsdp", "--config.train.steps=7"]
    assert rest == ["--workdir", "/tmp/w"]
    assert split_config_argv(["--config=configs/digits.py"])[0] == "configs/digits.py"


# ----------------------------------------------------------------------------------------------------------
# runlocal
# ----------------------------------------------------------------------------------------------------------
def test_runlocal_via_arg_and_via_override_shrink_alike():
    full = load_config("configs/dit_imagenet.py:variant=XL/2")
    by_arg = load_config("configs/dit_imagenet.py:variant=XL/2,runlocal=True")
    by_override = load_config("configs/dit_imagenet.py:variant=XL/2", ["--config.runlocal=True"])
    assert config_to_dict(by_arg) == config_to_dict(by_override)
    for c in (by_arg, by_override):
        assert (c.model.depth, c.model.hidden_size, c.model.num_heads, c.model.dtype) == (2, 64, 4, "float32")
        assert (c.train.global_batch, c.train.steps) == (8, 20)
        assert c.train.sample_steps <= 10 and c.train.sample_num_classes <= 4
        assert c.data.source == full.data.source and c.model.input_size == full.model.input_size  # data kept
    model = abstract_dit(by_arg.model)
    assert n_params(model) < 1e6 < n_params(abstract_dit(load_config("configs/dit_imagenet.py:variant=S/8").model))


def test_explicit_overrides_win_over_runlocal():
    c = load_config("configs/digits.py", ["train.steps=50", "--config.runlocal=true", "model.depth=3"])
    assert (c.train.steps, c.model.depth, c.train.global_batch) == (50, 3, 8)
    c = load_config("configs/digits.py:runlocal=True", ["train.global_batch=16"])
    assert (c.train.global_batch, c.train.steps) == (16, 20)


def test_apply_runlocal_is_idempotent_and_clamps_sampling():
    c = base_config()
    c.train.sample_every = 1000
    once = config_to_dict(apply_runlocal(c))
    assert config_to_dict(apply_runlocal(c)) == once
    assert c.train.sample_every == c.train.steps == 20


# ----------------------------------------------------------------------------------------------------------
# serialisation and validation
# ----------------------------------------------------------------------------------------------------------
def test_config_dict_round_trip_through_json():
    c = load_config("configs/dit_imagenet.py:variant=L/4,res=512", ["optim.lr=2e-4", "data.data_dir=/data/tfds"])
    d = json.loads(json.dumps(config_to_dict(c)))
    back = config_from_dict(d)
    assert back.is_locked and config_to_dict(back) == d == config_to_dict(c)
    assert back.optim.lr == 2e-4 and back.model.input_size == 64 and back.data.data_dir == "/data/tfds"
    validate_config(back)
    # an old checkpoint without a newer field gets the schema's default with fill_defaults
    del d["model"]["remat_policy"]
    assert config_from_dict(d, fill_defaults=True).model.remat_policy == "none"
    assert "remat_policy" not in config_from_dict(d).model


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.source=webdataset", "data.source='webdataset' is not one of"),
        ("model.dtype=float16", "model.dtype='float16' is not one of"),
        ("model.block_type=adaLN-One", "model.block_type='adaLN-One' is not one of"),
        ("model.remat_policy=some", "model.remat_policy='some' is not one of"),
        ("train.steps=-1", "train.steps=-1 must be >= 0"),
        ("train.global_batch=0", "train.global_batch=0 must be > 0"),
        ("model.variant=M/2", "unknown DiT variant 'M/2'"),
        ("diffusion.learn_sigma=false", "disagrees with model.learn_sigma"),
        ("model.input_size=30", "model.input_size=30 is not a positive multiple of patch_size 4"),
        ("data.image_size=512", "data.source='latents' needs model.input_size = data.image_size // 8"),
        ("optim.ema_decay=1.5", "optim.ema_decay=1.5 must be in"),
        ("diffusion.timestep_respacing=fast", "timestep_respacing='fast'"),
        ("mesh.fsdp=0", "mesh.fsdp=0 must be >= 1"),
    ],
)
def test_validate_config_rejects_impossible_settings(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/dit_imagenet.py:variant=B/4", [override])
    config = load_config("configs/dit_imagenet.py:variant=B/4", [override], validate=False)  # loads unchecked
    assert config.is_locked


def test_validate_config_lists_every_problem():
    with pytest.raises(ConfigError) as info:
        load_config("configs/digits.py", ["model.dtype=fp8", "train.steps=-5", "data.source=web"])
    assert str(info.value).count("\n") == 3


def test_data_space_is_told_by_the_data_source_alone():
    assert data_space(load_config("configs/digits.py")) == "pixel"
    assert data_space(load_config("configs/dit_imagenet.py:variant=B/4")) == "latent"
    assert DATA_SPACES == {"digits": "pixel", "tfds": "pixel", "folder": "pixel", "latents": "latent"}
    c = base_config()
    c.data.vae = ""  # the VAE's name plays no part: only the source says what the trainer feeds
    c.data.source = "latents"
    assert data_space(c) == "latent"
    c.data.source, c.data.vae = "tfds", "stabilityai/sd-vae-ft-ema"
    assert data_space(c) == "pixel"
    c.data.source = "webdataset"
    with pytest.raises(ConfigError, match="data.source='webdataset' is not one of"):
        data_space(c)


def test_validation_reads_the_family_and_objective_tables():
    with pytest.raises(ConfigError, match=re.escape(f"model.arch='vit' is not one of {tuple(FAMILIES)}")):
        load_config("configs/digits.py", ["model.arch=vit"])
    with pytest.raises(ConfigError, match=re.escape(f"objective='score' is not one of {tuple(OBJECTIVES)}")):
        load_config("configs/digits.py", ["objective=score"])
    with pytest.raises(ConfigError, match=re.escape(f"model.dtype='float16' is not one of {tuple(DTYPES)}")):
        load_config("configs/digits.py", ["model.dtype=float16"])
    # a family's objectives (Family.objectives)
    with pytest.raises(ConfigError, match="model.arch=ddt trains with objective=flow"):
        load_config("configs/ddt_imagenet.py:runlocal=True", ["objective=diffusion"])
    # a model key the family does not read (Family.model_keys) is named with the families that read it; a value a
    # family fixes (Family.fixed) may be restated, not changed
    with pytest.raises(ConfigError, match=r"model.num_encoder_blocks=2 does not apply: .*model.arch=ddt only"):
        load_config("configs/digits.py", ["model.num_encoder_blocks=2"])
    with pytest.raises(ConfigError, match=r"model.scan_blocks=True does not apply: .*model.arch=dit only"):
        load_config("configs/ddt_imagenet.py:runlocal=True", ["model.scan_blocks=True"])
    load_config("configs/ddt_imagenet.py:runlocal=True", ["model.learn_sigma=False"])
    with pytest.raises(ConfigError, match="model.learn_sigma must be False"):
        load_config("configs/ddt_imagenet.py:runlocal=True", ["model.learn_sigma=True"])
    # the objectives' own sections (config.<objective>.*)
    with pytest.raises(ConfigError, match=r"diffusion.use_kl=True does not apply: Gaussian diffusion settings apply "
                                          r"to objective=diffusion only"):
        load_config("configs/ddt_imagenet.py:runlocal=True", ["diffusion.use_kl=True"])


# a value of every config.model field other than the schema's (a change kwargs must see, if it reads the field)
_OTHER = dict(variant="B/4", arch=None, dtype="bfloat16", block_type="adaLN", attn_impl="cudnn", remat_policy="full")


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_a_family_reads_exactly_its_model_keys(arch):
    """Family.model_keys (what the config checks call applicable) is what Family.kwargs reads."""
    fam = FAMILIES[arch]
    m = base_config().model
    m.arch, m.variant = arch, "S/2"
    before = fam.kwargs(m)
    for field in m:
        if field == "arch":
            continue
        changed = base_config().model
        changed.arch, changed.variant = arch, "S/2"
        value = m[field]
        changed[field] = (not value if isinstance(value, bool) else value + 1 if isinstance(value, int)
                          else value / 2 if isinstance(value, float) else _OTHER[field])
        assert (fam.kwargs(changed) != before) == (field in fam.model_keys), field


# ----------------------------------------------------------------------------------------------------------
# sweeps
# ----------------------------------------------------------------------------------------------------------
def test_sweep_points_enumerate_the_papers_twelve_models():
    points = sweeps.sweep_points()
    assert [p["name"] for p in points] == [f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (8, 4, 2)]
    assert sweeps.SIZES == tuple(MODEL_SIZES)  # the model's size table is the one owner
    assert len({p["slug"] for p in points + sweeps.block_ablation()}) == 16
    for point in points:
        config = load_config(point["config"], [f"{k}={v}" for k, v in point["overrides"].items()])
        variant = point["name"].removeprefix("DiT-")
        assert config.model.variant == variant and config.model.input_size == 32
        model = abstract_dit(config.model)
        assert (model.depth, model.hidden_size, model.num_heads, model.patch_size) == tuple(
            decode_variant(variant)[k] for k in ("depth", "hidden_size", "num_heads", "patch_size"))
        assert n_params(model) / 1e6 == pytest.approx(PAPER_PARAMS_M[variant], abs=0.006), variant


def test_block_ablation_builds_the_four_designs():
    points = sweeps.block_ablation()
    assert [p["overrides"]["model.block_type"] for p in points] == ["in-context", "cross-attn", "adaLN", "adaLN-Zero"]
    for point in points:
        config = load_config(point["config"], [f"{k}={v}" for k, v in point["overrides"].items()])
        assert config.model.variant == "XL/2"
        model = abstract_dit(config.model)
        assert model.block_type == point["overrides"]["model.block_type"] and model.depth == 28


def test_sweep_cli_lines_parse_back_through_load_config(capsys):
    assert sweeps.main([]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    points = sweeps.sweep_points() + sweeps.block_ablation()
    assert len(lines) == len(points) == 16
    assert lines[0] == "--config configs/dit_imagenet.py:variant=S/8,res=256"
    assert lines[-1] == "--config configs/dit_imagenet.py:variant=XL/2,res=256 --config.model.block_type=adaLN-Zero"
    for line, point in zip(lines, points):
        spec, overrides, rest = split_config_argv(shlex.split(line))
        assert rest == [] and spec == point["config"]
        config = load_config(spec, overrides)
        assert config.model.block_type == point["overrides"].get("model.block_type", "adaLN-Zero")

    assert sweeps.main(["--json", "--sweep", "blocks", "--res", "512"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == sweeps.block_ablation(res=512)
    assert load_config(out[0]["config"]).model.input_size == 64
