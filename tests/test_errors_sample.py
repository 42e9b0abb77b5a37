"""Bad inputs to the sampling commands (`sample`, `sample-fid`, `sample-ddt` (another name for `sample`),
`ddt-schedule`; they take the same model and sampler flags), as a careless user
types them: each gives one `dit-jax COMMAND: error: ...` line naming the problem, exit status 1 (2 for a bad option
or a combination of options that does not apply), no traceback, and nothing written into the inputs.

A flag that does not apply (to the model, or to the mode) is an error that says why, not silently ignored. Every
check that can be made before the model is loaded is made then, so most cases never load anything: the inputs are
small files (a text file, random bytes named .pt, an empty folder, a folder that looks like a training run); the
cases that need a real model share one tiny digits run (pixel space, trained for 2 steps), built once, and fail
before any sampling. Nothing is downloaded: every command runs with --offline and a fresh cache."""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np
import pytest

from cli_errors import Case, assert_clean_error, case, flag_cases, replace, run_case, run_cli, without

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One folder of bad (and a few good) inputs, read by every case and written by none."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "text.txt").write_text("hello, I am not a checkpoint\n")
    garbage = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for name in ("garbage.pt", "garbage.ckpt"):
        (d / name).write_bytes(garbage)
    (d / "empty_dir").mkdir()
    (d / "a_file").write_text("a file where a folder is expected\n")
    (d / "schedule.json").write_text("{not json")
    # what `is_training_run` recognises (a step folder holding state/), without a checkpoint inside: enough for
    # the checks made before loading
    (d / "looks_like_a_run" / "checkpoints" / "10" / "state").mkdir(parents=True)
    (d / "run_without_checkpoint" / "checkpoints").mkdir(parents=True)  # a run before its first checkpoint
    # checkpoints that are not a DiT's: a DDT's keys (its denoiser alone), and keys that tell no architecture
    from safetensors.numpy import save_file

    save_file({"s_embedder.proj.weight": np.zeros((8, 16), np.float32),
               "blocks.0.attn.qkv.weight": np.zeros((24, 8), np.float32)}, str(d / "ddt.safetensors"))
    save_file({"encoder.weight": np.zeros(4, np.float32)}, str(d / "no_dit.safetensors"))
    return d


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 2-step digits run of a tiny DiT (objective=diffusion, pixel space: no VAE), as tests/test_sample_cli.py."""
    from dit_jax.train.config_load import load_config
    from dit_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("run")
    cfg = load_config(str(REPO / "configs" / "digits.py"), [
        "train.steps=2", "train.global_batch=8", "train.ckpt_every=100", "train.log_every=1",
        "train.sample_every=0", "model.depth=1", "model.hidden_size=32", "model.num_heads=2",
    ])
    assert train(cfg, workdir)["step"] == 2
    return workdir


# Each command's arguments that are fine, so that each case's one bad input is what fails.
SAMPLE = ("--ckpt", "{i}/garbage.pt", "--out", "{t}/grid.png", "--steps", "2", "--no-progress", "--offline",
          "--cache-dir", "{t}/cache")
FID = ("--ckpt", "{i}/garbage.pt", "--sample-dir", "{t}/samples", "--num-samples", "4", "--steps", "2",
       "--no-progress", "--offline", "--cache-dir", "{t}/cache")
DDT = ("--ckpt", "{i}/garbage.ckpt", "--variant", "DDT-S/2", "--out", "{t}/grid.png", "--steps", "2", "--no-progress",
       "--offline", "--cache-dir", "{t}/cache")
DDT_FID = (*without(DDT, "--out"), "--sample-dir", "{t}/samples", "--num-samples", "4")  # sample-fid on a DDT
SCHEDULE = ("--random-init", "--variant", "DDT-S/2", "--res", "64", "--num-steps", "4", "--refresh-rate", "2",
            "--batch", "1", "--out", "{t}/schedule.json")
SCHEDULE_CKPT = without(SCHEDULE, "--random-init")

# The same bad paths given to every command that takes such a path: (case prefix, command, arguments, flag).
CHECKPOINT_FLAGS = [("sample", "sample", SAMPLE, "--ckpt"), ("fid", "sample-fid", FID, "--ckpt"),
                    ("ddt", "sample-ddt", DDT, "--ckpt"), ("schedule", "ddt-schedule", SCHEDULE_CKPT, "--ckpt")]
BAD_CHECKPOINTS = {  # case name: (the path, words of the error; FLAG: the flag)
    "missing-ckpt": ("{i}/absent.ckpt", ("FLAG", "absent.ckpt", "no such file or folder")),
    "text-ckpt": ("{i}/text.txt", ("FLAG", "text.txt", "not a checkpoint file", "'.txt'")),
    "garbage-ckpt": ("{i}/garbage.ckpt", ("garbage.ckpt", "truncated or corrupt")),  # found reading it
    "folder-ckpt": ("{i}/empty_dir", ("FLAG", "empty_dir", "a folder that is not", "training run")),
}
OUTPUT_FILE_FLAGS = [("sample", "sample", SAMPLE, "--out"), ("sample", "sample", SAMPLE, "--npz"),
                     ("ddt", "sample-ddt", DDT, "--out"), ("schedule", "ddt-schedule", SCHEDULE, "--out")]
BAD_OUTPUT_FILES = {
    "unwritable": ("{u}/out.bin", ("FLAG", "{u}", "permission")),
    "is-a-folder": ("{i}/empty_dir", ("FLAG", "empty_dir", "is a folder, where a file is expected")),
    "under-a-file": ("{i}/a_file/out.bin", ("FLAG", "a_file", "is a file, where a folder is expected")),
}
OUTPUT_FOLDER_FLAGS = [("fid", "sample-fid", FID, "--sample-dir"), ("ddt-fid", "sample-fid", DDT_FID, "--sample-dir")]
BAD_OUTPUT_FOLDERS = {
    "unwritable": ("{u}/samples", ("FLAG", "{u}", "permission")),
    "is-a-file": ("{i}/a_file", ("FLAG", "a_file", "is a file, where a folder is expected")),
    "under-a-file": ("{i}/a_file/samples", ("FLAG", "a_file", "is a file, where a folder is expected")),
}


def bad_paths(flags: list[tuple[str, str, tuple[str, ...], str]], paths: dict[str, tuple[str, tuple[str, ...]]],
              *, flag_in_name: bool = True) -> dict[str, Case]:
    """A case for each bad path given to each flag: '<prefix>[-<flag>]-<name>'."""
    out = {}
    for prefix, command, args, flag in flags:
        out.update(flag_cases(f"{prefix}-{flag.removeprefix('--')}" if flag_in_name else prefix, command, args, flag,
                              paths))
    return out


CASES: dict[str, Case] = {
    **bad_paths(CHECKPOINT_FLAGS, BAD_CHECKPOINTS, flag_in_name=False),
    **bad_paths(OUTPUT_FILE_FLAGS, BAD_OUTPUT_FILES),
    **bad_paths(OUTPUT_FOLDER_FLAGS, BAD_OUTPUT_FOLDERS),
    # ---------------------------------------------------------------- checkpoints: what only some commands take
    "sample-run-without-checkpoint": case("sample", *replace(SAMPLE, "--ckpt", "{i}/run_without_checkpoint"),
                                          needles=("run_without_checkpoint", "without a complete checkpoint")),
    "sample-broken-run": case("sample", *replace(SAMPLE, "--ckpt", "{i}/looks_like_a_run"),
                              needles=("looks_like_a_run",)),
    "ddt-variant-with-a-run": case("sample-ddt", *replace(DDT, "--ckpt", "{i}/looks_like_a_run"),
                                   needles=("--variant does not apply", "looks_like_a_run")),
    "schedule-variant-with-a-run": case("ddt-schedule", *replace(without(SCHEDULE_CKPT, "--res"), "--checkpoint",
                                                                 "{i}/looks_like_a_run"),
                                        needles=("--variant does not apply", "looks_like_a_run")),
    # ---------------------------------------------------------------- sample (and sample-fid): options
    "sample-labels-not-numbers": case("sample", *SAMPLE, "--labels", "cat,dog",
                                      needles=("--labels", "comma-separated integers"), status=2),
    "sample-labels-empty": case("sample", *SAMPLE, "--labels", ",", needles=("--labels is empty",), status=2),
    "sample-zero-steps": case("sample", *replace(SAMPLE, "--steps", "0"), needles=("--steps 0", "positive"),
                              status=2),
    "sample-negative-steps": case("sample", *replace(SAMPLE, "--steps", "-5"), needles=("--steps -5", "positive"),
                                  status=2),
    # a diffusion sampler named: its respacing is checked before loading (without --sampler, once the model tells
    # its objective: RUN_CASES)
    "sample-too-many-steps": case("sample", *replace(SAMPLE, "--steps", "2000"), "--sampler", "ddpm",
                                  needles=("--steps 2000", "1000 steps"), status=2),
    "sample-ddim-steps": case("sample", *replace(SAMPLE, "--steps", "400"), "--sampler", "ddim",
                              needles=("--steps 400", "ddim", "integer stride"), status=2),
    "sample-negative-cfg": case("sample", *SAMPLE, "--cfg-scale", "-1", needles=("--cfg-scale -1", ">= 0"), status=2),
    "sample-nan-cfg": case("sample", *SAMPLE, "--cfg-scale", "nan", needles=("--cfg-scale nan", "finite"), status=2),
    "sample-zero-nrow": case("sample", *SAMPLE, "--nrow", "0", needles=("--nrow 0", "positive"), status=2),
    "sample-eta-with-ddpm": case("sample", *SAMPLE, "--eta", "0.5",
                                 needles=("--eta", "ddim sampler only", "--sampler ddim"), status=2),
    "sample-eta-out-of-range": case("sample", *SAMPLE, "--sampler", "ddim", "--eta", "2",
                                    needles=("--eta 2", "[0, 1]"), status=2),
    "sample-cfg-channels-without-guidance": case("sample", *SAMPLE, "--cfg-scale", "1", "--cfg-channels", "3",
                                                 needles=("--cfg-channels", "--cfg-scale 1"), status=2),
    "sample-zero-cfg-channels": case("sample", *SAMPLE, "--cfg-channels", "0",
                                     needles=("--cfg-channels 0", "positive"), status=2),
    "sample-cfg-channels-not-a-number": case("sample", *SAMPLE, "--cfg-channels", "x",
                                             needles=("--cfg-channels", "integer or 'all'"), status=2),
    "sample-image-size-unsupported": case("sample", *without(SAMPLE, "--ckpt"), "--image-size", "128",
                                          needles=("--image-size", "128"), status=2),
    "sample-missing-vae": case("sample", *SAMPLE, "--vae", "{i}/absent_vae",
                               needles=("--vae", "absent_vae", "no such file or folder")),
    "sample-vae-is-a-file": case("sample", *SAMPLE, "--vae", "{i}/text.txt",
                                 needles=("--vae", "text.txt", "is a file")),
    # a sampler flag of the other objective than --sampler's
    "sample-cfg-channels-with-a-flow-sampler": case("sample", *SAMPLE, "--sampler", "euler", "--cfg-channels", "3",
                                                    needles=("--cfg-channels", "--sampler euler", "objective=flow"),
                                                    status=2),
    "sample-flow-flags-with-a-diffusion-sampler": case("sample", *SAMPLE, "--sampler", "ddim", "--shift", "2",
                                                       "--refresh-rate", "2",
                                                       needles=("--shift and --refresh-rate", "--sampler ddim",
                                                                "objective=diffusion"), status=2),
    "sample-fid-flag": case("sample", *SAMPLE, "--num-samples", "4", needles=("unrecognized", "--num-samples"),
                            status=2),
    "fid-zero-samples": case("sample-fid", *replace(FID, "--num-samples", "0"), needles=("--num-samples 0", "positive"),
                             status=2),
    "fid-negative-samples": case("sample-fid", *replace(FID, "--num-samples", "-10"),
                                 needles=("--num-samples -10", "positive"), status=2),
    "fid-zero-batch": case("sample-fid", *FID, "--per-device-batch", "0",
                           needles=("--per-device-batch 0", "positive"), status=2),
    "fid-nan-cfg": case("sample-fid", *FID, "--cfg-scale", "nan", needles=("--cfg-scale nan", "finite"), status=2),
    "fid-eta-with-ddpm": case("sample-fid", *FID, "--eta", "0.3", needles=("ddim sampler only",), status=2),
    "fid-grid-flags": case("sample-fid", *FID, "--labels", "1,2", needles=("unrecognized", "--labels"), status=2),
    "fid-flow-flag-with-a-diffusion-sampler": case("sample-fid", *FID, "--sampler", "ddpm", "--last-step", "0.1",
                                                   needles=("--last-step", "objective=diffusion"), status=2),
    # ---------------------------------------------------------------- sample-fid on a DDT (flow flags)
    "ddt-fid-zero-num-samples": case("sample-fid", *replace(DDT_FID, "--num-samples", "0"),
                                     needles=("--num-samples 0", "positive"), status=2),
    "ddt-fid-empty-interval": case("sample-fid", *DDT_FID, "--interval-min", "0.5", "--interval-max", "0.5",
                                   needles=("--interval-min", "below interval-max"), status=2),
    "ddt-fid-missing-schedule": case("sample-fid", *DDT_FID, "--schedule", "{i}/absent.json",
                                     needles=("--schedule", "absent.json", "no such file")),
    "ddt-fid-schedule-and-refresh-rate": case("sample-fid", *DDT_FID, "--schedule", "{i}/schedule.json",
                                              "--refresh-rate", "2", needles=("--schedule or --refresh-rate",),
                                              status=2),
    # ---------------------------------------------------------------- sample-ddt
    "ddt-no-ckpt": case("sample-ddt", *without(DDT, "--ckpt"), needles=("--ckpt", "--random-init"), status=2),
    "ddt-ckpt-and-random-init": case("sample-ddt", *DDT, "--random-init", needles=("--random-init", "--ckpt"),
                                     status=2),
    "ddt-which-with-random-init": case("sample-ddt", *without(DDT, "--ckpt"), "--random-init", "--which", "model",
                                       needles=("--which", "--random-init"), status=2),
    "ddt-unknown-variant": case("sample-ddt", *replace(DDT, "--variant", "DDT-Q/3"),
                                needles=("--variant DDT-Q/3", "unknown variant", "DDT-S/2"), status=2),
    "ddt-missing-schedule": case("sample-ddt", *DDT, "--schedule", "{i}/absent.json",
                                 needles=("--schedule", "absent.json", "no such file")),
    "ddt-schedule-is-a-folder": case("sample-ddt", *DDT, "--schedule", "{i}/empty_dir",
                                     needles=("--schedule", "empty_dir", "is a folder")),
    "ddt-missing-vae": case("sample-ddt", *DDT, "--vae", "{i}/absent_vae",
                            needles=("--vae", "no such file or folder")),
    "ddt-zero-steps": case("sample-ddt", *replace(DDT, "--steps", "0"), needles=("--steps 0", "positive"), status=2),
    "ddt-nan-cfg": case("sample-ddt", *DDT, "--cfg-scale", "nan", needles=("--cfg-scale nan", "finite"), status=2),
    "ddt-empty-interval": case("sample-ddt", *DDT, "--interval-min", "0.9", "--interval-max", "0.2",
                               needles=("--interval-min", "below interval-max"), status=2),
    "ddt-zero-shift": case("sample-ddt", *DDT, "--shift", "0", needles=("--shift 0", "> 0"), status=2),
    "ddt-last-step-out-of-range": case("sample-ddt", *DDT, "--last-step", "2", needles=("--last-step 2", "(0, 1]"),
                                       status=2),
    "ddt-negative-refresh-rate": case("sample-ddt", *DDT, "--refresh-rate", "-1", needles=("--refresh-rate -1",),
                                      status=2),
    "ddt-schedule-and-refresh-rate": case("sample-ddt", *DDT, "--schedule", "{i}/schedule.json", "--refresh-rate",
                                          "2", needles=("--schedule or --refresh-rate",), status=2),
    "ddt-labels-not-numbers": case("sample-ddt", *DDT, "--labels", "1,two", needles=("--labels", "integers"),
                                   status=2),
    "ddt-zero-nrow": case("sample-ddt", *DDT, "--nrow", "0", needles=("--nrow 0", "positive"), status=2),
    # sample-ddt has no FID mode any more (FID is `sample-fid`, for a DDT too): its flags are refused
    "ddt-fid-flags": case("sample-ddt", *DDT, "--num-samples", "4", "--per-device-batch", "4", "--overwrite",
                          needles=("unrecognized", "--num-samples", "--per-device-batch", "--overwrite"), status=2),
    "ddt-sample-dir": case("sample-ddt", *DDT, "--sample-dir", "{t}/samples", needles=("unrecognized", "--sample-dir"),
                           status=2),
    "ddt-eta": case("sample-ddt", *DDT, "--sampler", "euler", "--eta", "0.5", needles=("--eta", "ddim sampler only"),
                    status=2),
    # ---------------------------------------------------------------- ddt-schedule
    "schedule-no-checkpoint": case("ddt-schedule", *SCHEDULE_CKPT, needles=("--ckpt", "--random-init"), status=2),
    "schedule-checkpoint-and-random-init": case("ddt-schedule", *SCHEDULE, "--checkpoint", "{i}/garbage.ckpt",
                                                needles=("--random-init", "--ckpt"), status=2),
    "schedule-which-with-random-init": case("ddt-schedule", *SCHEDULE, "--which", "model",
                                            needles=("--which", "--random-init"), status=2),
    "schedule-no-out": case("ddt-schedule", *without(SCHEDULE, "--out"), needles=("--out",), status=2),
    "schedule-zero-refresh-rate": case("ddt-schedule", *without(SCHEDULE, "--refresh-rate"), "--refresh-rate", "0",
                                       needles=("--refresh-rate 0", ">= 1"), status=2),
    "schedule-refresh-rate-above-steps": case("ddt-schedule", *without(SCHEDULE, "--refresh-rate"),
                                              "--refresh-rate", "10", needles=("0 encoder calls for 4 steps",),
                                              status=2),
    "schedule-zero-steps": case("ddt-schedule", *without(SCHEDULE, "--num-steps"), "--num-steps", "0",
                                needles=("--steps 0", "positive"), status=2),  # --num-steps: --steps' other name
    "schedule-zero-batch": case("ddt-schedule", *SCHEDULE, "--batch", "0", needles=("--batch 0", "positive"),
                                status=2),
    "schedule-unknown-variant": case("ddt-schedule", *without(SCHEDULE, "--variant"), "--variant", "DDT-Q/3",
                                     needles=("--variant DDT-Q/3", "unknown variant", "DDT-S/2"), status=2),
    "schedule-not-a-ddt-variant": case("ddt-schedule", *without(SCHEDULE, "--variant"), "--variant", "DiT-XL/2",
                                       needles=("--variant DiT-XL/2", "not a DDT", "no condition encoder", "DDT-S/2"),
                                       status=2),
    "schedule-odd-res": case("ddt-schedule", *without(SCHEDULE, "--res"), "--res", "100",
                             needles=("--image-size 100", "multiple of 8"), status=2),  # --res: --image-size's name
    "schedule-diffusion-flag": case("ddt-schedule", *SCHEDULE, "--cfg-channels", "3",
                                    needles=("--cfg-channels", "ddt-schedule", "objective=flow"), status=2),
    "schedule-empty-interval": case("ddt-schedule", *SCHEDULE, "--interval-min", "1", "--interval-max", "0.5",
                                    needles=("--interval-min", "below interval-max"), status=2),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clean_error_line(name, inputs, tmp_path, capfd):
    run_case(CASES[name], inputs, tmp_path, capfd)
    assert not list(tmp_path.glob("grid.png")) and not list(tmp_path.glob("schedule.json")), "an output was written"


# ---------------------------------------------------------------------------------------------------------------
# Cases that load a real model (the tiny digits run, {i}): what only the model can tell, found before sampling.
# ---------------------------------------------------------------------------------------------------------------
QUICK = ("--steps", "2", "--no-progress")
RUN_CASES: dict[str, Case] = {
    # a pixel-space model has no VAE: --vae would be ignored
    "sample-vae-for-a-pixel-model": case("sample", *QUICK, "--ckpt", "{i}", "--out", "{t}/grid.png", "--vae",
                                         "ema", needles=("samples pixels", "--vae does not apply")),
    "fid-vae-for-a-pixel-model": case("sample-fid", *QUICK, "--ckpt", "{i}", "--sample-dir", "{t}/samples", "--vae",
                                      "mse", needles=("samples pixels", "--vae does not apply")),
    "sample-labels-out-of-range": case("sample", *QUICK, "--ckpt", "{i}", "--out", "{t}/grid.png", "--labels",
                                       "3,10", needles=("--labels", "[10]", "10 classes")),
    "sample-too-many-cfg-channels": case("sample", *QUICK, "--ckpt", "{i}", "--out", "{t}/grid.png",
                                         "--cfg-channels", "5", needles=("--cfg-channels 5", "2 output channels")),
    # the image size is the run's
    "sample-image-size-of-another-run": case("sample", *QUICK, "--ckpt", "{i}", "--out", "{t}/grid.png",
                                             "--image-size", "512", needles=("16 px", "512", "drop the image size")),
    # a diffusion run given a flow sampler or flow flags (sample-ddt: sample's other name), or too many steps
    # for its 1000-step process
    "ddt-diffusion-run-flow-sampler": case("sample-ddt", *QUICK, "--ckpt", "{i}", "--out", "{t}/grid.png",
                                           "--sampler", "euler",
                                           needles=("--sampler euler", "objective=diffusion", "ddpm"), status=2),
    "sample-diffusion-run-flow-flags": case("sample", *QUICK, "--ckpt", "{i}", "--out", "{t}/grid.png",
                                            "--interval-min", "0.2",
                                            needles=("--interval-min", "objective=diffusion", "drop it"), status=2),
    "fid-diffusion-run-schedule": case("sample-fid", *QUICK, "--ckpt", "{i}", "--sample-dir", "{t}/samples",
                                       "--refresh-rate", "2",
                                       needles=("--refresh-rate", "objective=diffusion"), status=2),
    "sample-diffusion-run-too-many-steps": case("sample", "--steps", "2000", "--no-progress", "--ckpt", "{i}",
                                                "--out", "{t}/grid.png", needles=("--steps 2000", "1000 steps"),
                                                status=2),
    "schedule-diffusion-run": case("ddt-schedule", "--num-steps", "2", "--refresh-rate", "2", "--checkpoint", "{i}",
                                   "--out", "{t}/schedule.json", needles=("no condition encoder", "dit-jax sample")),
    # sample-fid into a folder of samples made with other settings, or with a folder where its .npz goes
    "fid-folder-of-other-settings": case("sample-fid", *QUICK, "--ckpt", "{i}", "--sample-dir", "{t}/samples",
                                         "--num-samples", "4", needles=("other settings", "--overwrite")),
    "fid-npz-is-a-folder": case("sample-fid", *QUICK, "--ckpt", "{i}", "--sample-dir", "{t}/samples",
                                "--num-samples", "4", "--seed", "1",
                                needles=("the samples' .npz", "is a folder, where a file is expected")),
}


@pytest.mark.slow  # the training run: 20-40 s on 2 cores
@pytest.mark.parametrize("name", list(RUN_CASES))
def test_what_only_the_model_tells_fails_before_sampling(name, run_dir, tmp_path, capfd):
    c = RUN_CASES[name]
    fid = f"{run_dir.name}-step0000002-size-16-vae-none-cfg-1.5-seed-{{}}"
    (tmp_path / "samples" / fid.format(0)).mkdir(parents=True)  # made by another run: its manifest differs
    (tmp_path / "samples" / fid.format(0) / "manifest.json").write_text(json.dumps({"num_samples": 7, "seed": 0}))
    (tmp_path / "samples" / f"{fid.format(1)}.npz").mkdir()  # a folder where seed 1's .npz goes
    run_case(c, run_dir, tmp_path, capfd)  # the run is the input: nothing is written into it
    assert not list(tmp_path.rglob("shard_*.npz")), "failed after sampling"
    assert not (tmp_path / "grid.png").exists() and not (tmp_path / "schedule.json").exists()


def test_a_checkpoint_sample_cannot_read_says_what_to_do(inputs, tmp_path, capfd):
    """`sample` reads a DDT checkpoint (DDT-XL/2 unless --variant says otherwise): one of another size fails naming
    the variant and --variant; a file whose architecture its shapes do not tell is not a checkpoint it can read, and
    the error says what to do instead; `convert`, which has --variant for a DiT, asks for it."""
    for name, needles in (("ddt.safetensors", ("ddt.safetensors", "does not fit DDT-XL/2", "give --variant",
                                               "missing")),
                          ("no_dit.safetensors", ("no_dit.safetensors", "not a DiT checkpoint", "dit-jax sample",
                                                  "dit-jax convert", "--variant"))):
        out = run_case(case("sample", *replace(SAMPLE, "--ckpt", f"{{i}}/{name}"), needles=needles), inputs, tmp_path,
                       capfd)
        assert "pass --variant" not in out
    run_case(case("convert", "{i}/no_dit.safetensors", "{t}/out", needles=("cannot infer the architecture",
                                                                          "pass --variant")), inputs, tmp_path, capfd)


def test_debug_shows_the_traceback(inputs, tmp_path, capfd):
    """The one-line error, and with --debug the traceback before it."""
    argv = ["sample", "--ckpt", str(inputs / "text.txt"), "--out", str(tmp_path / "grid.png")]
    rc, out = run_cli(argv, capfd)
    assert_clean_error(rc, out, "sample", "not a checkpoint file")
    rc, out = run_cli([*argv, "--debug"], capfd)
    assert rc == 1 and "Traceback" in out and "not a checkpoint file" in out.splitlines()[-1]


def test_outputs_are_written_where_named_and_atomically(tmp_path, monkeypatch):
    """--npz writes exactly the path given (np.savez given a name adds .npz to one without); a folder in the way is
    refused; a write that fails (a full disk) leaves no temporary file behind."""
    import errno

    from dit_jax.images import save_npz, save_png

    images = np.zeros((2, 4, 4, 3), np.uint8)
    out = save_npz(tmp_path / "samples.bin", images=images)
    assert out == tmp_path / "samples.bin" and sorted(p.name for p in tmp_path.iterdir()) == ["samples.bin"]
    with np.load(out) as f:
        np.testing.assert_array_equal(f["images"], images)
    (tmp_path / "grid.png").mkdir()
    with pytest.raises(IsADirectoryError):
        save_png(images[0], tmp_path / "grid.png")

    def full_disk(f, **arrays):
        f.write(b"half an .npz")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_npz(tmp_path / "s.npz", images=images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png", "samples.bin"]
