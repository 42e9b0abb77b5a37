"""The sampling, extraction and evaluation commands as a 2-process JAX job (2 processes x 2 CPU devices, over
gloo), against one plain process:

- `sample-fid` writes the same .npz, byte for byte, as 1 process x 4 devices with the same --per-device-batch
  (processes take shards round-robin; only process 0 writes the manifest and the .npz);
- `extract-latents` split over 2 processes writes the same shards and sidecars, byte for byte, as 1 process;
- `evaluate` runs on process 0 only (it says so; process 1 waits for it and exits with its status) and prints
  the same numbers as one process on the same local devices.

Every job runs under a hard time limit (tests/multiproc.py): a hang fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import numpy as np
import pytest

from multiproc import DIT_JAX, REPO, run, single

@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    from test_weights import tiny_vae_folder

    return tiny_vae_folder(tmp_path_factory.mktemp("vae") / "vae")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 1-step digits run of a tiny DiT (pixel space: no VAE), what `sample-fid --ckpt` loads."""
    from dit_jax.train.config_load import load_config
    from dit_jax.train.loop import train

    workdir = tmp_path_factory.mktemp("run")
    cfg = load_config(str(REPO / "configs" / "digits.py"), [
        "train.steps=1", "train.global_batch=8", "train.ckpt_every=100", "train.log_every=1", "train.sample_every=0",
        "model.depth=1", "model.hidden_size=32", "model.num_heads=2", "optim.ema_decay=0.5",
    ])
    assert train(cfg, workdir)["step"] == 1
    return workdir


@pytest.mark.slow  # 35-50 s on 2 cores (the training run included)
def test_sample_fid_on_2_processes_writes_the_same_npz_as_1(run_dir, tmp_path):
    argv = [*DIT_JAX, "sample-fid", "--ckpt", str(run_dir), "--num-samples", "10", "--per-device-batch", "1",
            "--steps", "2", "--no-progress"]
    out1 = single([*argv, "--sample-dir", str(tmp_path / "one")], cpu_devices=4)
    job = run([*argv, "--sample-dir", str(tmp_path / "two")], 2, cpu_devices=2)

    (npz1,) = (tmp_path / "one").glob("*.npz")
    (npz2,) = (tmp_path / "two").glob("*.npz")
    assert npz1.name == npz2.name and str(npz1.resolve()) in out1
    assert npz1.read_bytes() == npz2.read_bytes()
    with np.load(npz2) as f:
        images = f["arr_0"]
    assert images.shape == (10, 16, 16, 1) and images.dtype == np.uint8 and images.std() > 0
    # 2 devices per process x 1 per device: 5 shards of 2, round-robin (p0: 0, 2, 4; p1: 1, 3)
    folder = tmp_path / "two" / npz2.stem
    assert sorted(p.name for p in folder.glob("shard_*.npz")) == [f"shard_{k:05d}.npz" for k in range(5)]
    assert json.loads((folder / "manifest.json").read_text())["shard_size"] == 2
    p0, p1 = job.text(0), job.text(1)
    assert "[p0/2] wrote shard_00000.npz" in p0 and "[p0/2] wrote shard_00004.npz" in p0
    assert "[p1/2] wrote shard_00001.npz" in p1 and "[p1/2] wrote shard_00003.npz" in p1
    assert "shard_00001" not in p0 and "shard_00000" not in p1
    assert str(npz2.resolve()) in p0 and str(npz2.resolve()) not in p1  # process 0 alone assembles the .npz
    assert "[p1/2] sampling 10 images" in p1 and "on 2 processes x 2 device(s)" in p1

    # Resumed on 2 processes: only the lost shard is sampled again (by its process), the .npz is the same.
    (folder / "shard_00003.npz").unlink()
    npz2.unlink()
    job = run([*argv, "--sample-dir", str(tmp_path / "two")], 2, cpu_devices=2)
    assert "wrote shard" not in job.text(0) and "[p1/2] wrote shard_00003.npz" in job.text(1)
    assert "wrote shard_00001" not in job.text(1) and npz2.read_bytes() == npz1.read_bytes()
    # Other settings into the folder: process 0 refuses it and process 1 learns so (no hang). Process 1 prints its
    # error before process 0 can exit (JAX's shutdown waits for every process); the launcher may then stop it.
    job = run([*argv, "--sample-dir", str(tmp_path / "two"), "--steps", "3"], 2, cpu_devices=2,
              expect_ok=False)  # the last --steps wins
    assert job.returncodes[0] == 1 and job.returncodes[1] in (1, -signal.SIGTERM)
    assert "holds samples made with other settings" in job.text(0) and "process 0 refused" in job.text(1)


def test_extract_latents_on_2_processes_writes_the_same_records_as_1(vae, tmp_path):
    from test_extract_latents import make_folder

    from dit_jax.data.latents import LatentsSource, decode_latent_record

    make_folder(tmp_path / "imgs", n_per_class=4)  # 8 images and one unreadable file
    argv = [*DIT_JAX, "extract-latents", "--vae", str(vae), "--source", "folder", "--path", str(tmp_path / "imgs"),
            "--image-size", "32", "--batch-size", "2", "--num-shards", "3"]
    single([*argv, "--out", str(tmp_path / "one")], cpu_devices=2)
    job = run([*argv, "--out", str(tmp_path / "two")], 2, cpu_devices=2)

    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two").iterdir())
    assert len(names) == 6  # 3 shards + 3 sidecars, no temporary files left
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    one, two = LatentsSource(tmp_path / "one"), LatentsSource(tmp_path / "two")
    assert len(one) == len(two) == 8
    for k in range(len(one)):
        a, b = decode_latent_record(one[k]["data"]), decode_latent_record(two[k]["data"])
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # shards 0 and 2 are process 0's, shard 1 process 1's; each says so, and process 0 reports the end
    p0, p1 = job.text(0), job.text(1)
    assert "[p0/2] shard 1/3" in p0 and "[p0/2] shard 3/3" in p0 and "[p1/2] shard 2/3" in p1
    assert "shard 2/3" not in p0 and "shard 1/3" not in p1
    assert "[p1/2] this process's shards are done" in p1 and "train with" not in p1
    assert "done: every process finished" in p0


FAST_EVALUATE = """\
import sys
import numpy as np
import dit_jax.evaluate.fid as fid
# a stand-in for scipy's sqrtm of 2048 x 2048 (~15 s on 2 cores): the same in both runs; test_evaluate tests sqrtm
fid._sqrtm = lambda m: np.diag(np.sqrt(np.clip(np.diag(m), 0, None)))
from dit_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # 20-45 s on 2 cores: Inception at 299 px
def test_evaluate_runs_on_process_0_and_gives_the_numbers_of_1_process(tmp_path):
    torch = pytest.importorskip("torch")
    from inception_reference import random_inception_state_dict

    from dit_jax.evaluate.npz import write_samples_npz

    weights = tmp_path / "pt_inception-random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_inception_state_dict(seed=1).items()}, weights)
    rng = np.random.default_rng(10)
    write_samples_npz(tmp_path / "samples.npz", rng.integers(0, 256, (6, 32, 32, 3)).astype(np.uint8))
    write_samples_npz(tmp_path / "ref.npz", rng.integers(0, 256, (5, 32, 32, 3)).astype(np.uint8))
    argv = [sys.executable, "-c", FAST_EVALUATE, "evaluate", str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"),
            "--inception-weights", str(weights), "--no-progress"]
    out1 = single([*argv, "--json", str(tmp_path / "one.json")], cpu_devices=2)
    # Process 0 computes on the same 2 local devices as the one process: it may reuse that run's compiled programs
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    same_cache = [{"JAX_COMPILATION_CACHE_DIR": os.path.join(cache, "mp1-p0")}, {}] if cache else None
    job = run([*argv, "--json", str(tmp_path / "two.json")], 2, cpu_devices=2, extra_env=same_cache)

    def numbers(text: str) -> list[str]:
        names = ("Inception Score:", "FID:", "sFID:", "Precision:", "Recall:")
        return [line.split("] ")[-1] for line in text.splitlines() if line.split("] ")[-1].startswith(names)]

    assert len(numbers(out1)) == 5 and numbers(job.text(0)) == numbers(out1)
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    for key in ("inception_score", "fid", "sfid", "precision", "recall"):
        assert two[key] == one[key], key
    assert "runs on one process" in job.text(0) and "process 0's 2 local device(s)" in job.text(0)
    # process 1 waits for process 0 (exiting at once would end the job after JAX's 5-minute shutdown barrier)
    assert "[p1/2] dit-jax evaluate runs on one process" in job.text(1) and numbers(job.text(1)) == []
    assert "[p1/2] process 0 finished (exit status 0)" in job.text(1)


@pytest.mark.slow  # ~30-60 s on 2 cores
def test_sample_fid_on_2_processes_from_an_official_pt(vae, tmp_path):
    """An official .pt is converted into the weights cache by each process (its own conversion, under the cache's
    lock; no job-wide Orbax barrier) and loaded onto each process's devices: the .npz equals one process's."""
    import torch
    from flax import nnx

    from dit_jax.convert import to_official_state_dict
    from dit_jax.models import DiT

    model = DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=384, depth=1, num_heads=6, num_classes=10,
                rngs=nnx.Rngs(0))
    pt = tmp_path / "tiny.pt"
    torch.save({k: torch.from_numpy(v) for k, v in to_official_state_dict(model).items()}, pt)
    argv = [*DIT_JAX, "sample-fid", "--ckpt", str(pt), "--vae", str(vae), "--num-samples", "8",
            "--per-device-batch", "1", "--steps", "2", "--no-progress"]
    single([*argv, "--sample-dir", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "cache1")], cpu_devices=4)
    run([*argv, "--sample-dir", str(tmp_path / "two"), "--cache-dir", str(tmp_path / "cache2")], 2, cpu_devices=2)
    (npz1,) = (tmp_path / "one").glob("*.npz")
    (npz2,) = (tmp_path / "two").glob("*.npz")
    assert npz1.name == npz2.name and npz1.read_bytes() == npz2.read_bytes()
    converted = [d for d in (tmp_path / "cache2" / "converted").iterdir() if not d.name.startswith(".")]
    assert len(converted) == 1 and (converted[0] / "dit_config.json").is_file()
