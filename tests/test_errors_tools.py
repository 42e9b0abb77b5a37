"""Bad inputs to the tool commands (`convert`, `download`, `extract-latents`, `evaluate`), as a careless user types
them: each gives one `dit-jax COMMAND: error: ...` line naming the problem, exit status 1 (2 for a bad option or
combination of options), no traceback, and nothing written into the inputs (readers never write). Nothing is
downloaded: the download cases use --offline or a loopback address where nothing listens.

Every input is tiny and built once (module fixture); no case converts, encodes or evaluates anything for real:
each fails on a check made before the work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
from flax import nnx

from cli_errors import assert_clean_error, run_cli, unwritable_dir

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: the connection is refused at once


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One folder of good and bad inputs (read by every case, written by none)."""
    from safetensors.numpy import save_file

    from dit_jax.convert.official_dit import to_official_state_dict
    from dit_jax.evaluate.npz import write_reference_npz, write_samples_npz
    from dit_jax.models import DiT
    from test_extract_latents import make_folder
    from test_weights import tiny_vae_folder

    d = tmp_path_factory.mktemp("inputs")
    (d / "text.txt").write_text("hello, I am not a checkpoint\n")
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name in ("garbage.pt", "garbage.safetensors", "garbage.npz", "garbage.pth"):
        (d / name).write_bytes(garbage)
    (d / "text.npz").write_text("not a zip")
    (d / "empty_dir").mkdir()
    (d / "a_file").write_text("a file where a folder is expected\n")
    (d / "not_converted").mkdir()
    (d / "not_converted" / "keep.txt").write_text("precious\n")
    # a tiny DiT in the official layout, as .safetensors (numpy only): valid input to `convert`
    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                rngs=nnx.Rngs(0))
    save_file({k: np.ascontiguousarray(v) for k, v in to_official_state_dict(model).items()},
              str(d / "tiny-dit.safetensors"))
    # a diffusers folder of another model (the VAE) and a VAE folder with a config that is not JSON
    tiny_vae_folder(d / "vae")
    (d / "bad_config_vae").mkdir()
    (d / "bad_config_vae" / "config.json").write_text("{not json")
    (d / "dir_config_vae" / "config.json").mkdir(parents=True)
    # images: a good class folder tree, one whose only image is unreadable, one without images
    make_folder(d / "images", n_per_class=1, size=16)
    (d / "broken_images" / "a").mkdir(parents=True)
    (d / "broken_images" / "a" / "0.png").write_bytes(b"not a png at all")
    (d / "no_images" / "a").mkdir(parents=True)
    (d / "no_images" / "a" / "notes.txt").write_text("no images here\n")
    # .npz files: good ones, and each way of being wrong
    rng = np.random.default_rng(1)
    write_samples_npz(d / "good.npz", rng.integers(0, 256, (4, 8, 8, 3)).astype(np.uint8))
    write_samples_npz(d / "few.npz", rng.integers(0, 256, (2, 8, 8, 3)).astype(np.uint8))
    np.savez(d / "named.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(d / "float.npz", np.zeros((4, 8, 8, 3), np.float32))
    np.savez(d / "nchw.npz", np.zeros((4, 3, 8, 8), np.uint8))
    np.savez(d / "empty.npz", np.zeros((0, 8, 8, 3), np.uint8))
    raw = (d / "good.npz").read_bytes()
    (d / "truncated.npz").write_bytes(raw[: len(raw) // 2])
    write_reference_npz(d / "ref.npz", np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(d / "bad_stats.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8), mu=np.zeros(3), sigma=np.zeros((3, 2)),
             mu_s=np.zeros(2), sigma_s=np.zeros((2, 2)))
    return d


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `folder` with its size and mtime (ns): what a reader must leave as it is."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def quick_network(monkeypatch, tmp_path):
    """Downloads go nowhere, at once: unreachable URL bases, no retries, no backoff, a fresh cache; no offline
    switch, Inception weights or debug switch from the environment."""
    from dit_jax.weights import transfer

    monkeypatch.setattr(transfer, "RETRIES", 0)
    monkeypatch.setattr(transfer, "BACKOFF_S", 0.0)
    monkeypatch.setattr(transfer, "TIMEOUT_S", 5.0)
    for var in ("DIT_JAX_OFFLINE", "HF_HUB_OFFLINE", "HF_ENDPOINT", "DIT_JAX_INCEPTION_WEIGHTS", "DIT_JAX_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DIT_JAX_DIT_URL_BASE", UNREACHABLE + "/DiT/models")
    monkeypatch.setenv("DIT_JAX_HF_URL_BASE", UNREACHABLE)
    monkeypatch.setenv("DIT_JAX_CACHE", str(tmp_path / "cache"))


class Case(NamedTuple):
    command: str
    argv: Callable[[Path, Path, Path], list[str]]  # (inputs, tmp_path, an unwritable folder) -> arguments
    needles: tuple[str, ...]  # words the error line must hold
    status: int = 1


def A(*args: str) -> Callable[[Path, Path, Path], list[str]]:
    """A command's arguments, with {i} = the inputs folder, {t} = this test's tmp_path, {u} = an unwritable
    folder."""
    return lambda i, t, u: [a.format(i=i, t=t, u=u) for a in args]

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- convert
    "convert-missing-file": Case("convert", A("{i}/absent.pt", "{t}/out"), ("absent.pt", "no such file")),
    "convert-missing-folder": Case("convert", A("{i}/absent", "{t}/out"), ("absent", "no such file or folder")),
    "convert-text-file": Case("convert", A("{i}/text.txt", "{t}/out"), ("text.txt", "not a checkpoint", "--source")),
    "convert-text-as-official": Case("convert", A("--source", "official", "{i}/text.txt", "{t}/out"),
                                     ("text.txt", "unknown checkpoint type")),
    "convert-garbage-pt": Case("convert", A("{i}/garbage.pt", "{t}/out"), ("garbage.pt", "truncated or corrupt")),
    "convert-garbage-safetensors": Case("convert", A("{i}/garbage.safetensors", "{t}/out"),
                                        ("garbage.safetensors", "corrupt or truncated")),
    "convert-empty-folder": Case("convert", A("{i}/empty_dir", "{t}/out"), ("empty_dir", "config.json")),
    "convert-folder-as-official": Case("convert", A("--source", "official", "{i}/empty_dir", "{t}/out"),
                                       ("empty_dir", "a folder", "checkpoint file")),
    "convert-file-as-diffusers": Case("convert", A("--source", "diffusers", "{i}/tiny-dit.safetensors", "{t}/out"),
                                      ("tiny-dit.safetensors", "a file", "model folder")),
    "convert-vae-folder": Case("convert", A("{i}/vae", "{t}/out"), ("AutoencoderKL", "unsupported diffusers config")),
    "convert-bad-config-json": Case("convert", A("{i}/bad_config_vae", "{t}/out"), ("config.json", "cannot read")),
    "convert-unwritable-output": Case("convert", A("{i}/tiny-dit.safetensors", "{u}/out", "--num-heads", "2"),
                                      ("{u}",)),
    "convert-output-under-a-file": Case("convert", A("{i}/tiny-dit.safetensors", "{i}/a_file/out", "--num-heads",
                                                     "2"), ("a_file", "a file is in the way")),
    "convert-output-exists": Case("convert", A("{i}/tiny-dit.safetensors", "{i}/empty_dir", "--num-heads", "2"),
                                  ("empty_dir", "exists", "--overwrite")),
    "convert-overwrite-a-file": Case("convert", A("--overwrite", "{i}/tiny-dit.safetensors", "{i}/a_file",
                                                  "--num-heads", "2"), ("a_file", "is a file", "not a converted")),
    "convert-overwrite-another-folder": Case("convert", A("--overwrite", "{i}/tiny-dit.safetensors",
                                                          "{i}/not_converted", "--num-heads", "2"),
                                             ("not_converted", "holds no converted checkpoint")),
    "convert-unknown-variant": Case("convert", A("{i}/tiny-dit.safetensors", "{t}/out", "--variant", "DiT-Q/3"),
                                    ("unknown DiT variant",)),
    "convert-wrong-variant": Case("convert", A("{i}/tiny-dit.safetensors", "{t}/out", "--variant", "DiT-S/2"),
                                  ("DiT-S/2 does not match the checkpoint",)),
    "convert-heads-unknown": Case("convert", A("{i}/tiny-dit.safetensors", "{t}/out"), ("width 32", "--num-heads")),
    "convert-zero-image-size": Case("convert", A("{i}/tiny-dit.safetensors", "{t}/out", "--image-size", "0"),
                                    ("--image-size 0", "positive multiple of 8"), 2),
    "convert-odd-image-size": Case("convert", A("{i}/tiny-dit.safetensors", "{t}/out", "--image-size", "100"),
                                   ("--image-size 100", "multiple of 8"), 2),
    "convert-negative-heads": Case("convert", A("{i}/tiny-dit.safetensors", "{t}/out", "--num-heads", "-2"),
                                   ("--num-heads -2", "positive"), 2),
    "convert-negative-atol": Case("convert", A("{i}/vae", "{t}/out", "--embedder-atol", "-1"),
                                  ("--embedder-atol", ">= 0"), 2),
    "convert-nan-shift": Case("convert", A("{i}/vae", "{t}/out", "--timestep-freq-shift", "nan"),
                              ("--timestep-freq-shift", "finite"), 2),
    # ---------------------------------------------------------------- download
    "download-no-name": Case("download", A(), ("name what to download", "--all"), 2),
    "download-unknown-name": Case("download", A("DiT-XXL-2"), ("unknown weights 'DiT-XXL-2'", "DiT-XL-2-256x256.pt")),
    "download-a-path": Case("download", A("{i}/tiny-dit.safetensors"), ("is a local path", "dit-jax convert")),
    "download-names-and-all": Case("download", A("ema", "--all"), ("names or --all",), 2),
    "download-list-and-names": Case("download", A("--list", "ema"), ("--list takes no name",), 2),
    "download-offline-force": Case("download", A("--offline", "--force", "ema"), ("--force", "offline"), 2),
    "download-offline-not-cached": Case("download", A("--offline", "DiT-XL/2-256"),
                                        ("offline", "not in the cache", "DiT-XL-2-256x256.pt", "/DiT/models/")),
    "download-unreachable": Case("download", A("mse"), ("cannot reach the server", "offline mode", "mirror")),
    "download-cache-is-a-file": Case("download", A("ema", "--cache-dir", "{i}/a_file"),
                                     ("a_file", "not a directory", "a file is where a folder is expected")),
    "download-corrupt-cache": Case("download", A("mse", "--offline"),
                                   ("config.json", "corrupt", "dit-jax download --force sd-vae-ft-mse")),
    "download-folder-in-cache": Case("download", A("mse", "--offline"),
                                     ("config.json", "a folder, where the cache keeps a downloaded file", "rm -r")),
    "download-unwritable-cache": Case("download", A("ema", "--cache-dir", "{u}/cache"), ("{u}",)),
    # ---------------------------------------------------------------- extract-latents
    "extract-no-path": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--out", "{t}/lat"),
                            ("--source folder needs --path",), 2),
    "extract-missing-folder": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                        "{i}/absent", "--out", "{t}/lat"), ("absent", "does not exist")),
    "extract-path-is-a-file": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                        "{i}/a_file", "--out", "{t}/lat"), ("a_file", "not a folder")),
    "extract-empty-folder": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                      "{i}/empty_dir", "--out", "{t}/lat"),
                                 ("empty_dir", "no class sub-folders")),
    "extract-no-images": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                   "{i}/no_images", "--out", "{t}/lat"), ("no_images", "no .png")),
    "extract-unreadable-images": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                           "{i}/broken_images", "--out", "{t}/lat", "--image-size",
                                                           "16"), ("none of the 1 images", "0.png")),
    "extract-missing-vae": Case("extract-latents", A("--vae", "{i}/absent_vae", "--source", "folder", "--path",
                                                     "{i}/images", "--out", "{t}/lat"),
                                ("absent_vae", "no such file or folder")),
    "extract-unknown-vae": Case("extract-latents", A("--vae", "emma", "--source", "folder", "--path", "{i}/images",
                                                     "--out", "{t}/lat"), ("unknown vae weights 'emma'", "ema")),
    "extract-vae-is-a-file": Case("extract-latents", A("--vae", "{i}/text.txt", "--source", "folder", "--path",
                                                       "{i}/images", "--out", "{t}/lat"),
                                  ("text.txt", "not a diffusers VAE folder")),
    "extract-vae-empty-folder": Case("extract-latents", A("--vae", "{i}/empty_dir", "--source", "folder", "--path",
                                                          "{i}/images", "--out", "{t}/lat"),
                                     ("empty_dir", "not a diffusers VAE folder")),
    "extract-vae-config-is-a-folder": Case("extract-latents", A("--vae", "{i}/dir_config_vae", "--source", "folder",
                                                                "--path", "{i}/images", "--out", "{t}/lat"),
                                           ("dir_config_vae", "not a diffusers VAE folder")),
    "extract-vae-bad-config": Case("extract-latents", A("--vae", "{i}/bad_config_vae", "--source", "folder",
                                                        "--path", "{i}/images", "--out", "{t}/lat"),
                                   ("config.json", "cannot read")),
    "extract-vae-offline-not-cached": Case("extract-latents", A("--vae", "ema", "--source", "folder", "--path",
                                                                "{i}/images", "--out", "{t}/lat"),
                                           ("offline", "not in the cache")),
    "extract-unwritable-out": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                        "{i}/images", "--out", "{u}/lat"), ("{u}",)),
    "extract-out-is-a-file": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                       "{i}/images", "--out", "{i}/a_file"),
                                  ("a_file", "a file is in the way")),
    "extract-out-other-run": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                       "{i}/images", "--out", "{t}/other-run", "--image-size", "16"),
                                  ("another shard count", "new --out")),
    "extract-zero-image-size": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                         "{i}/images", "--out", "{t}/lat", "--image-size", "0"),
                                    ("--image-size 0", "multiple of 8"), 2),
    "extract-odd-image-size": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                        "{i}/images", "--out", "{t}/lat", "--image-size", "12"),
                                   ("--image-size 12", "multiple of 8"), 2),
    "extract-zero-batch": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                    "{i}/images", "--out", "{t}/lat", "--batch-size", "0"),
                               ("--batch-size 0", "positive"), 2),
    "extract-negative-shards": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                         "{i}/images", "--out", "{t}/lat", "--num-shards", "-1"),
                                    ("--num-shards -1", "positive"), 2),
    "extract-half-multiprocess": Case("extract-latents", A("--vae", "{i}/vae", "--source", "folder", "--path",
                                                           "{i}/images", "--out", "{t}/lat", "--process-id", "1"),
                                      ("--coordinator", "missing"), 2),
    "extract-unknown-tfds": Case("extract-latents", A("--vae", "{i}/vae", "--source", "tfds", "--name",
                                                      "no_such_dataset_xyz", "--data-dir", "{t}/tfds", "--out",
                                                      "{t}/lat"), ("no dataset named 'no_such_dataset_xyz'",)),
    # ---------------------------------------------------------------- evaluate
    "evaluate-missing-samples": Case("evaluate", A("{i}/absent.npz", "{i}/good.npz"), ("absent.npz", "no such file")),
    "evaluate-missing-reference": Case("evaluate", A("{i}/good.npz", "{i}/absent.npz"),
                                       ("absent.npz", "no such file")),
    "evaluate-text-npz": Case("evaluate", A("{i}/text.npz", "{i}/good.npz"), ("text.npz", "not an .npz")),
    "evaluate-garbage-npz": Case("evaluate", A("{i}/good.npz", "{i}/garbage.npz"), ("garbage.npz", "not an .npz")),
    "evaluate-truncated-npz": Case("evaluate", A("{i}/truncated.npz", "{i}/good.npz"), ("truncated.npz",
                                                                                        "truncated")),
    "evaluate-folder-as-npz": Case("evaluate", A("{i}/empty_dir", "{i}/good.npz"), ("empty_dir", "a folder")),
    "evaluate-no-arr_0": Case("evaluate", A("{i}/named.npz", "{i}/good.npz"), ("named.npz", "missing arr_0")),
    "evaluate-float-images": Case("evaluate", A("{i}/float.npz", "{i}/good.npz"), ("float.npz", "uint8")),
    "evaluate-nchw-images": Case("evaluate", A("{i}/nchw.npz", "{i}/good.npz"), ("nchw.npz", "NHWC")),
    "evaluate-no-images": Case("evaluate", A("{i}/empty.npz", "{i}/good.npz"), ("empty.npz", "is empty")),
    "evaluate-too-few-images": Case("evaluate", A("{i}/few.npz", "{i}/good.npz"), ("few.npz", "at least 4")),
    "evaluate-bad-statistics": Case("evaluate", A("{i}/good.npz", "{i}/bad_stats.npz"), ("bad_stats.npz", "sigma")),
    "evaluate-no-weights": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz"),
                                ("no Inception weights", "--inception-weights", "pt_inception-2015-12-05")),
    "evaluate-missing-weights": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--inception-weights",
                                                   "{i}/absent.pth"), ("absent.pth", "no such file")),
    "evaluate-weights-folder": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--inception-weights",
                                                  "{i}/empty_dir"), ("empty_dir", "a folder")),
    "evaluate-garbage-weights": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--inception-weights",
                                                   "{i}/garbage.pth"), ("garbage.pth", "truncated or corrupt")),
    "evaluate-text-weights": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--inception-weights",
                                                "{i}/text.txt"), ("text.txt", "unknown checkpoint type")),
    "evaluate-dit-as-weights": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--inception-weights",
                                                  "{i}/tiny-dit.safetensors"),
                                    ("not the FID Inception weights", "looks like a DiT checkpoint")),
    "evaluate-zero-batch": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--batch-size", "0"),
                                ("--batch-size 0", "positive"), 2),
    "evaluate-zero-processes": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--num-processes", "0"),
                                    ("--num-processes", ">= 1"), 2),
    "evaluate-unwritable-json": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--inception-weights",
                                                   "{i}/text.txt", "--json", "{u}/m.json"), ("{u}",)),
    "evaluate-json-is-a-folder": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--inception-weights",
                                                    "{i}/text.txt", "--json", "{i}/empty_dir"),
                                      ("--json", "empty_dir", "a folder")),
    "evaluate-json-under-a-file": Case("evaluate", A("{i}/good.npz", "{i}/ref.npz", "--inception-weights",
                                                     "{i}/text.txt", "--json", "{i}/a_file/m.json"),
                                       ("a_file", "a file is in the way")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clean_error_line(name, inputs, tmp_path, capfd, quick_network, monkeypatch):
    case = CASES[name]
    unwritable = unwritable_dir(tmp_path)
    if name == "extract-vae-offline-not-cached":
        monkeypatch.setenv("DIT_JAX_OFFLINE", "1")
    cached = tmp_path / "cache" / "vae" / "sd-vae-ft-mse"
    if name == "download-corrupt-cache":  # a cached file changed since its sha256 was recorded
        cached.mkdir(parents=True)
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            (cached / f).write_bytes((inputs / "vae" / f).read_bytes())
            (cached / f"{f}.sha256").write_text(f"{'0' * 64}  {f}\n")
    if name == "download-folder-in-cache":  # a folder where the cache keeps a file
        (cached / "config.json").mkdir(parents=True)
        (cached / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    if name == "extract-out-other-run":  # the shards of an earlier run with --num-shards 3
        (tmp_path / "other-run").mkdir()
        (tmp_path / "other-run" / "latents-00000-of-00003.array_record").write_bytes(b"")
    before = snapshot(inputs)
    rc, out = run_cli([case.command, *case.argv(inputs, tmp_path, unwritable)], capfd)
    needles = [n.format(u=unwritable) for n in case.needles]
    assert_clean_error(rc, out, case.command, *needles, status=case.status)
    assert snapshot(inputs) == before, "a command wrote into its inputs"
    if name == "convert-overwrite-another-folder":
        assert (inputs / "not_converted" / "keep.txt").read_text() == "precious\n"


def test_debug_shows_the_traceback_and_the_full_mismatch_report(inputs, capfd, quick_network):
    """The one-line summary of a checkpoint mismatch; --debug adds the traceback, whose chained report lists every
    key."""
    argv = ["evaluate", str(inputs / "good.npz"), str(inputs / "ref.npz"), "--inception-weights",
            str(inputs / "tiny-dit.safetensors")]
    rc, out = run_cli(argv, capfd)
    assert_clean_error(rc, out, "evaluate", "472 missing", "(--debug lists every key)")
    rc, out = run_cli([*argv, "--debug"], capfd)
    assert rc == 1 and "Traceback" in out and "Mixed_7c.branch_pool.conv.weight" in out


def test_download_offline_with_a_read_only_cache_reads_without_writing(inputs, tmp_path, capfd, quick_network,
                                                                      monkeypatch):
    """A cache that cannot be written (a shared, read-only one) still serves files that are cached: no lock file,
    and no sha256 record is needed to read them."""
    import errno

    from dit_jax.weights import transfer

    folder = tmp_path / "cache" / "vae" / "sd-vae-ft-mse"
    folder.mkdir(parents=True)
    for f in ("config.json", "diffusion_pytorch_model.safetensors"):
        (folder / f).write_bytes((inputs / "vae" / f).read_bytes())

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(folder))

    monkeypatch.setattr(transfer, "write_record", read_only)
    before = snapshot(tmp_path / "cache")
    rc, out = run_cli(["download", "mse", "--offline"], capfd)
    assert rc == 0, out
    assert snapshot(tmp_path / "cache") == before
    with transfer.file_lock(unwritable_dir(tmp_path) / "x.lock"):  # a lock that cannot be made is no error either
        pass


def test_convert_overwrites_an_earlier_conversion_only(inputs, tmp_path, capfd, quick_network):
    """--overwrite replaces the output of an earlier conversion (and an empty folder), after the same checks."""
    out = tmp_path / "converted"
    argv = ["convert", str(inputs / "tiny-dit.safetensors"), str(out), "--num-heads", "2"]
    rc, text = run_cli(argv, capfd)
    assert rc == 0, text
    meta = json.loads((out / "dit_config.json").read_text())
    assert meta["model"]["num_heads"] == 2
    rc, text = run_cli(argv, capfd)
    assert_clean_error(rc, text, "convert", "exists", "--overwrite")
    rc, text = run_cli([*argv, "--overwrite", "--scan-blocks"], capfd)
    assert rc == 0, text
    assert json.loads((out / "dit_config.json").read_text())["model"]["scan_blocks"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted"]  # no temporary folders left
    # reading it back (the readers of `dit-jax sample`) writes nothing into it
    from dit_jax.convert import load_converted

    before = snapshot(out)
    load_converted(out)
    assert snapshot(out) == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_extract_latents_on_a_full_disk(inputs, tmp_path, capfd, quick_network, monkeypatch):
    """The ArrayRecord writer's failure on a full disk (its RuntimeError) reads as the OSError it is, and no
    shard is left behind: the shards are written to /dev/full, a device that is always full."""
    from array_record.python import array_record_module

    real_writer = array_record_module.ArrayRecordWriter
    monkeypatch.setattr(array_record_module, "ArrayRecordWriter",
                        lambda path, options: real_writer("/dev/full", options))
    out = tmp_path / "lat"
    rc, text = run_cli(["extract-latents", "--vae", str(inputs / "vae"), "--source", "folder", "--path",
                        str(inputs / "images"), "--out", str(out), "--image-size", "16", "--batch-size", "2",
                        "--no-flip"], capfd)
    assert_clean_error(rc, text, "extract-latents", "No space left on device", "latents-00000-of-00001",
                       "the disk is full")
    assert list(out.iterdir()) == []
