"""The cost of verified checkpoints: SHA-256 of every file of a step, at save (orbax's background thread) and restore.

    python bench/checksum_cost.py --gb 1          # a 1 GB float32 state, saved and restored 3 times

Saves a state of `--gb` GB through dit_jax.train.checkpoint.Checkpointer (async, as the trainer), and reports:
the seconds spent summing at save (recorded in the step's manifest: off the training thread), the seconds the
training thread was blocked by save() (unchanged by the checksums: they run after it returns), and the restore
time with and without verification. Results are seconds per GB; the numbers depend on the disk's page cache (the
state was just written, so it is read from memory) and on SHA extensions in the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import jax
import numpy as np

from dit_jax.train import checkpoint as ckpt_lib


def measure(gb: float, repeats: int) -> dict[str, float]:
    n = int(gb * 2**30 / 4 / 8)
    state = {f"w{i}": jax.numpy.asarray(np.random.default_rng(i).standard_normal(n, dtype=np.float32))
             for i in range(8)}
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    size_gb = sum(a.nbytes for a in state.values()) / 1e9
    rows = []
    for r in range(repeats):
        d = tempfile.mkdtemp(prefix="dit-jax-checksum-bench-")
        try:
            ck = ckpt_lib.Checkpointer(d, keep=None)
            t0 = time.perf_counter()
            ck.save(1, state)
            t_call = time.perf_counter() - t0
            ck.wait()
            t_save = time.perf_counter() - t0
            manifest = json.loads((ck.step_dir(1) / ckpt_lib.MANIFEST).read_text())
            ck.close()
            reader = ckpt_lib.Checkpointer(d, read_only=True)
            t0 = time.perf_counter()
            problem = reader._verify_files(1)
            t_verify = time.perf_counter() - t0
            assert problem is None, problem
            t0 = time.perf_counter()
            reader._restore_step(1, abstract)
            t_restore = time.perf_counter() - t0
            reader.close()
            rows.append(dict(save_call_s=t_call, save_total_s=t_save, sum_at_save_s=manifest["seconds"],
                             verify_s=t_verify, restore_without_verify_s=t_restore))
        finally:
            shutil.rmtree(d, ignore_errors=True)
    best = {k: min(r[k] for r in rows) for k in rows[0]}
    return dict(gb=round(size_gb, 3), cpus=os.cpu_count(), **{k: round(v, 3) for k, v in best.items()},
                sum_at_save_s_per_gb=round(best["sum_at_save_s"] / size_gb, 3),
                verify_s_per_gb=round(best["verify_s"] / size_gb, 3),
                restore_s_per_gb=round(best["restore_without_verify_s"] / size_gb, 3))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    print(json.dumps(measure(**vars(p.parse_args())), indent=1))


if __name__ == "__main__":
    main()
