"""Bad inputs to `dit-jax train`, `demo`, `bench` and `flops`: each fails with one line that names the problem
(dit_jax/errors.py's convention: non-zero exit, 2 for usage errors, no traceback), before any training or
compiling; and the strict parser of config arguments and overrides (configs/common.parse_arg,
dit_jax.train.config_load.parse_value)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_errors import REPO, assert_clean_error, run_cli, run_cli_subprocess, unwritable_dir

DIGITS = "configs/digits.py:runlocal=True"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """Paths of the wrong kinds: a plain file, a folder named like a config, a .py that is not Python, a .py
    without get_config, a config whose get_config takes no argument, and a folder that cannot be written."""
    (tmp_path / "afile").write_text("not a folder\n")
    (tmp_path / "folder.py").mkdir()
    (tmp_path / "ckfile").mkdir()
    (tmp_path / "ckfile" / "checkpoints").write_text("")
    (tmp_path / "jsondir" / "metrics.jsonl").mkdir(parents=True)
    (tmp_path / "notpython.py").write_text("this is = not python\n")
    (tmp_path / "noget.py").write_text("X = 1\n")
    (tmp_path / "noarg.py").write_text("def get_config():\n    raise AssertionError('not called')\n")
    return dict(file=str(tmp_path / "afile"), folder_py=str(tmp_path / "folder.py"),
                notpython=str(tmp_path / "notpython.py"), noget=str(tmp_path / "noget.py"),
                noarg=str(tmp_path / "noarg.py"), missing=str(tmp_path / "missing.py"), tmp=str(tmp_path),
                unwritable=str(unwritable_dir(tmp_path)))


def _fill(argv: list[str], files: dict[str, str]) -> list[str]:
    return [a.format(**files) for a in argv]


# ----------------------------------------------------------------------------------------------------------
# dit-jax train: every case fails before the trainer starts (in this process: nothing is trained)
# ----------------------------------------------------------------------------------------------------------
TRAIN_CASES = [
    # the examples
    ("runlocal=ture", ["--config", "configs/digits.py:runlocal=ture"], ["runlocal", "ture", "bool"], 2),
    ("workdir is a file", ["--config", DIGITS, "--workdir", "{file}"], ["--workdir", "is a file"], 1),
    ("override without =", ["--config", DIGITS, "--config.train.steps"], ["train.steps", "--config.train.steps="], 2),
    ("override value as next word", ["--config", DIGITS, "--config.train.steps", "5"], ["--config.train.steps=5"], 2),
    ("override without --config.", ["--config", DIGITS, "train.steps=5"], ["--config.train.steps=5"], 2),
    # the config file: missing, wrong kind, a folder
    ("missing config", ["--config", "{missing}"], ["not found", "missing.py"], 2),
    ("config not python", ["--config", "{notpython}"], ["not valid Python", "notpython.py"], 2),
    ("config not .py", ["--config", "README.md"], ["README.md", "path/to/config.py"], 2),
    ("config without get_config", ["--config", "{noget}"], ["no get_config"], 2),
    ("config folder named .py", ["--config", "{folder_py}"], ["is a folder"], 2),
    ("config folder", ["--config", "configs"], ["is a folder", "configs/digits.py"], 2),
    ("config takes no argument", ["--config", "{noarg}:runlocal=True"], ["takes no argument", ":runlocal=True"], 2),
    # the output folder
    ("unwritable workdir", ["--config", DIGITS, "--workdir", "{unwritable}/run"], ["--workdir", "cannot create"], 1),
    ("workdir under a file", ["--config", DIGITS, "--workdir", "{file}/run"], ["--workdir", "afile"], 1),
    ("checkpoints is a file", ["--config", DIGITS, "--workdir", "{tmp}/ckfile"], ["checkpoints", "is a file"], 1),
    ("metrics.jsonl is a folder", ["--config", DIGITS, "--workdir", "{tmp}/jsondir"], ["metrics.jsonl", "a folder"], 1),
    # config arguments: unknown keys, numbers that are not numbers, values that cannot work
    ("unknown config argument", ["--config", "configs/digits.py:runlocl=True"],
     ["unknown config argument", "runlocl"], 2),
    ("config argument without =", ["--config", "configs/digits.py:runlocal"], ["runlocal", "key=value"], 2),
    ("unknown variant", ["--config", "configs/dit_imagenet.py:variant=XL/3"], ["variant", "XL/3"], 2),
    ("unknown DDT variant", ["--config", "configs/ddt_imagenet.py:variant=M/2"], ["variant", "M/2"], 2),
    ("res not a multiple", ["--config", "configs/dit_imagenet.py:res=300"], ["res=300", "multiple of 16"], 2),
    ("res not a number", ["--config", "configs/dit_imagenet.py:res=abc"], ["'res'", "int", "abc"], 2),
    ("res not an integer", ["--config", "configs/ddt_imagenet.py:res=256.5"], ["'res'", "256.5"], 2),
    ("unknown source", ["--config", "configs/dit_imagenet.py:source=webdataset"], ["source", "webdataset"], 2),
    ("repa not a bool", ["--config", "configs/ddt_imagenet.py:repa=maybe"], ["repa", "bool", "maybe"], 2),
    # overrides: booleans, numbers, enumerations
    ("bool override", ["--config", DIGITS, "--config.train.nan_check=ture"], ["train.nan_check", "bool"], 2),
    ("int override", ["--config", DIGITS, "--config.train.steps=ten"], ["train.steps", "int", "ten"], 2),
    ("non-finite override", ["--config", DIGITS, "--config.optim.lr=inf"], ["optim.lr", "finite"], 2),
    ("dtype", ["--config", DIGITS, "--config.model.dtype=float16"], ["model.dtype", "float16", "bfloat16"], 2),
    ("attn_impl", ["--config", DIGITS, "--config.model.attn_impl=foo"], ["model.attn_impl", "foo", "xla"], 2),
    ("data source", ["--config", DIGITS, "--config.data.source=x"], ["data.source", "latents"], 2),
    ("objective", ["--config", DIGITS, "--config.objective=x"], ["objective", "diffusion"], 2),
    ("unknown key", ["--config", DIGITS, "--config.optim.lrr=1"], ["optim.lrr", "optim.lr"], 2),
    # values that would crash later
    ("negative steps", ["--config", DIGITS, "--config.train.steps=-1"], ["train.steps=-1"], 2),
    ("zero batch", ["--config", DIGITS, "--config.train.global_batch=0"], ["train.global_batch=0"], 2),
    ("zero log_every", ["--config", DIGITS, "--config.train.log_every=0"], ["train.log_every=0"], 2),
    ("zero keep_ckpts", ["--config", DIGITS, "--config.train.keep_ckpts=0"], ["train.keep_ckpts=0"], 2),
    ("negative sample_every", ["--config", DIGITS, "--config.train.sample_every=-1"], ["train.sample_every=-1"], 2),
    ("negative warmup", ["--config", DIGITS, "--config.optim.warmup_steps=-1"], ["optim.warmup_steps=-1"], 2),
    ("negative prefetch", ["--config", DIGITS, "--config.data.prefetch=-1"], ["data.prefetch=-1"], 2),
    ("negative cfg scale", ["--config", DIGITS, "--config.train.sample_cfg_scale=-1"], ["sample_cfg_scale"], 2),
    ("guidance without a null class", ["--config", DIGITS, "--config.train.sample_every=5",
                                       "--config.model.class_dropout_prob=0"], ["class_dropout_prob"], 2),
    ("batch not divisible by the devices", ["--config", DIGITS, "--config.train.global_batch=12"],
     ["train.global_batch=12", "devices"], 2),
    ("mesh larger than the job", ["--config", DIGITS, "--config.mesh.data=3"], ["mesh.data=3", "devices"], 2),
    ("REPA block beyond the encoder", ["--config", "configs/ddt_imagenet.py:runlocal=True", "--config.repa.layer=5"],
     ["repa.layer=5", "encoder blocks"], 2),
    ("images the trainer cannot encode", ["--config", "configs/dit_imagenet.py:runlocal=True,source=folder",
                                          "--config.data.path={tmp}"], ["VAE-encode", "extract-latents"], 2),
    # settings that do not apply to the chosen model / objective / data (silently ignored before)
    ("flow.* with diffusion", ["--config", DIGITS, "--config.flow.t_dist=uniform"],
     ["flow.t_dist", "does not apply", "objective=flow"], 2),
    ("repa.* with REPA off", ["--config", DIGITS, "--config.repa.layer=3"], ["repa.layer", "does not apply"], 2),
    ("encoder blocks on a DiT", ["--config", DIGITS, "--config.model.num_encoder_blocks=2"],
     ["model.num_encoder_blocks", "model.arch=ddt"], 2),
    ("diffusion.* with flow", ["--config", "configs/ddt_imagenet.py:runlocal=True",
                               "--config.diffusion.noise_schedule=squaredcos_cap_v2"],
     ["diffusion.noise_schedule", "does not apply", "objective=diffusion"], 2),
    ("block_type on a DDT", ["--config", "configs/ddt_imagenet.py:runlocal=True", "--config.model.block_type=adaLN"],
     ["model.block_type", "model.arch=dit"], 2),
    ("learned sigma on a DDT", ["--config", "configs/ddt_imagenet.py:runlocal=True", "--config.model.learn_sigma=True"],
     ["model.learn_sigma", "velocity"], 2),
    ("data.path with digits", ["--config", DIGITS, "--config.data.path=/data/x"], ["data.path", "does not apply"], 2),
    ("latent_scale with digits", ["--config", DIGITS, "--config.data.latent_scale=0.5"], ["data.latent_scale"], 2),
    ("sample grids of latents", ["--config", "configs/dit_imagenet.py:runlocal=True", "--config.train.sample_every=5"],
     ["train.sample_every", "dit-jax sample"], 2),
    # the samplers of the grids and of the quality evaluation, and what the evaluation scores with
    ("a flow sampler for a diffusion run", ["--config", DIGITS, "--config.train.sample_sampler=euler"],
     ["train.sample_sampler='euler'", "objective='diffusion'", "dpmsolver++"], 2),
    ("respaced steps that do not fit", ["--config", DIGITS, "--config.train.sample_every=5",
                                        "--config.train.sample_sampler=ddim", "--config.train.sample_steps=999"],
     ["train.sample_steps=999", "999 steps out of 1000"], 2),
    ("FID without a reference batch",
     ["--config", "configs/dit_imagenet.py:runlocal=True", "--config.train.eval_every=5"],
     ["train.eval_reference", "Inception FID"], 2),
    ("reference batch with evaluation off", ["--config", DIGITS, "--config.train.eval_reference={file}"],
     ["train.eval_reference", "does not apply", "train.eval_every"], 2),
    ("one sample to score", ["--config", DIGITS, "--config.train.eval_every=5", "--config.train.eval_num_samples=1"],
     ["train.eval_num_samples=1", ">= 2"], 2),
    ("missing Inception weights", ["--config", DIGITS, "--config.train.eval_every=5", "--config.train.eval_reference="
                                   "{file}", "--config.train.eval_inception={tmp}/no.pth"],
     ["train.eval_every=5 cannot score", "train.eval_inception", "no.pth", "--config.train.eval_inception=PATH"], 1),
]


@pytest.mark.parametrize("argv, needles, status", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input(argv, needles, status, files, capfd):
    argv = _fill(argv, files)
    if "--workdir" not in argv:
        argv += ["--workdir", str(Path(files["tmp"]) / "run")]
    rc, out = run_cli(["train", *argv], capfd)
    assert_clean_error(rc, out, "train", *needles, status=status)
    assert "Traceback" not in out


def test_train_stops_on_data_it_cannot_open(tmp_path):
    """The trainer itself (a fresh process): latents that are not there are named, with no traceback."""
    rc, out = run_cli_subprocess(["train", "--config", "configs/dit_imagenet.py:runlocal=True", "--workdir",
                                  str(tmp_path / "run"), f"--config.data.path={tmp_path / 'nothing'}"], timeout=240)
    assert_clean_error(rc, out, "train", "cannot open the training data", "nothing", status=1)


# ----------------------------------------------------------------------------------------------------------
# dit-jax demo (the same config machinery, plus its own flags)
# ----------------------------------------------------------------------------------------------------------
DEMO_CASES = [
    ("runlocal=ture", ["--config", "configs/digits.py:runlocal=ture"], ["runlocal", "bool"], 2),
    ("missing config", ["--config", "{missing}"], ["not found"], 2),
    ("config not python", ["--config", "{notpython}"], ["not valid Python"], 2),
    ("config folder", ["--config", "{folder_py}"], ["is a folder"], 2),
    ("workdir is a file", ["--workdir", "{file}"], ["--workdir", "is a file"], 1),
    ("unwritable workdir", ["--workdir", "{unwritable}/run"], ["--workdir", "cannot create"], 1),
    ("per-class 0", ["--per-class", "0"], ["--per-class"], 2),
    ("per-class not a number", ["--per-class", "x"], ["--per-class", "'x'"], 2),
    ("not the digits", ["--config", "configs/dit_imagenet.py:runlocal=True"], ["data.source", "dit-jax train"], 2),
    ("guidance without a null class", ["--config.model.class_dropout_prob=0"], ["class_dropout_prob"], 2),
    ("sample_steps 0", ["--config.train.sample_steps=0"], ["train.sample_steps=0"], 2),
    ("sample_per_class override", ["--config.train.sample_per_class=3"], ["sample_per_class", "--per-class"], 2),
    ("bad override", ["--config.model.dtype=float16"], ["model.dtype"], 2),
    ("bare word", ["bogus"], ["bogus", "--config.KEY=VALUE"], 2),
]


@pytest.mark.parametrize("argv, needles, status", [c[1:] for c in DEMO_CASES], ids=[c[0] for c in DEMO_CASES])
def test_demo_bad_input(argv, needles, status, files, capfd):
    argv = _fill(argv, files)
    if "--workdir" not in argv:
        argv += ["--workdir", str(Path(files["tmp"]) / "demo")]
    if "--config" not in argv:
        argv += ["--config", DIGITS]
    rc, out = run_cli(["demo", *argv], capfd)
    assert_clean_error(rc, out, "demo", *needles, status=status)


# ----------------------------------------------------------------------------------------------------------
# dit-jax bench: every flag checked before anything is compiled; the --json file before the measurements
# ----------------------------------------------------------------------------------------------------------
BENCH_CASES = [
    ("json in a missing folder", ["--json", "{tmp}/missing/r.jsonl"], ["--json", "No such file"], 1),
    ("json under a file", ["--json", "{file}/r.jsonl"], ["--json", "is a file, where a folder is expected"], 1),
    ("json is a folder", ["--json", "{tmp}"], ["--json", "is a folder"], 1),
    ("json unwritable", ["--json", "{unwritable}/r.jsonl"], ["--json", "cannot write"], 1),
    ("unknown variant", ["--variant", "XL/3"], ["--variant", "XL/3"], 2),
    ("batch 0", ["--batch", "0"], ["--batch", ">= 1"], 2),
    ("batch not a number", ["--batch", "x"], ["--batch", "'x'"], 2),
    ("batch not divisible", ["--batch", "12"], ["--batch", "not divisible"], 2),
    ("res not a multiple", ["--res", "100"], ["--res", "multiple of 16"], 2),
    ("steps below windows", ["--steps", "3", "--windows", "5"], ["--steps", "--windows"], 2),
    ("warmup negative", ["--warmup", "-1"], ["--warmup"], 2),
    ("remat", ["--remat", "foo"], ["--remat", "dots"], 2),
    ("attn", ["--attn", "foo"], ["--attn", "xla"], 2),
    ("too many devices", ["--devices", "99"], ["--devices", "99"], 2),
    ("cfg scale nan", ["--cfg-scale", "nan"], ["--cfg-scale", "finite"], 2),
]


@pytest.mark.parametrize("argv, needles, status", [c[1:] for c in BENCH_CASES], ids=[c[0] for c in BENCH_CASES])
def test_bench_bad_input(argv, needles, status, files, capfd):
    rc, out = run_cli(["bench", "train", *_fill(argv, files)], capfd)
    assert_clean_error(rc, out, "bench", *needles, status=status)
    assert "images_per_s" not in out  # nothing was measured


def test_bench_unknown_mode(capfd):
    rc, out = run_cli(["bench", "fly"], capfd)
    assert_clean_error(rc, out, "bench", "fly", "train", status=2)


# ----------------------------------------------------------------------------------------------------------
# dit-jax flops (reads no file: its flags, and its one output)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["--image-size", "100"], ["--image-size", "multiple of 64"]),
    (["--image-size", "0"], ["--image-size"]),
    (["--image-size", "abc"], ["--image-size", "abc"]),
    (["--block-type", "film"], ["--block-type", "film"]),
    (["--json", "extra"], ["extra"]),
])
def test_flops_bad_flags(argv, needles, capfd):
    rc, out = run_cli(["flops", *argv], capfd)
    assert_clean_error(rc, out, "flops", *needles, status=2)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_flops_unwritable_output():
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "dit_jax.cli", "flops"], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120, cwd=str(REPO))
    assert_clean_error(p.returncode, p.stderr, "flops", "No space left", "standard output", status=1)


# ----------------------------------------------------------------------------------------------------------
# The strict parser: config arguments and overrides share configs/common.parse_arg -> config_load.parse_value
# ----------------------------------------------------------------------------------------------------------
def test_parse_value_is_strict():
    from dit_jax.train.config_load import ConfigError, parse_value

    for text, value in [("true", True), ("False", False), ("yes", True), ("off", False), ("1", True), ("0", False)]:
        assert parse_value("k", text, bool) is value
    assert parse_value("k", None, bool) is True  # a bool flag alone
    assert parse_value("k", "4e5", int) == 400_000 and parse_value("k", "1_024", int) == 1024
    assert parse_value("k", "3e-4", float) == 3e-4 and isinstance(parse_value("k", "2", float), float)
    assert parse_value("k", "'a b'", str) == "a b" and parse_value("k", "XL/2", str) == "XL/2"
    for text, kind, message in [
        ("ture", bool, "expects a bool"), ("2", bool, "expects a bool"), ("", bool, "expects a bool"),
        ("ten", int, "expects an int"), ("1.5", int, "expects an int"), ("true", int, "expects an int"),
        ("abc", float, "expects a float"), ("nan", float, "finite"), ("-inf", float, "finite"),
        ("None", str, "None is not allowed"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_value("k", text, kind)
    with pytest.raises(ConfigError, match=r"config argument 'res' expects an int, got 'abc'"):
        parse_value("res", "abc", int, what="config argument")
    with pytest.raises(ConfigError, match=r"--config\.train\.steps=VALUE"):
        parse_value("train.steps", None, int)


def test_parse_arg_uses_the_same_parser():
    from configs.common import parse_arg
    from dit_jax.train.config_load import ConfigError

    assert parse_arg("runlocal=yes,res=512", runlocal=False, res=256) == {"runlocal": True, "res": 512}
    assert parse_arg(" variant = B/4 ", variant="XL/2") == {"variant": "B/4"}
    for arg, message in [
        ("runlocal=ture", "config argument 'runlocal' expects a bool"),  # was read as False
        ("runlocal=", "expects a bool"),
        ("res=abc", "config argument 'res' expects an int"),
        ("res=256.5", "expects an int"),
        ("res=256,res=512", "given twice"),
        ("runlocal", "not of the form key=value"),
        ("res=256,", "not of the form key=value"),
        ("rse=512", "unknown config argument 'rse'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_arg(arg, runlocal=False, res=256)


def test_config_argument_errors_name_the_spec():
    from dit_jax.train.config_load import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"configs/digits\.py:runlocal=ture: config argument 'runlocal'"):
        load_config("configs/digits.py:runlocal=ture")
    with pytest.raises(ConfigError, match=r"res=264 must be a positive multiple of 64"):
        load_config("configs/dit_imagenet.py:variant=S/8,res=264")
    assert load_config("configs/dit_imagenet.py:variant=S/8,res=512").model.input_size == 64
    assert load_config("configs/digits.py:runlocal=on").runlocal is True


def test_only_changed_settings_must_apply():
    """A setting that does not apply is an error only when the command line changes it: the shipped configs
    (and runlocal, which shrinks repa.* on every config) stay valid, and restating a value is harmless."""
    from dit_jax.train.config_load import ConfigError, load_config

    load_config(DIGITS, ["--config.flow.t_dist=logit_normal", "--config.repa.layer=1"])  # the values it has
    load_config("configs/ddt_imagenet.py:runlocal=True,repa=False")
    c = load_config(DIGITS, ["objective=flow", "model.learn_sigma=False", "diffusion.learn_sigma=False",
                             "flow.t_dist=uniform"])  # diffusion.learn_sigma set to agree with the model
    assert c.flow.t_dist == "uniform"
    # the digits config's sampler (dpmsolver++) is a diffusion sampler: on a flow run the flow default takes its place
    from dit_jax.sampling.settings import run_sample_settings

    assert c.train.sample_sampler == "dpmsolver++" and run_sample_settings(c).sampler == "euler"
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS, ["flow.time_scale=1000", "data.name=mnist", "model.dtype=fp8"])
    message = str(info.value)
    assert "flow.time_scale=1000.0 does not apply" in message and "data.name='mnist' does not apply" in message
    assert "model.dtype='fp8' is not one of" in message and message.count("\n") == 3


def test_check_run_knows_the_devices():
    from dit_jax.train.config_load import ConfigError, load_config
    from dit_jax.train.config_schema import check_run

    config = load_config(DIGITS)
    check_run(config, 8)
    check_run(config, 1)
    with pytest.raises(ConfigError, match=r"train.global_batch=8 is not divisible by the 3 devices"):
        check_run(config, 3)
    with pytest.raises(ConfigError, match=r"mesh.fsdp=3 does not divide the 8 devices"):
        check_run(load_config(DIGITS, ["mesh.fsdp=3"]), 8)
