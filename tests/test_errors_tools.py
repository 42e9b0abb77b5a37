"""Bad inputs to the tool commands (`convert`, `download`, `extract-latents`, `evaluate`), as a careless user types
them: each gives one `dit-jax COMMAND: error: ...` line naming the problem, exit status 1 (2 for a bad option or
combination of options), no traceback, and nothing written into the inputs (readers never write). Nothing is
downloaded: the download cases use --offline or a loopback address where nothing listens.

Every input is tiny and built once (module fixture); no case converts, encodes or evaluates anything for real:
each fails on a check made before the work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from cli_errors import (Case, assert_clean_error, case, flag_cases, replace, run_case, run_cli, snapshot,
                        unwritable_dir, without)

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


# fine arguments, so that each case's one bad input is what fails
EXTRACT = ("--vae", "{i}/vae", "--source", "folder", "--path", "{i}/images", "--out", "{t}/lat")
EVALUATE = ("{i}/good.npz", "{i}/ref.npz")
EVALUATE_JSON = (*EVALUATE, "--inception-weights", "{i}/text.txt", "--json")

CASES: dict[str, Case] = {
    # ---------------------------------------------------------------- convert
    "convert-missing-file": case("convert", "{i}/absent.pt", "{t}/out", needles=("absent.pt", "no such file")),
    "convert-missing-folder": case("convert", "{i}/absent", "{t}/out", needles=("absent", "no such file or folder")),
    "convert-text-file": case("convert", "{i}/text.txt", "{t}/out",
                              needles=("text.txt", "not a checkpoint", "--source")),
    "convert-text-as-official": case("convert", "--source", "official", "{i}/text.txt", "{t}/out",
                                     needles=("text.txt", "unknown checkpoint type")),
    "convert-garbage-pt": case("convert", "{i}/garbage.pt", "{t}/out", needles=("garbage.pt", "truncated or corrupt")),
    "convert-garbage-safetensors": case("convert", "{i}/garbage.safetensors", "{t}/out",
                                        needles=("garbage.safetensors", "corrupt or truncated")),
    "convert-empty-folder": case("convert", "{i}/empty_dir", "{t}/out", needles=("empty_dir", "config.json")),
    "convert-folder-as-official": case("convert", "--source", "official", "{i}/empty_dir", "{t}/out",
                                       needles=("empty_dir", "a folder", "checkpoint file")),
    "convert-file-as-diffusers": case("convert", "--source", "diffusers", "{i}/tiny-dit.safetensors", "{t}/out",
                                      needles=("tiny-dit.safetensors", "a file", "model folder")),
    "convert-vae-folder": case("convert", "{i}/vae", "{t}/out",
                               needles=("AutoencoderKL", "unsupported diffusers config")),
    "convert-bad-config-json": case("convert", "{i}/bad_config_vae", "{t}/out", needles=("config.json", "cannot read")),
    "convert-unwritable-output": case("convert", "{i}/tiny-dit.safetensors", "{u}/out", "--num-heads", "2",
                                      needles=("{u}",)),
    "convert-output-under-a-file": case("convert", "{i}/tiny-dit.safetensors", "{i}/a_file/out", "--num-heads", "2",
                                        needles=("a_file", "a file is in the way")),
    "convert-output-exists": case("convert", "{i}/tiny-dit.safetensors", "{i}/empty_dir", "--num-heads", "2",
                                  needles=("empty_dir", "exists", "--overwrite")),
    "convert-overwrite-a-file": case("convert", "--overwrite", "{i}/tiny-dit.safetensors", "{i}/a_file", "--num-heads",
                                     "2", needles=("a_file", "is a file", "not a converted")),
    "convert-overwrite-another-folder": case("convert", "--overwrite", "{i}/tiny-dit.safetensors", "{i}/not_converted",
                                             "--num-heads", "2",
                                             needles=("not_converted", "holds no converted checkpoint")),
    "convert-unknown-variant": case("convert", "{i}/tiny-dit.safetensors", "{t}/out", "--variant", "DiT-Q/3",
                                    needles=("unknown DiT variant",)),
    "convert-wrong-variant": case("convert", "{i}/tiny-dit.safetensors", "{t}/out", "--variant", "DiT-S/2",
                                  needles=("DiT-S/2 does not match the checkpoint",)),
    "convert-heads-unknown": case("convert", "{i}/tiny-dit.safetensors", "{t}/out",
                                  needles=("width 32", "--num-heads")),
    "convert-zero-image-size": case("convert", "{i}/tiny-dit.safetensors", "{t}/out", "--image-size", "0",
                                    needles=("--image-size 0", "positive multiple of 8"), status=2),
    "convert-odd-image-size": case("convert", "{i}/tiny-dit.safetensors", "{t}/out", "--image-size", "100",
                                   needles=("--image-size 100", "multiple of 8"), status=2),
    "convert-negative-heads": case("convert", "{i}/tiny-dit.safetensors", "{t}/out", "--num-heads", "-2",
                                   needles=("--num-heads -2", "positive"), status=2),
    "convert-negative-atol": case("convert", "{i}/vae", "{t}/out", "--embedder-atol", "-1",
                                  needles=("--embedder-atol", ">= 0"), status=2),
    "convert-nan-shift": case("convert", "{i}/vae", "{t}/out", "--timestep-freq-shift", "nan",
                              needles=("--timestep-freq-shift", "finite"), status=2),
    # ---------------------------------------------------------------- download
    "download-no-name": case("download", needles=("name what to download", "--all"), status=2),
    "download-unknown-name": case("download", "DiT-XXL-2",
                                  needles=("unknown weights 'DiT-XXL-2'", "DiT-XL-2-256x256.pt")),
    "download-a-path": case("download", "{i}/tiny-dit.safetensors", needles=("is a local path", "dit-jax convert")),
    "download-names-and-all": case("download", "ema", "--all", needles=("names or --all",), status=2),
    "download-list-and-names": case("download", "--list", "ema", needles=("--list takes no name",), status=2),
    "download-offline-force": case("download", "--offline", "--force", "ema", needles=("--force", "offline"),
                                   status=2),
    "download-offline-not-cached": case("download", "--offline", "DiT-XL/2-256",
                                        needles=("offline", "not in the cache", "DiT-XL-2-256x256.pt", "/DiT/models/")),
    "download-unreachable": case("download", "mse", needles=("cannot reach the server", "offline mode", "mirror")),
    "download-cache-is-a-file": case("download", "ema", "--cache-dir", "{i}/a_file",
                                     needles=("a_file", "not a directory", "a file is where a folder is expected")),
    "download-corrupt-cache": case("download", "mse", "--offline",
                                   needles=("config.json", "corrupt", "dit-jax download --force sd-vae-ft-mse")),
    "download-folder-in-cache": case("download", "mse", "--offline",
                                     needles=("config.json", "a folder, where the cache keeps a downloaded file",
                                              "rm -r")),
    "download-unwritable-cache": case("download", "ema", "--cache-dir", "{u}/cache", needles=("{u}",)),
    # ---------------------------------------------------------------- extract-latents
    "extract-no-path": case("extract-latents", *without(EXTRACT, "--path"), needles=("--source folder needs --path",),
                            status=2),
    **flag_cases("extract", "extract-latents", EXTRACT, "--path", {
        "missing-folder": ("{i}/absent", ("image folder", "absent", "no such file or folder")),
        "path-is-a-file": ("{i}/a_file", ("image folder", "a_file", "is a file, where a folder is expected")),
        "empty-folder": ("{i}/empty_dir", ("empty_dir", "no class sub-folders")),
        "no-images": ("{i}/no_images", ("no_images", "no .png")),
    }),
    "extract-unreadable-images": case("extract-latents", *replace(EXTRACT, "--path", "{i}/broken_images",
                                                                  "--image-size", "16"),
                                      needles=("none of the 1 images", "0.png")),
    **flag_cases("extract", "extract-latents", EXTRACT, "--vae", {
        "missing-vae": ("{i}/absent_vae", ("absent_vae", "no such file or folder")),
        "unknown-vae": ("emma", ("unknown vae weights 'emma'", "ema")),
        "vae-is-a-file": ("{i}/text.txt", ("text.txt", "not a diffusers VAE folder")),
        "vae-empty-folder": ("{i}/empty_dir", ("empty_dir", "not a diffusers VAE folder")),
        "vae-config-is-a-folder": ("{i}/dir_config_vae", ("dir_config_vae", "not a diffusers VAE folder")),
        "vae-bad-config": ("{i}/bad_config_vae", ("config.json", "cannot read")),
        "vae-offline-not-cached": ("ema", ("offline", "not in the cache")),
    }),
    "extract-unwritable-out": case("extract-latents", *replace(EXTRACT, "--out", "{u}/lat"), needles=("{u}",)),
    "extract-out-is-a-file": case("extract-latents", *replace(EXTRACT, "--out", "{i}/a_file"),
                                  needles=("a_file", "a file is in the way")),
    "extract-out-other-run": case("extract-latents", *replace(EXTRACT, "--out", "{t}/other-run", "--image-size", "16"),
                                  needles=("another shard count", "new --out")),
    "extract-zero-image-size": case("extract-latents", *EXTRACT, "--image-size", "0",
                                    needles=("--image-size 0", "multiple of 8"), status=2),
    "extract-odd-image-size": case("extract-latents", *EXTRACT, "--image-size", "12",
                                   needles=("--image-size 12", "multiple of 8"), status=2),
    "extract-zero-batch": case("extract-latents", *EXTRACT, "--batch-size", "0", needles=("--batch-size 0", "positive"),
                               status=2),
    "extract-negative-shards": case("extract-latents", *EXTRACT, "--num-shards", "-1",
                                    needles=("--num-shards -1", "positive"), status=2),
    "extract-half-multiprocess": case("extract-latents", *EXTRACT, "--process-id", "1",
                                      needles=("--coordinator", "missing"), status=2),
    "extract-unknown-tfds": case("extract-latents", *replace(without(EXTRACT, "--path"), "--source", "tfds"), "--name",
                                 "no_such_dataset_xyz", "--data-dir", "{t}/tfds",
                                 needles=("no dataset named 'no_such_dataset_xyz'",)),
    # ---------------------------------------------------------------- evaluate
    "evaluate-missing-samples": case("evaluate", "{i}/absent.npz", "{i}/good.npz",
                                     needles=("absent.npz", "no such file")),
    "evaluate-missing-reference": case("evaluate", "{i}/good.npz", "{i}/absent.npz",
                                       needles=("absent.npz", "no such file")),
    "evaluate-text-npz": case("evaluate", "{i}/text.npz", "{i}/good.npz",
                              needles=("text.npz", "not an .npz")),
    "evaluate-garbage-npz": case("evaluate", "{i}/good.npz", "{i}/garbage.npz",
                                 needles=("garbage.npz", "not an .npz")),
    "evaluate-truncated-npz": case("evaluate", "{i}/truncated.npz", "{i}/good.npz",
                                   needles=("truncated.npz", "truncated")),
    "evaluate-folder-as-npz": case("evaluate", "{i}/empty_dir", "{i}/good.npz",
                                   needles=("empty_dir", "a folder")),
    "evaluate-no-arr_0": case("evaluate", "{i}/named.npz", "{i}/good.npz",
                              needles=("named.npz", "missing arr_0")),
    "evaluate-float-images": case("evaluate", "{i}/float.npz", "{i}/good.npz",
                                  needles=("float.npz", "uint8")),
    "evaluate-nchw-images": case("evaluate", "{i}/nchw.npz", "{i}/good.npz",
                                 needles=("nchw.npz", "NHWC")),
    "evaluate-no-images": case("evaluate", "{i}/empty.npz", "{i}/good.npz",
                               needles=("empty.npz", "is empty")),
    "evaluate-too-few-images": case("evaluate", "{i}/few.npz", "{i}/good.npz",
                                    needles=("few.npz", "at least 4")),
    "evaluate-bad-statistics": case("evaluate", "{i}/good.npz", "{i}/bad_stats.npz",
                                    needles=("bad_stats.npz", "sigma")),
    "evaluate-no-weights": case("evaluate", *EVALUATE,
                                needles=("no Inception weights", "--inception-weights", "pt_inception-2015-12-05")),
    "evaluate-missing-weights": case("evaluate", *EVALUATE, "--inception-weights", "{i}/absent.pth",
                                     needles=("absent.pth", "no such file")),
    "evaluate-weights-folder": case("evaluate", *EVALUATE, "--inception-weights", "{i}/empty_dir",
                                    needles=("empty_dir", "a folder")),
    "evaluate-garbage-weights": case("evaluate", *EVALUATE, "--inception-weights", "{i}/garbage.pth",
                                     needles=("garbage.pth", "truncated or corrupt")),
    "evaluate-text-weights": case("evaluate", *EVALUATE, "--inception-weights", "{i}/text.txt",
                                  needles=("text.txt", "unknown checkpoint type")),
    "evaluate-dit-as-weights": case("evaluate", *EVALUATE, "--inception-weights", "{i}/tiny-dit.safetensors",
                                    needles=("not the FID Inception weights", "looks like a DiT checkpoint")),
    "evaluate-zero-batch": case("evaluate", *EVALUATE, "--batch-size", "0", needles=("--batch-size 0", "positive"),
                                status=2),
    "evaluate-zero-processes": case("evaluate", *EVALUATE, "--num-processes", "0",
                                    needles=("--num-processes", ">= 1"), status=2),
    # --json is checked once the weights are found (text.txt: found, and not read before the check)
    "evaluate-unwritable-json": case("evaluate", *EVALUATE_JSON, "{u}/m.json", needles=("{u}",)),
    "evaluate-json-is-a-folder": case("evaluate", *EVALUATE_JSON, "{i}/empty_dir",
                                      needles=("--json", "empty_dir", "a folder")),
    "evaluate-json-under-a-file": case("evaluate", *EVALUATE_JSON, "{i}/a_file/m.json",
                                       needles=("a_file", "a file is in the way")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clean_error_line(name, inputs, tmp_path, capfd, quick_network, monkeypatch):
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
    run_case(CASES[name], inputs, tmp_path, capfd)
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


# ----------------------------------------------------------------------------------------------------------
# dit_jax.paths.atomic_write: the one atomic write every writer above uses.
# ----------------------------------------------------------------------------------------------------------
def test_atomic_write_replaces_on_success_and_leaves_the_old_file_on_error(tmp_path):
    import glob

    from dit_jax.paths import atomic_path, atomic_write, write_text_atomic

    target = tmp_path / "out.json"
    target.write_text("old\n")
    with atomic_write(target, "w") as f:
        f.write("new")
        assert target.read_text() == "old\n"  # readers see the old file until the block ends
        (tmp,) = [p for p in tmp_path.iterdir() if p != target]
        assert tmp.name.startswith(".out.json.tmp-") and glob.glob(str(tmp_path / "*")) == [str(target)]
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]

    for fail in (lambda: atomic_write(target, "wb", fsync=True), lambda: atomic_path(target)):
        with pytest.raises(KeyboardInterrupt):  # an interrupt, too, leaves no temporary file behind
            with fail() as f:
                f.write_bytes(b"half") if isinstance(f, Path) else f.write(b"half")
                raise KeyboardInterrupt
        assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["out.json"]

    assert write_text_atomic(tmp_path / "new.txt", "text\n", fsync=True).read_text() == "text\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(target, "a"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "out.json"]
