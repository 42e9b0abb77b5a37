"""Every command in README.md's code blocks is accounted for: run here on the CPU, or named with why it cannot be.

How a README command is run (a newcomer's session, all commands in one temporary folder, in README order where
one needs another's output):
- its argv exactly as written (shlex: comments dropped, `\\` continuations joined), through `dit_jax.cli.main`
  in this process (`make`, `python -m` as subprocesses), with the session folder as the working directory;
- absolute paths under /data/ are moved into the session folder (a CI machine has no /data);
- what a user would bring is made by the test in its real format under the name the README uses: an image
  folder (my_images/), ImageNet through `tfds.testing.mock_data`, random Inception weights in pytorch-fid's
  layout, an ADM-layout reference batch, a DiT-XL/2 `.pt` and a diffusers folder for `convert`;
- downloads go to a loopback HTTP server standing in for dl.fbaipublicfiles.com and the Hugging Face hub (the
  library's own mirror variables, DIT_JAX_DIT_URL_BASE / DIT_JAX_HF_URL_BASE). It serves small random models in
  the released formats under the released names: DiT checkpoints in the official layout (width 384, patch 8)
  and an SD-VAE-layout diffusers folder (8x downsampling, 16 channels). The registry's DiT entries normally pin
  variant XL/2 for conversion; here they let the converter read the architecture from the shapes instead, and
  FID's 2048 x 2048 matrix square root is the diagonal stand-in tests/test_evaluate.py uses for plumbing runs
  (scipy's takes ~40 s a call here; the real one is tested there). Those are the only changes made to the
  library's state;
- where the README's size is beyond a CPU test, the run shrinks it, and SHRINK says how.
Commands that cannot run on a CPU are in NOT_RUN with the reason; their argv is still parsed by the real CLI
parser (every flag exists), and a `dit-jax train` one loads and validates its config with its overrides.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
COMMAND_PREFIXES = ("dit-jax", "make", "python", "pip", "tfds", "launch/tpu/", "launch/local/")

# ------------------------------------------------------------------------------------------------------------
# What cannot run on a CPU in CI, and why.
# ------------------------------------------------------------------------------------------------------------
NOT_RUN = {
    "make test": "it is this test suite",
    "pip install tensorflow-cpu": "installs TensorFlow (~600 MB) for the one-time ImageNet build only",
    "pip wheel --no-deps -w dist .": "tests/test_wheel.py builds the wheel this way (from a copy of the tracked files)",
    "pip install dist/dit_jax-0.1.0-py3-none-any.whl":
        "installs from PyPI; tests/test_wheel.py installs the wheel into a fresh virtualenv with the pinned "
        "dependencies and runs the CLI, a training, sampling and the notebook from it",
    "pip install dit-jax @ git+https://github.com/YOU/dit-jax":
        "YOU is the reader's own repository; installing from a git address builds the same wheel",
    "tfds build imagenet2012 --manual_dir ~/imagenet-tars --file_format array_record":
        "needs the ImageNet tars from image-net.org (~150 GB) and TensorFlow; the extraction it feeds runs below on "
        "tfds.testing.mock_data",
    "dit-jax train --config configs/dit_imagenet.py:variant=XL/2,res=256 --workdir /data/dit-xl2 "
    "--config.data.path=/data/imagenet256-latents":
        "DiT-XL/2 at batch 256 needs ~35-390 GiB (BENCHMARKS.md) and ImageNet; the same recipe runs below shrunk "
        "(runlocal=True)",
    "dit-jax train --config configs/ddt_imagenet.py:variant=XL/2,res=256 --workdir gs://BUCKET/ddt-xl2 "
    "--config.data.path=/data/in256-latents-images --config.repa.encoder_path=/data/dinov2_vitb14_pretrain.pth":
        "DDT-XL/2 at batch 256 with a GCS bucket and the DINOv2 weights; the REPA-on-latents path runs in "
        "tests/test_extract_latents.py",
    "dit-jax ddt-schedule --ckpt DDT-XL-22en6de-R256.ckpt --steps 250 --refresh-rate 4 --out schedule.json":
        "needs the released 2.7 GB DDT-XL/2 checkpoint (no download here); tests/test_sampling_ddt_cli.py runs it on a "
        "DDT-S/2-shaped checkpoint",
    "dit-jax sample --ckpt DDT-XL-22en6de-R256.ckpt --schedule schedule.json --labels 207,360 --out ddt.png":
        "needs the released DDT-XL/2 checkpoint; the random DDT-S/2 command above runs the same sampler",
    "dit-jax sample-fid --ckpt DDT-XL-22en6de-R256.ckpt --num-samples 50000 --sample-dir samples":
        "needs the released DDT-XL/2 checkpoint (and 250 x 2 DDT-XL/2 passes per image); "
        "tests/test_sampling_ddt_cli.py runs sample-fid on a DDT-S/2-shaped checkpoint",
    "launch/local/multiprocess.sh -n 2 --cpu-devices 4 -- dit-jax train --config configs/digits.py:runlocal=True "
    "--workdir runs/mp":
        "2 processes x 4 CPU devices (~1 min on 2 cores): tests/test_multiprocess.py runs this job (the same launcher, "
        "dit_jax/multiprocess.py) against 1 x 8, with SIGKILL, SIGTERM and resumes on other topologies",
    "dit-jax train --config configs/dit_imagenet.py:variant=XL/2 --workdir gs://bucket/runs/xl2 "
    "--config.train.eval_every=50000 --config.train.eval_num_samples=5000 --config.train.sample_sampler=dpmsolver++ "
    "--config.train.sample_steps=25 --config.train.eval_reference=VIRTUAL_imagenet256_labeled.npz "
    "--config.train.eval_inception=pt_inception-2015-12-05-6726825d.pth":
        "DiT-XL/2 on ImageNet latents in a GCS bucket, with the 1.6 GB ADM reference batch and the Inception weights; "
        "tests/test_train.py runs the same FID evaluation during training on a tiny run with a random Inception and a "
        "small reference batch",
    "dit-jax bench train --variant S/2 --batch 32 --dtype float32 --torch":
        "a benchmark (~5 min on 2 cores, timings meaningless next to other tests); tests/test_bench.py runs the same "
        "harness, ours and the PyTorch reference, on a tiny config",
    "dit-jax bench sample --variant S/2 --batch 32 --dtype float32 --torch":
        "a benchmark; tests/test_bench.py runs the same harness on a tiny config",
}
NOT_RUN_PYTHON = {
    "from flax import nnx\nfrom dit_jax.models import DDT_models":
        "loads the released DDT-XL/2 checkpoint and uses x, t, y, labels, noise from context; "
        "tests/test_ddt.py and tests/test_sampling_flow.py cover the calls",
}
SHRINK = {
    "dit-jax sample-fid --num-samples 50000": ["--num-samples", "16", "--per-device-batch", "1"],
}


# ------------------------------------------------------------------------------------------------------------
# Reading the README.
# ------------------------------------------------------------------------------------------------------------
def code_blocks(text: str) -> list[tuple[str, str]]:
    """[(language, code)] of the fenced blocks (indented ones included)."""
    blocks, lang, lines, indent = [], None, [], 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            if lang is None:
                lang, lines, indent = stripped[3:].strip(), [], len(line) - len(line.lstrip())
            else:
                blocks.append((lang, "\n".join(lines)))
                lang = None
            continue
        if lang is not None:
            lines.append(line[indent:] if line[:indent].isspace() else line.lstrip())
    return blocks


def readme_commands(text: str) -> list[str]:
    """Shell commands of the non-Python blocks, normalised: continuations joined, comments dropped, one space."""
    out = []
    for lang, code in code_blocks(text):
        if lang in ("python", "text"):
            continue
        joined = re.sub(r"\\\n\s*", " ", code)
        for line in joined.splitlines():
            if line.strip().startswith(COMMAND_PREFIXES):
                out.append(" ".join(shlex.split(line, comments=True)))
    return out


def readme_python(text: str) -> list[str]:
    return [code for lang, code in code_blocks(text) if lang == "python"]


def python_key(code: str) -> str:
    return "\n".join(code.strip().splitlines()[:2])


# ------------------------------------------------------------------------------------------------------------
# Fast checks: the README and the tables agree; what is not run still parses.
# ------------------------------------------------------------------------------------------------------------
def test_every_readme_command_is_run_or_named_with_a_reason():
    text = README.read_text()
    commands = readme_commands(text)
    assert commands[:2] == ["make demo", "make test"]  # the two commands first
    run = set(RUN_ORDER)
    unaccounted = [c for c in commands if c not in run and c not in NOT_RUN]
    assert not unaccounted, f"README commands neither run by tests/test_readme.py nor in NOT_RUN: {unaccounted}"
    stale = [c for c in [*run, *NOT_RUN] if c not in commands]
    assert not stale, f"tests/test_readme.py lists commands the README no longer has: {stale}"
    keys = [python_key(code) for code in readme_python(text)]
    assert sorted(keys) == sorted([*PYTHON_RUN, *NOT_RUN_PYTHON]), keys
    for lang, code in code_blocks(text):
        if lang == "python":
            compile(code, "README.md", "exec")  # every Python block is valid Python


@pytest.mark.parametrize("command", sorted(c for c in NOT_RUN if c.startswith("dit-jax")))
def test_commands_not_run_still_parse_and_their_configs_validate(command):
    from dit_jax.cli import build_parser
    from dit_jax.train.config_load import load_config

    argv = shlex.split(command)[1:]
    args, extra = build_parser(argv[0]).parse_known_args(argv)
    assert all(e.startswith("--config.") for e in extra), extra
    if args.command == "train":
        config = load_config(args.config, list(args.overrides or []) + extra)
        assert config.train.steps > 0


# ------------------------------------------------------------------------------------------------------------
# The session: inputs a user would bring, and the download mirror.
# ------------------------------------------------------------------------------------------------------------
def _vae_folder(folder: Path) -> Path:
    """A diffusers AutoencoderKL folder in the SD VAE's layout (4 blocks: 8x), small and random."""
    from flax import nnx
    from safetensors.numpy import save_file

    from dit_jax.convert.diffusers_vae import expected_diffusers_keys
    from dit_jax.models.vae import AutoencoderKL

    cfg = dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
    model = nnx.eval_shape(lambda: AutoencoderKL(**cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tensors = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in expected_diffusers_keys(model).items()}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "block_out_channels": [16] * 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 1, "norm_num_groups": 8,
        "latent_channels": 4, "scaling_factor": 0.18215,
    }))
    return folder


def _official_pt(path: Path, input_size: int) -> Path:
    """A random DiT in the official checkpoint layout: width 384 (a paper width, so the heads follow), patch 8."""
    import torch
    from flax import nnx

    from dit_jax.convert import to_official_state_dict
    from dit_jax.models import DiT

    model = DiT(input_size=input_size, patch_size=8, in_channels=4, hidden_size=384, depth=1, num_heads=6,
                num_classes=1000, rngs=nnx.Rngs(input_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in to_official_state_dict(model).items()}, path)
    return path


@contextlib.contextmanager
def _serve(root: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def _image_folder(root: Path, per_class: int = 5) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("n01440764", "n01443537"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """(session folder, env) with the mirror serving and the user's inputs in place."""
    import tensorflow_datasets as tfds

    from test_evaluate import _fast_sqrtm

    from dit_jax.evaluate import fid as fid_module
    from dit_jax.weights import registry

    root = tmp_path_factory.mktemp("readme")
    mirror = root / "mirror"
    _official_pt(mirror / "dit" / "DiT-XL-2-256x256.pt", 32)
    _official_pt(mirror / "dit" / "DiT-XL-2-512x512.pt", 64)
    vae = _vae_folder(root / "vae-src")
    for which in ("ema", "mse"):
        shutil.copytree(vae, mirror / "hf" / "stabilityai" / f"sd-vae-ft-{which}" / "resolve" / "main")
    cwd = root / "session"
    cwd.mkdir()
    _image_folder(cwd / "my_images")
    saved_registry = dict(registry.REGISTRY)
    with _serve(mirror) as url, pytest.MonkeyPatch.context() as mp:
        for name, entry in saved_registry.items():
            if entry.kind == "dit":
                opts = {k: v for k, v in entry.convert_options.items() if k != "variant"}
                mp.setitem(registry.REGISTRY, name, registry.Entry(entry.name, entry.kind, entry.files,
                                                                   entry.description, opts))
        mp.setattr(fid_module, "_sqrtm", _fast_sqrtm)
        mp.setenv("DIT_JAX_DIT_URL_BASE", f"{url}/dit")
        mp.setenv("DIT_JAX_HF_URL_BASE", f"{url}/hf")
        mp.setenv("DIT_JAX_CACHE", str(root / "cache"))
        mp.chdir(cwd)
        with tfds.testing.mock_data(num_examples=8, policy=tfds.testing.MockPolicy.USE_CODE):
            yield cwd


def _argv(command: str, cwd: Path) -> list[str]:
    argv = [a.replace("/data/", f"{cwd}/data/") if a.startswith(("/data/", "--config.data.path=/data/")) else a
            for a in shlex.split(command)]
    return argv + SHRINK.get(command, [])


def _cli(command: str, cwd: Path, capsys) -> str:
    from dit_jax.cli import main

    capsys.readouterr()
    rc = main(_argv(command, cwd)[1:])
    out = capsys.readouterr()
    assert rc == 0, f"{command}: rc {rc}\n{out.err[-3000:]}"
    return out.out + out.err


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size


# ------------------------------------------------------------------------------------------------------------
# The runs, in an order where each command's inputs exist. Each check receives (cwd, output).
# ------------------------------------------------------------------------------------------------------------
def _check_sample(cwd, out):
    assert _png_size(cwd / "sample.png") == (4 * 256 + 5 * 2, 2 * 256 + 3 * 2), _png_size(cwd / "sample.png")


def _check_macaws(cwd, out):
    w, h = _png_size(cwd / "macaws.png")
    assert h == 512 + 2 * 2 and w == 2 * 512 + 3 * 2


def _check_download(cwd, out):
    cache = cwd.parent / "cache"
    assert {p.name for p in (cache / "downloads").glob("*.pt")} == {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt"}
    assert {p.name for p in (cache / "vae").iterdir() if p.is_dir()} >= {"sd-vae-ft-ema", "sd-vae-ft-mse"}


def _check_train_steps(workdir: str, steps: int):
    def check(cwd, out):
        rows = [json.loads(line) for line in (cwd / workdir / "metrics.jsonl").read_text().splitlines()]
        assert max(r["step"] for r in rows) == steps
        assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    return check


def _check_latents(folder: str, count: int, images: bool = False):
    def check(cwd, out):
        from dit_jax.data.latents import LatentsSource

        src = LatentsSource(cwd / folder)
        assert len(src) == count and src.latent_shape == (32, 32, 4) and src.meta["flip"]
        assert src.has_images == images
    return check


def _check_fid_npz(cwd, out):
    npz = cwd / "samples" / "DiT-XL-2-256x256-size-256-vae-ema-cfg-1.5-seed-0.npz"
    with np.load(npz) as f:
        assert f["arr_0"].shape == (16, 256, 256, 3) and f["arr_0"].dtype == np.uint8


def _prepare_evaluate(cwd):
    import torch
    from inception_reference import random_inception_state_dict

    from dit_jax.evaluate.npz import write_reference_npz

    torch.save({k: torch.from_numpy(v) for k, v in random_inception_state_dict(seed=1).items()},
               cwd / "pt_inception-2015-12-05-6726825d.pth")
    rng = np.random.default_rng(3)
    write_reference_npz(cwd / "VIRTUAL_imagenet256_labeled.npz",
                        np.clip(rng.normal(128, 40, (20, 64, 64, 3)), 0, 255).astype(np.uint8))


def _check_evaluate(cwd, out):
    got = json.loads((cwd / "metrics.json").read_text())
    assert got["num_samples"] == 16 and got["num_reference"] == 20
    assert np.isfinite(got["fid"]) and np.isfinite(got["sfid"]) and 1.0 <= got["inception_score"] <= 16


def _prepare_convert(cwd):
    shutil.copy(cwd.parent / "mirror" / "dit" / "DiT-XL-2-256x256.pt", cwd / "DiT-XL-2-256x256.pt")


def _prepare_convert_diffusers(cwd):
    from test_convert import make_diffusers

    shutil.rmtree(cwd / "out", ignore_errors=True)  # the README's two converts are alternatives with one output
    make_diffusers(seed=3).save_pretrained(cwd / "path/to/DiT-XL-2-256/transformer", safe_serialization=True)


def _check_converted(cwd, out):
    assert (cwd / "out" / "dit-xl-2-256" / "dit_config.json").is_file()


def _check_png(name: str):
    def check(cwd, out):
        assert (cwd / name).is_file() and _png_size(cwd / name)[0] > 0
    return check


def _check_ddt_run_grid(cwd, out):
    assert "from ddt_smoke-step0000020" in out and "encoder on 5 of 20 steps" in out, out
    assert _png_size(cwd / "ddt-run.png") == (2 * 256 + 3 * 2, 256 + 2 * 2)


def _check_sweeps(cwd, out):
    lines = out.strip().splitlines()  # the twelve scaling points, then the four block designs of XL/2
    assert len(lines) == 16 and all(line.startswith("--config configs/dit_imagenet.py:variant=") for line in lines)
    assert len({line for line in lines[:12]}) == 12 and all("block_type" in line for line in lines[12:])


def _check_flops(cwd, out):
    assert "DiT-XL/2" in out and "118.6" in out


def _check_demo(cwd, out):
    from PIL import Image

    report = json.loads((cwd / "runs" / "digits" / "demo.json").read_text())
    assert report["steps"] == 3000 and report["sample_accuracy"] >= 0.9, report
    # the samples' Frechet distance, and the quality curve measured during training (printed, plotted, reported)
    assert 0 < report["digits_fd"] < 30 and "Frechet distance to the real digits" in out, report
    curve = report["quality_during_training"]
    assert [r["step"] for r in curve] == list(range(500, 3001, 500)), curve
    assert curve[-1]["digits_fd"] < curve[0]["digits_fd"] and curve[-1]["digits_accuracy"] > 0.9, curve
    assert "quality during training" in out and "   3000 " in out
    assert Image.open(cwd / "runs" / "digits" / "loss.png").size == (1280, 480)  # the quality panel beside the loss


def _check_resumed_demo_run(cwd, out):
    assert "done at step 3000" in out


# command -> (prepare(cwd) or None, how: "cli" | "subprocess", check(cwd, output))
RUNS = {
    "dit-jax sample": (None, "cli", _check_sample),
    "dit-jax sample --image-size 512 --labels 88,279 --cfg-scale 4 --seed 1 --out macaws.png":
        (None, "cli", _check_macaws),
    "dit-jax sample --sampler ddim --steps 50 --vae ema": (None, "cli", _check_sample),
    "dit-jax sample --sampler dpmsolver++ --steps 20": (None, "cli", _check_sample),
    "dit-jax download --all": (None, "cli", _check_download),
    "dit-jax train --config configs/digits.py:runlocal=True --workdir runs/my_run":
        (None, "cli", _check_train_steps("runs/my_run", 20)),
    "dit-jax sample --ckpt runs/my_run": (None, "cli", _check_png("sample.png")),
    "dit-jax sample-fid --num-samples 50000": (None, "cli", _check_fid_npz),
    "dit-jax evaluate samples/DiT-XL-2-256x256-size-256-vae-ema-cfg-1.5-seed-0.npz VIRTUAL_imagenet256_labeled.npz "
    "--inception-weights pt_inception-2015-12-05-6726825d.pth --json metrics.json":
        (_prepare_evaluate, "cli", _check_evaluate),
    "dit-jax extract-latents --vae ema --source folder --path my_images --image-size 256 --out my_latents":
        (None, "cli", _check_latents("my_latents", 10)),
    "dit-jax train --config configs/dit_imagenet.py:variant=S/2,runlocal=True --workdir runs/smoke "
    "--config.data.path=my_latents": (None, "cli", _check_train_steps("runs/smoke", 20)),
    "dit-jax extract-latents --vae ema --source tfds --name imagenet2012 --split train --image-size 256 "
    "--out /data/imagenet256-latents": (None, "cli", _check_latents("data/imagenet256-latents", 8)),
    "dit-jax extract-latents --vae ema --source tfds --split train --image-size 256 --store-images "
    "--out /data/in256-latents-images": (None, "cli", _check_latents("data/in256-latents-images", 8, images=True)),
    "dit-jax sample --variant DDT-S/2 --random-init --steps 20 --labels 207,360 --vae ema --out ddt-random.png":
        (None, "cli", _check_png("ddt-random.png")),
    "dit-jax train --config configs/ddt_imagenet.py:variant=S/2,runlocal=True --workdir runs/ddt_smoke "
    "--config.data.path=/data/in256-latents-images": (None, "cli", _check_train_steps("runs/ddt_smoke", 20)),
    "dit-jax sample --ckpt runs/ddt_smoke --steps 20 --refresh-rate 4 --labels 207,360 --out ddt-run.png":
        (None, "cli", _check_ddt_run_grid),
    "dit-jax convert DiT-XL-2-256x256.pt out/dit-xl-2-256": (_prepare_convert, "cli", _check_converted),
    "dit-jax convert path/to/DiT-XL-2-256/transformer out/dit-xl-2-256":
        (_prepare_convert_diffusers, "cli", _check_converted),
    "dit-jax flops": (None, "cli", _check_flops),
    "python -m configs.sweeps": (None, "subprocess", _check_sweeps),
}
def _check_launch(*expect: str):
    def check(cwd, out):
        assert out.strip(), "the dry run printed no gcloud command"
        for want in expect:
            assert want in out, (want, out)
    return check


LAUNCH = "--name dit-pod --zone us-central2-b"
LAUNCH_RUNS = {  # `--dry-run` added after the script, against tests/test_launch.py's fake gcloud
    f"launch/tpu/create.sh {LAUNCH} --accelerator-type v4-32":
        (None, "launch", _check_launch("gcloud compute tpus tpu-vm create dit-pod", "--accelerator-type=v4-32")),
    f"launch/tpu/setup.sh {LAUNCH}": (None, "launch", _check_launch("--worker=all", "jax[tpu]==0.10.2")),
    f"launch/tpu/ssh.sh {LAUNCH} --worker all -- gcloud storage cp -r gs://BUCKET/imagenet256-latents /tmp/":
        (None, "launch", _check_launch("--worker=all", "gcloud storage cp -r gs://BUCKET/imagenet256-latents /tmp/")),
    f"launch/tpu/train.sh {LAUNCH} --config configs/dit_imagenet.py:variant=XL/2,res=256 "
    "--workdir gs://BUCKET/dit-xl2-256 -- data.path=/tmp/imagenet256-latents":
        (None, "launch", _check_launch("--worker=all", "train --config configs/dit_imagenet.py:variant=XL/2,res=256",
                                       "--workdir gs://BUCKET/dit-xl2-256",
                                       "--config.data.path=/tmp/imagenet256-latents")),
    f"launch/tpu/logs.sh {LAUNCH} --follow": (None, "launch", _check_launch("--worker=0", "tail")),
    f"launch/tpu/teardown.sh {LAUNCH}": (None, "launch", _check_launch("gcloud compute tpus tpu-vm delete dit-pod")),
    "launch/tpu/sweep.sh --zone us-central2-b --names dit-a,dit-b --workdir-root gs://BUCKET/sweeps "
    "-- data.path=/tmp/imagenet256-latents":
        (None, "launch", _check_launch("ssh dit-a", "ssh dit-b", "gs://BUCKET/sweeps/dit-s8-256",
                                       "gs://BUCKET/sweeps/dit-xl2-256")),
}
SLOW_RUNS = {  # the demo: ~3 minutes
    "make demo": (None, "subprocess", _check_demo),
    "dit-jax train --config configs/digits.py --workdir runs/digits": (None, "cli", _check_resumed_demo_run),
}
RUN_ORDER = [*RUNS, *LAUNCH_RUNS, *SLOW_RUNS]

PYTHON_RUN = {
    "import jax, jax.numpy as jnp\nfrom flax import nnx": lambda ns: ns["out"].shape == (2, 32, 32, 8)
    and set(ns["losses"]) >= {"loss", "mse", "vb"},
    "from dit_jax.convert import load_official_dit, load_diffusers_dit, load_converted\n"
    "model = load_converted(\"out/dit-xl-2-256\")": lambda ns: ns["model"].x_embedder is not None,
}


def _run(command: str, spec, cwd: Path, capsys) -> None:
    t0 = time.perf_counter()
    prepare, how, check = spec
    if prepare is not None:
        prepare(cwd)
    if how == "cli":
        out = _cli(command, cwd, capsys)
    elif how == "launch":
        out = _dry_run_launch(command, cwd)
    else:
        argv = _argv(command, cwd)
        if argv[0] == "make":  # the demo writes where the session says, not into the checkout
            argv = ["make", "-C", str(REPO), *argv[1:], f"DEMO_ARGS=--workdir={cwd}/runs/digits"]
        elif argv[0] == "python":
            argv = [sys.executable, *argv[1:]]
        # a user's shell: one CPU device, not the 8 simulated ones conftest.py gives this process
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONPATH": str(REPO)}
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, f"{command}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
        out = proc.stdout + proc.stderr
    check(cwd, out)
    print(f"[{time.perf_counter() - t0:6.1f} s] {command}", file=sys.__stderr__, flush=True)


def _dry_run_launch(command: str, cwd: Path) -> str:
    """The script with --dry-run, a fake gcloud first on PATH (the TPUs the command needs exist, with 4 workers,
    as a v4-32 has; create's does not yet): only read-only calls may reach gcloud; the printed commands return."""
    from test_launch import Env, mutating

    env = Env(Path(tempfile.mkdtemp(dir=cwd, prefix="fake-gcloud-")))
    argv = shlex.split(command)
    if "create.sh" not in argv[0]:
        for name in ("dit-pod", "dit-a", "dit-b"):
            env.add_tpu(name, workers=4)
    proc = env.run(Path(argv[0]).name, "--dry-run", *argv[1:])
    assert proc.returncode == 0, f"{command}: rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert not mutating(env.calls()), env.calls()
    for line in proc.stdout.splitlines():
        assert shlex.split(line)[0] == "gcloud", line
    return proc.stdout


def _run_python(key: str, cwd: Path) -> None:
    code = next(c for c in readme_python(README.read_text()) if python_key(c) == key)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102: the README's own example
    assert PYTHON_RUN[key](ns), key


@pytest.mark.parametrize("command", list(LAUNCH_RUNS))
def test_readme_launch_commands_dry_run(command, tmp_path, capsys):
    _run(command, LAUNCH_RUNS[command], tmp_path, capsys)


@pytest.mark.slow
def test_readme_commands_run(session, capsys):
    """The README's CPU-runnable commands and Python blocks, one after another in one session (the demo apart)."""
    cwd = session
    for command, spec in RUNS.items():
        _run(command, spec, cwd, capsys)
        if command.startswith("dit-jax convert DiT-XL-2"):
            _run_python(list(PYTHON_RUN)[1], cwd)
    _run_python(list(PYTHON_RUN)[0], cwd)


@pytest.mark.slow
def test_readme_demo_then_its_training_command_resumes_it(session, capsys):
    """`make demo` (the real one: 3,000 steps, then samples scored by the digits classifier), then the README's
    `dit-jax train --config configs/digits.py --workdir runs/digits`, which finds the run finished."""
    for command, spec in SLOW_RUNS.items():
        _run(command, spec, session, capsys)
