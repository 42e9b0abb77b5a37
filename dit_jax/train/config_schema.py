"""The trainer's config: its schema (every field, with its default) and the checks of a config's values.

The schema is `base_config()`; each config file (configs/*.py) starts from it and sets its values explicitly, and
`dit_jax.train.config_load.load_config` locks the result, so every config the code sees has every field: code
reads `config.section.field` directly, and a default has one owner, this file. `None` is never stored: optional
strings use "" (see `data.data_dir`) and optional sizes use 0 (see `model.depth`), so every field keeps a type and
locked overrides are type-checked.

`validate_config(config, changed=keys)` raises one ConfigError that lists every problem, each naming the key and
what to type instead: impossible values, and settings the command line changed (`changed`) that the chosen model,
objective or data source would silently ignore. What depends on the model family or the objective is read from
their tables (dit_jax.models.families.FAMILIES, dit_jax.diffusion.objectives.OBJECTIVES). `check_run` adds what
only a starting run knows (the device count).

`data_space(config)` says whether the model trains on pixels or on VAE latents: the one place that tells.

`config.runlocal = True` (through the config argument, `:runlocal=True`, or an override,
`--config.runlocal=True`) shrinks any config with `apply_runlocal` to a smoke test that runs on a laptop CPU in
about a minute; explicit overrides still win over what runlocal sets.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable, Sequence

from ml_collections import ConfigDict

from dit_jax.constants import SD_VAE_SCALE, VAE_CHANNELS, VAE_DOWNSAMPLE

__all__ = [
    "ConfigError",
    "DATA_SOURCES",
    "DATA_SPACES",
    "NOISE_SCHEDULES",
    "REPA_ENCODERS",
    "apply_runlocal",
    "base_config",
    "check_run",
    "data_space",
    "flat_keys",
    "inapplicable",
    "validate_config",
]

# data.source -> the space the model trains in: latent shards are fed as SD-VAE latents, every other source as
# pixels (the trainer does not VAE-encode images on the fly)
DATA_SPACES: dict[str, str] = {"digits": "pixel", "tfds": "pixel", "folder": "pixel", "latents": "latent"}
DATA_SOURCES = tuple(DATA_SPACES)
NOISE_SCHEDULES = ("linear", "squaredcos_cap_v2")
REPA_ENCODERS = ("dinov2_vitb14", "random")


def __getattr__(name: str) -> Any:
    # MODEL_DTYPES (the model.dtype names): those of dit_jax.models.families.DTYPES, their owner, which imports jax,
    # so they are read on first use (`from dit_jax.train.config_schema import MODEL_DTYPES` works)
    if name == "MODEL_DTYPES":
        from dit_jax.models.families import DTYPES

        return tuple(DTYPES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ConfigError(ValueError):
    """A config that cannot be loaded, overridden or trained with; the message says what to change."""


# ==========================================================================================================
# The schema
# ==========================================================================================================
def base_config() -> ConfigDict:
    """Every field the trainer reads, with the paper's values (DiT paper, Sec. 4 "Training") where it has one.

    Config files start from this and set their own values explicitly, so that reading a config file shows the
    whole recipe; adding a field here makes it overridable everywhere.
    """
    config = ConfigDict()
    config.seed = 0
    config.runlocal = False  # True: shrink to a one-minute CPU smoke test (apply_runlocal)

    config.objective = "diffusion"  # diffusion (DiT's Gaussian diffusion, hybrid loss) | flow (DDT's flow matching)

    config.model = ConfigDict()
    config.model.arch = "dit"  # dit | ddt (dit_jax.models.ddt: condition encoder + velocity decoder)
    config.model.variant = "XL/2"  # "S|B|L|XL / 2|4|8" (decode_variant); the sizes below override it when > 0
    config.model.num_encoder_blocks = 0  # ddt: encoder blocks (0 = the variant's: XL 22, L 20, B and S 8)
    config.model.depth = 0  # 0 = the variant's
    config.model.hidden_size = 0  # 0 = the variant's
    config.model.num_heads = 0  # 0 = the variant's
    config.model.patch_size = 0  # 0 = the variant's
    config.model.input_size = 32  # side of the model input: latents (res // 8) or pixels
    config.model.in_channels = 4
    config.model.num_classes = 1000
    config.model.learn_sigma = True
    config.model.class_dropout_prob = 0.1
    config.model.block_type = "adaLN-Zero"  # adaLN-Zero | adaLN | cross-attn | in-context
    config.model.dtype = "float32"  # matmul compute dtype: float32 | bfloat16 (params stay float32)
    config.model.attn_impl = "xla"  # xla | cudnn (NVIDIA GPUs, bf16) | splash (TPU Pallas, under shard_map)
    config.model.scan_blocks = False  # stacked blocks under lax.scan (compile time O(1) in depth)
    config.model.remat_policy = "none"  # none | full | dots | dots_no_batch

    # create_diffusion(...) arguments for training (sampling respaces with train.sample_steps)
    config.diffusion = ConfigDict()
    config.diffusion.timestep_respacing = ""
    config.diffusion.noise_schedule = "linear"
    config.diffusion.learn_sigma = True
    config.diffusion.use_kl = False
    config.diffusion.sigma_small = False
    config.diffusion.predict_xstart = False
    config.diffusion.rescale_learned_sigmas = False
    config.diffusion.diffusion_steps = 1000

    # flow matching (objective=flow): x_t = t x + (1 - t) eps, v = x - eps (dit_jax.diffusion.flow)
    config.flow = ConfigDict()
    config.flow.t_dist = "logit_normal"  # logit_normal (sigmoid of N(0, 1), DDT) | uniform
    config.flow.time_scale = 1.0  # the model sees t * time_scale (1 for DDT)

    # REPA (objective=flow, model.arch=ddt): align encoder block `layer` to a frozen target encoder
    config.repa = ConfigDict()
    config.repa.weight = 0.0  # 0 = off; DDT: 0.5
    config.repa.layer = 8  # 1-based encoder block whose output is aligned
    config.repa.encoder = "dinov2_vitb14"  # dinov2_vitb14 | random (a tiny frozen random ViT, for tests)
    config.repa.encoder_path = ""  # local dinov2_vitb14_pretrain.pth (nothing is downloaded)
    config.repa.proj_dim = 768  # the target features' width (ViT-B: 768)
    config.repa.proj_hidden = 0  # projector hidden width; 0 = the model width

    config.data = ConfigDict()
    config.data.source = "latents"  # digits | tfds | folder | latents
    config.data.name = "imagenet2012"  # tfds dataset name
    config.data.split = "train"
    config.data.data_dir = ""  # tfds data_dir; "" = the library default (None)
    config.data.path = ""  # image folder or latent ArrayRecord directory
    config.data.image_size = 256  # pixel side (ADM centre crop); the latents' source images for "latents"
    config.data.channels = 3  # image channels
    config.data.num_classes = 1000
    config.data.random_flip = True
    config.data.num_workers = 0  # grain worker processes per host (0 = in the main process)
    config.data.prefetch = 2  # batches transferred to the devices ahead of the step (0: none)
    config.data.latent_scale = SD_VAE_SCALE  # z = latent_scale * (mean + std * eps), drawn fresh every step
    config.data.vae = "stabilityai/sd-vae-ft-ema"

    config.optim = ConfigDict()
    config.optim.lr = 1e-4  # AdamW, constant after warm-up
    config.optim.weight_decay = 0.0  # pass explicitly: optax.adamw defaults to 1e-4
    config.optim.b1 = 0.9
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.grad_clip_norm = 0.0  # global-norm clipping; 0 = off (the paper does not clip)
    config.optim.warmup_steps = 0  # linear warm-up from 0; 0 = off (the paper has none)
    config.optim.ema_decay = 0.9999  # ema = d * ema + (1 - d) * params every step, from the initial params

    config.train = ConfigDict()
    config.train.global_batch = 256
    config.train.steps = 400_000
    config.train.log_every = 100
    config.train.ckpt_every = 50_000  # 0 = only at the end
    config.train.keep_ckpts = 3
    config.train.sample_every = 0  # steps between EMA sample grids; 0 = off
    # how the EMA samples of the grids and of eval_every are drawn (dit_jax.sampling.SampleSettings)
    config.train.sample_sampler = ""  # "" = the objective's default (ddpm; euler for flow); any of its samplers
    #                                   (a config file's sampler of another objective gives way to the default)
    config.train.sample_cfg_scale = 4.0
    config.train.sample_steps = 250  # the sampler's steps (ddpm/ddim respaced; model calls for the others)
    config.train.sample_per_class = 4
    config.train.sample_num_classes = 8  # the grid shows this many classes (rows)
    # sample quality during training (dit_jax.train.samples.QualityEval): every eval_every steps, eval_num_samples
    # EMA samples (classes in turn, the same noise every time) are scored on process 0 and logged as metrics
    config.train.eval_every = 0  # 0 = off
    config.train.eval_num_samples = 1000
    config.train.eval_reference = ""  # ADM reference batch .npz: Inception FID against it ("" = the digits FD,
    #                                   for data.source=digits only)
    config.train.eval_inception = ""  # pt_inception-2015-12-05 .pth for the FID ("" = $DIT_JAX_INCEPTION_WEIGHTS)
    config.train.nan_check = True  # raise on a non-finite loss at log steps

    config.mesh = ConfigDict()
    config.mesh.data = -1  # -1 = every device not used by fsdp
    config.mesh.fsdp = 1
    config.fsdp = False  # shard params (and optimizer / EMA state) over the 'fsdp' axis
    return config


def apply_runlocal(config: ConfigDict) -> ConfigDict:
    """Shrink `config` in place to a smoke test that runs on a CPU in about a minute; returns it.

    Tiny model (depth 2, width 64, 4 heads; the variant's patch size), batch 8, 20 steps, fp32, small sample
    grids, no quality evaluation (train.eval_every=0; at most 32 samples when an override turns it on), REPA (when on) against a tiny frozen random ViT aligned at
    block 1. The data source, image size and
    number of classes are kept, so the data path is exercised as is. Idempotent.
    """
    config.runlocal = True
    m, t, r = config.model, config.train, config.repa
    m.depth, m.hidden_size, m.num_heads = 2, 64, 4
    m.dtype, m.attn_impl, m.remat_policy = "float32", "xla", "none"
    config.data.num_workers = 0
    t.global_batch, t.steps, t.log_every, t.ckpt_every, t.keep_ckpts = 8, 20, 5, 10, 2
    t.sample_steps, t.sample_per_class = 10, 2
    t.sample_num_classes = min(4, int(m.num_classes))
    if t.sample_every > t.steps:
        t.sample_every = t.steps
    t.eval_every = 0  # no quality evaluation (its yardsticks cost more than the smoke run); an override turns it on
    t.eval_num_samples = min(t.eval_num_samples, 32)
    r.encoder = "random"  # a tiny frozen random ViT for DINOv2: nothing to download or load
    r.proj_dim = 64
    r.layer = 1  # the tiny model's only encoder block
    return config


def flat_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf field as a dotted key ("optim.lr", ...)."""
    out = []
    for key, value in config.items():
        full = f"{prefix}{key}"
        if isinstance(value, ConfigDict):
            out += flat_keys(value, full + ".")
        else:
            out.append(full)
    return out


def data_space(config: ConfigDict) -> str:
    """"pixel" or "latent": what the model of `config` reads and writes, by data.source (DATA_SPACES). Pixel-space
    models sample images directly; latent-space ones sample SD-VAE latents (config.data.vae decodes them, scaled
    by config.data.latent_scale). ConfigError for an unknown data.source."""
    source = config.data.source
    if source not in DATA_SPACES:
        raise ConfigError(f"data.source={source!r} is not one of {DATA_SOURCES}")
    return DATA_SPACES[source]


# ==========================================================================================================
# Validation
# ==========================================================================================================
def _raise(errors: list[str]) -> None:
    if errors:
        raise ConfigError("invalid config:\n  " + ";\n  ".join(errors))


def _leaf(config: ConfigDict, key: str) -> Any:
    node = config
    for part in key.split("."):
        node = node[part]
    return node


# ==========================================================================================================
# Settings that do not apply
# ==========================================================================================================
def _sources(space: str) -> str:
    """"'latents'" or "'digits', 'tfds' or 'folder'": the data sources of a space, for messages."""
    names = [repr(k) for k, v in DATA_SPACES.items() if v == space]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _repa_archs() -> str:
    """"ddt": the families REPA applies to (Family.repa), for messages."""
    from dit_jax.models.families import FAMILIES

    return " or ".join(f.name for f in FAMILIES.values() if f.repa)


def _model_rules(config: ConfigDict) -> list[tuple[Callable[[str], bool], bool, str]]:
    """The model.* keys that only some families read (Family.model_keys) or that a family fixes (Family.fixed)."""
    from dit_jax.models.families import FAMILIES  # imports jax: keep it lazy

    m = config.model
    fam = FAMILIES.get(m.arch)
    if fam is None:  # validate_config reports the unknown arch
        return []
    rules = []
    for field in sorted({k for f in FAMILIES.values() for k in f.model_keys} - set(fam.model_keys)):
        key = f"model.{field}"
        if field in fam.fixed:
            value, why = fam.fixed[field]
            rules.append(((lambda k, key=key: k == key), m[field] == value,
                          f"a {fam.title} (model.arch={fam.name!r}) {why}: {key} must be {value!r}"))
        else:
            readers = " or ".join(f.name for f in FAMILIES.values() if field in f.model_keys)
            rules.append(((lambda k, key=key: k == key), False,
                          f"this setting applies to model.arch={readers} only, and this model is "
                          f"model.arch={fam.name!r} (a {fam.title} does not read it)"))
    return rules


def _applicability(config: ConfigDict) -> list[tuple[Callable[[str], bool], bool, str]]:
    """(matches key, applies, why not) for the keys whose use depends on other settings."""
    from dit_jax.diffusion.objectives import OBJECTIVES, SAMPLERS  # imports jax: keep it lazy

    m, data = config.model, config.data
    objective, source = config.objective, data.source
    # a config file's sampler of another objective (objective changed on the command line) gives way to the
    # objective's default (dit_jax.sampling.settings.run_sample_settings); one typed on the command line is an error
    sampler = config.train.sample_sampler
    own_samplers = OBJECTIVES[objective].samplers if objective in OBJECTIVES else ()
    sampler_objective = next((o.name for o in OBJECTIVES.values() if sampler in o.samplers), "")
    space = DATA_SPACES.get(source)  # None: validate_config reports the unknown source
    repa_on = config.repa.weight > 0

    def one_of(*keys: str) -> Callable[[str], bool]:
        return lambda key: key in keys

    def section(name: str) -> Callable[[str], bool]:
        def matches(key: str) -> bool:
            # diffusion.learn_sigma mirrors model.learn_sigma: setting the two together stays harmless
            mirror = key == "diffusion.learn_sigma" and config.diffusion.learn_sigma == m.learn_sigma
            return key.startswith(f"{name}.") and not mirror
        return matches

    objective_rules = [
        (section(o.name), objective == o.name,
         f"{o.title} settings apply to objective={o.name} only, and this config trains objective={objective!r} "
         f"(its settings are {objective}.*; add --config.objective={o.name}, or drop the flag)")
        for o in OBJECTIVES.values()
    ]
    return objective_rules + _model_rules(config) + [
        (lambda key: key.startswith("repa.") and key != "repa.weight", repa_on,
         f"REPA settings apply only with REPA on (repa.weight > 0, which needs model.arch={_repa_archs()} and "
         f"objective=flow)"),
        (one_of("data.name", "data.split", "data.data_dir"), source in ("tfds", "latents"),
         f"the TFDS dataset settings apply to data.source='tfds' (read) and 'latents' (recorded: the dataset the "
         f"latents come from) only, and this config reads data.source={source!r}"),
        (one_of("data.path"), source in ("folder", "latents"),
         f"data.path applies to data.source='folder' or 'latents' only, and this config reads data.source={source!r}"),
        (one_of("data.latent_scale", "data.vae"), space != "pixel",
         f"this setting applies to latent-space data only (data.source={_sources('latent')}: VAE latents; the "
         f"trainer feeds every other source as pixels), and this config reads data.source={source!r}"),
        (one_of("train.sample_every"), space != "latent" or config.train.sample_every == 0,
         "the trainer draws sample grids for pixel-space data only (decoding latents needs the VAE): sample a "
         "checkpoint with `dit-jax sample` instead"),
        (one_of("train.sample_sampler"), not sampler or sampler not in SAMPLERS or sampler in own_samplers,
         f"it samples objective={sampler_objective!r}, and this config trains objective={objective!r}: one of "
         f"{own_samplers}, or '' for its default"),
        (one_of("train.eval_num_samples", "train.eval_reference", "train.eval_inception"), config.train.eval_every > 0,
         "quality evaluation is off (train.eval_every=0): set train.eval_every to the steps between evaluations"),
        (one_of("train.eval_inception"), bool(config.train.eval_reference),
         "the Inception weights serve the FID against train.eval_reference, and none is set (the digits FD needs "
         "no Inception)"),
    ]


def inapplicable(config: ConfigDict, changed: Iterable[str]) -> list[str]:
    """'KEY: why' for each key of `changed` that the config's model, objective or data source does not use."""
    rules = _applicability(config)
    out = []
    for key in sorted(set(changed)):
        for matches, applies, why in rules:
            if matches(key) and not applies:
                out.append(f"{key}={_leaf(config, key)!r} does not apply: {why}")
                break
    return out


# ==========================================================================================================
# Impossible values
# ==========================================================================================================
def validate_config(config: ConfigDict, *, changed: Iterable[str] = ()) -> None:
    """Raise ConfigError listing every impossible setting, and every key of `changed` (the keys the command line
    changed) that does not apply to the chosen model, objective or data source. global_batch divisibility by the
    device count is `check_run`'s (the trainer knows the devices)."""
    from dit_jax.diffusion.flow import T_DISTS  # imports jax: keep it lazy
    from dit_jax.diffusion.objectives import OBJECTIVES, SAMPLERS
    from dit_jax.models.dit import BLOCK_TYPES, REMAT_POLICIES
    from dit_jax.models.families import DTYPES, FAMILIES
    from dit_jax.models.layers import ATTENTION_IMPLS

    errors: list[str] = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def one_of(key: str, value: Any, allowed: Sequence[Any]) -> None:
        check(value in allowed, f"{key}={value!r} is not one of {tuple(allowed)}")

    m, d, data, o, t = config.model, config.diffusion, config.data, config.optim, config.train

    # --- every number finite (a config file can hold nan / inf; the override parser refuses them)
    for key in flat_keys(config):
        value = _leaf(config, key)
        if isinstance(value, float) and not math.isfinite(value):
            errors.append(f"{key}={value} must be a finite number")

    # --- model
    one_of("model.arch", m.arch, tuple(FAMILIES))
    fam = FAMILIES.get(m.arch)
    arch: dict[str, int] = {}
    if fam is not None:
        try:
            arch = fam.decode_variant(m.variant)
        except ValueError as e:
            errors.append(f"model.variant: {e}")
    for k in ("depth", "hidden_size", "num_heads", "patch_size"):
        check(m[k] >= 0, f"model.{k}={m[k]} must be >= 0 (0 = the variant's)")
        if m[k] > 0:
            arch[k] = m[k]
    if arch.get("hidden_size", 0) > 0 and arch.get("num_heads", 0) > 0:  # a bad variant leaves the explicit sizes
        check(arch["hidden_size"] % arch["num_heads"] == 0,
              f"model hidden_size {arch['hidden_size']} is not divisible by num_heads {arch['num_heads']}")
    if arch.get("patch_size", 0) > 0:
        check(m.input_size > 0 and m.input_size % arch["patch_size"] == 0,
              f"model.input_size={m.input_size} is not a positive multiple of patch_size {arch['patch_size']}")
    check(m.in_channels > 0, f"model.in_channels={m.in_channels} must be > 0")
    check(m.num_classes > 0, f"model.num_classes={m.num_classes} must be > 0")
    check(0.0 <= m.class_dropout_prob < 1.0, f"model.class_dropout_prob={m.class_dropout_prob} must be in [0, 1)")
    one_of("model.block_type", m.block_type, BLOCK_TYPES)
    one_of("model.dtype", m.dtype, tuple(DTYPES))
    one_of("model.attn_impl", m.attn_impl, ATTENTION_IMPLS)
    one_of("model.remat_policy", m.remat_policy, tuple(REMAT_POLICIES))

    # --- objective, the family's objectives, the encoder split, flow, REPA
    one_of("objective", config.objective, tuple(OBJECTIVES))
    if fam is not None:
        check(config.objective in fam.objectives,
              f"model.arch={fam.name} trains with objective={' or '.join(fam.objectives)}")
    encoder_blocks = 0
    if fam is not None and "num_encoder_blocks" in fam.model_keys:
        depth = max(arch.get("depth", 1), 1)
        check(0 <= m.num_encoder_blocks < depth,
              f"model.num_encoder_blocks={m.num_encoder_blocks} must be in [0, depth={depth}) (0 = the variant's)")
        encoder_blocks = min(m.num_encoder_blocks or arch.get("num_encoder_blocks", 0), depth - 1)
    if config.objective == "flow":
        one_of("flow.t_dist", config.flow.t_dist, T_DISTS)
        check(config.flow.time_scale > 0, f"flow.time_scale={config.flow.time_scale} must be > 0")
        if fam is not None and "learn_sigma" in fam.model_keys:  # a velocity model: no learned sigma
            check(not m.learn_sigma, f"a {fam.title} trained with objective=flow needs model.learn_sigma=False")
    r = config.repa
    check(r.weight >= 0, f"repa.weight={r.weight} must be >= 0 (0 = off)")
    if r.weight > 0:
        check(fam is not None and fam.repa and config.objective == "flow",
              f"repa.weight > 0 needs model.arch={_repa_archs()}, objective=flow")
        if fam is not None and fam.repa:
            check(1 <= r.layer <= encoder_blocks,
                  f"repa.layer={r.layer} must be in [1, {encoder_blocks}] (a 1-based block of the model's "
                  f"{encoder_blocks} encoder blocks)")
        one_of("repa.encoder", r.encoder, REPA_ENCODERS)
        check(r.proj_dim > 0, f"repa.proj_dim={r.proj_dim} must be > 0")
        check(r.proj_hidden >= 0, f"repa.proj_hidden={r.proj_hidden} must be >= 0 (0 = the model width)")
        # repa.encoder_path is checked when a run starts fresh (a resume reads the encoder from the checkpoint),
        # and latent shards' images when the data is opened (extract-latents --store-images)

    # --- diffusion
    one_of("diffusion.noise_schedule", d.noise_schedule, NOISE_SCHEDULES)
    check(d.diffusion_steps > 0, f"diffusion.diffusion_steps={d.diffusion_steps} must be > 0")
    check(config.objective != "diffusion" or d.learn_sigma == m.learn_sigma,
          f"diffusion.learn_sigma={d.learn_sigma} disagrees with model.learn_sigma={m.learn_sigma}")
    check(re.fullmatch(r"|ddim\d+|\d+(,\d+)*", d.timestep_respacing) is not None,
          f"diffusion.timestep_respacing={d.timestep_respacing!r} must be '', 'ddimN' or counts like '250' / '10,15,20'")

    # --- data
    one_of("data.source", data.source, DATA_SOURCES)
    check(data.num_classes == m.num_classes,
          f"data.num_classes={data.num_classes} disagrees with model.num_classes={m.num_classes}")
    check(data.image_size > 0 and data.channels > 0, "data.image_size and data.channels must be > 0")
    check(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0")
    check(data.prefetch >= 0, f"data.prefetch={data.prefetch} must be >= 0 (0 = no prefetch)")
    check(data.latent_scale > 0, f"data.latent_scale={data.latent_scale} must be > 0")
    space = DATA_SPACES.get(data.source)  # None: an unknown source (reported above)
    if space == "latent":  # the model reads SD-VAE latents of data.image_size images
        check(m.input_size * VAE_DOWNSAMPLE == data.image_size and m.in_channels == VAE_CHANNELS,
              f"data.source={data.source!r} needs model.input_size = data.image_size // {VAE_DOWNSAMPLE} "
              f"({data.image_size // VAE_DOWNSAMPLE}) and model.in_channels = {VAE_CHANNELS}; "
              f"got ({m.input_size}, {m.in_channels})")
    elif space == "pixel" and not (m.input_size == data.image_size and m.in_channels == data.channels):
        if data.source == "digits":
            errors.append(f"data.source='digits' trains in pixel space: model.input_size/in_channels ({m.input_size}, "
                          f"{m.in_channels}) must equal data.image_size/channels ({data.image_size}, {data.channels})")
        else:  # images the trainer could only use as latents
            errors.append(f"data.source={data.source!r} yields {data.image_size}x{data.image_size}x{data.channels} "
                          f"images, and the trainer does not VAE-encode them on the fly: extract latents with "
                          f"`dit-jax extract-latents` and train with data.source={_sources('latent')}, or train in pixel "
                          f"space (model.input_size={data.image_size}, model.in_channels={data.channels})")
    # data.path / data_dir are checked when the data is opened (a runlocal smoke test may not have them).

    # --- optimizer
    check(o.lr >= 0, f"optim.lr={o.lr} must be >= 0")
    check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    check(0 <= o.b1 < 1 and 0 <= o.b2 < 1, f"optim.b1={o.b1} and optim.b2={o.b2} must be in [0, 1)")
    check(o.eps > 0, f"optim.eps={o.eps} must be > 0")
    check(o.grad_clip_norm >= 0, f"optim.grad_clip_norm={o.grad_clip_norm} must be >= 0 (0 = off)")
    check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    check(0 <= o.ema_decay <= 1, f"optim.ema_decay={o.ema_decay} must be in [0, 1]")

    # --- training loop
    check(t.global_batch > 0, f"train.global_batch={t.global_batch} must be > 0")
    check(t.steps >= 0, f"train.steps={t.steps} must be >= 0")
    check(t.log_every > 0, f"train.log_every={t.log_every} must be > 0")
    check(t.ckpt_every >= 0, f"train.ckpt_every={t.ckpt_every} must be >= 0 (0 = only at the end)")
    check(t.keep_ckpts >= 1, f"train.keep_ckpts={t.keep_ckpts} must be >= 1")
    check(t.sample_every >= 0, f"train.sample_every={t.sample_every} must be >= 0 (0 = off)")
    check(t.sample_cfg_scale >= 0, f"train.sample_cfg_scale={t.sample_cfg_scale} must be >= 0 (1 = no guidance)")
    check(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (0 = off)")
    check(not t.sample_sampler or t.sample_sampler in SAMPLERS,
          f"train.sample_sampler={t.sample_sampler!r} is not one of {SAMPLERS} ('' = the objective's default)")
    if t.eval_every > 0:
        check(t.eval_num_samples >= 2, f"train.eval_num_samples={t.eval_num_samples} must be >= 2 (a Frechet "
              f"distance needs a covariance)")
        check(bool(t.eval_reference) or data.source == "digits" or data.source not in DATA_SPACES,  # else: above
              "train.eval_every > 0 needs train.eval_reference, an ADM reference batch .npz (e.g. "
              "VIRTUAL_imagenet256_labeled.npz), for the Inception FID; only data.source='digits' is scored "
              "without one (the digits FD)")
    if t.sample_every > 0 or t.eval_every > 0:
        if config.objective == "diffusion":
            check(0 < t.sample_steps <= d.diffusion_steps,
                  f"train.sample_steps={t.sample_steps} must be in [1, diffusion.diffusion_steps={d.diffusion_steps}]")
        else:
            check(t.sample_steps > 0, f"train.sample_steps={t.sample_steps} must be > 0")
        if t.sample_every > 0:
            check(t.sample_per_class > 0, f"train.sample_per_class={t.sample_per_class} must be > 0")
            check(0 < t.sample_num_classes <= m.num_classes,
                  f"train.sample_num_classes={t.sample_num_classes} must be in [1, model.num_classes="
                  f"{m.num_classes}]")
        check(t.sample_cfg_scale == 1 or m.class_dropout_prob > 0,
              f"train.sample_cfg_scale={t.sample_cfg_scale} needs model.class_dropout_prob > 0 (classifier-free "
              f"guidance uses the null class, which a model trained without label dropout lacks): set "
              f"train.sample_cfg_scale=1")
        if not errors:  # the sampler's own rule for its steps (a respaced ddpm/ddim must fit the process)
            from dit_jax.sampling.settings import run_sample_settings

            try:
                run_sample_settings(config)
            except ValueError as e:
                errors.append(f"train.sample_sampler={t.sample_sampler!r} with train.sample_steps={t.sample_steps}: "
                              f"{e}")

    # --- mesh
    check(config.mesh.data == -1 or config.mesh.data >= 1, f"mesh.data={config.mesh.data} must be -1 (all) or >= 1")
    check(config.mesh.fsdp >= 1, f"mesh.fsdp={config.mesh.fsdp} must be >= 1")

    errors += inapplicable(config, changed)
    _raise(errors)


def check_run(config: ConfigDict, device_count: int) -> None:
    """What only a starting run can check: raise ConfigError unless the mesh (mesh.data x mesh.fsdp) covers the
    `device_count` devices of the job and train.global_batch splits evenly over them."""
    errors: list[str] = []
    data, fsdp = config.mesh.data, config.mesh.fsdp
    if fsdp >= 1 and device_count % fsdp:
        errors.append(f"mesh.fsdp={fsdp} does not divide the {device_count} devices of this job")
    elif data != -1 and data * fsdp != device_count:
        errors.append(f"mesh.data={data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but this job has "
                      f"{device_count}: set mesh.data=-1 (every device not used by fsdp)")
    if config.train.global_batch % device_count:
        errors.append(f"train.global_batch={config.train.global_batch} is not divisible by the {device_count} "
                      f"devices of this job: use a multiple of {device_count}")
    _raise(errors)
