"""`dit-jax evaluate`: Inception Score, FID, sFID, precision and recall of a sample batch against a reference
batch, as the ADM evaluation suite (guided-diffusion evaluations/evaluator.py) computes them.

    dit-jax evaluate samples.npz VIRTUAL_imagenet256_labeled.npz \\
        --inception-weights pt_inception-2015-12-05-6726825d.pth [--batch-size 256] [--json metrics.json]

Both files are ADM .npz files: arr_0 uint8 (N, H, W, 3); the reference may also hold mu/sigma/mu_s/sigma_s,
which are then used for FID and sFID (ADM does the same). Note the order: samples first, then the reference
(ADM's own script takes the reference first). The weights are pytorch-fid's FID Inception file from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
(or $DIT_JAX_INCEPTION_WEIGHTS). The five numbers go to stdout in ADM's order and names; progress to stderr.

It runs on one process, on that process's local devices. Started as several processes (every host of a pod, or
--coordinator/--num-processes/--process-id), process 0 computes the metrics, exactly as a one-process run on
the same local devices would, and writes --json; the other processes say so, wait for it and exit with its
exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dit_jax import distributed

DEFAULT_BATCH_SIZE = 256  # = dit_jax.evaluate.evaluator.DEFAULT_BATCH_SIZE; heavy imports wait for run()


def register(subparsers: Any, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="sample batch .npz (arr_0 uint8 (N, H, W, 3))")
    p.add_argument("reference", help="reference batch .npz (arr_0, optionally mu, sigma, mu_s, sigma_s)")
    p.add_argument("--inception-weights", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $DIT_JAX_INCEPTION_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help=f"images per Inception call over all local devices (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--pr-distance-dtype", choices=("float16", "float32"), default="float16",
                   help="precision/recall distances: float16 with a float32 fallback, as ADM (default), or float32")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    distributed.add_arguments(p)
    p.set_defaults(func=run)
    return p


def _write_json(path: str, payload: dict[str, Any]) -> None:
    from dit_jax.paths import write_text_atomic

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out, json.dumps(payload, indent=2) + "\n")


def run(args: argparse.Namespace) -> int:
    """Carry out `dit-jax evaluate`; errors are raised (dit_jax.errors: one line, exit 1; 2 for bad options)."""
    from dit_jax.errors import UsageError

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: expected a positive number of images")
    try:
        distributed.from_args(args)  # before any other JAX call
    except distributed.DistributedError as e:  # what was typed: a usage error
        raise UsageError(str(e)) from e
    import jax

    if jax.process_count() > 1:
        tag = distributed.process_tag()
        what = (f"computing on process 0's {jax.local_device_count()} local device(s); the other "
                f"{jax.process_count() - 1} process(es) wait" if jax.process_index() == 0
                else "process 0 computes the metrics; this process waits for it")
        print(f"{tag}dit-jax evaluate runs on one process: {what}", file=sys.stderr, flush=True)
    ok, status = distributed.on_process_0("dit_jax/evaluate/done", lambda: _evaluate(args), lambda s: s == 0)
    if jax.process_index() != 0:
        print(f"{distributed.process_tag()}process 0 finished ({'exit status 0' if ok else 'with an error'})",
              file=sys.stderr, flush=True)
        if not ok:
            raise distributed.DistributedError(f"{distributed.process_tag()}process 0 failed: see its error")
        return 0
    return status


def _evaluate(args: argparse.Namespace) -> int:
    from dit_jax.convert.common import CheckpointReadError
    from dit_jax.errors import CheckpointMismatchError
    from dit_jax.evaluate import npz
    from dit_jax.evaluate.evaluator import Evaluator, evaluate_npz, iter_metric_lines
    from dit_jax.evaluate.precision_recall import ManifoldEstimator
    from dit_jax.paths import check_output_file

    t0 = time.perf_counter()
    # Everything that can be checked cheaply is checked before the long passes over the images.
    shapes = {role: npz.read_images_header(path) for role, path in (("samples", args.samples),
                                                                   ("reference", args.reference))}
    for role, path in (("samples", args.samples), ("reference", args.reference)):
        npz.read_reference_statistics(path)  # well-formed when present
        if shapes[role][0] <= 3:
            raise ValueError(f"{path}: {shapes[role][0]} images; precision and recall (k = 3) need at least 4")
    from dit_jax.convert.inception import resolve_weights

    weights = resolve_weights(args.inception_weights)
    if args.json:
        check_output_file(args.json, "--json")

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    say(f"loading Inception weights from {weights}")
    # no batch bigger than the larger file: a few hundred samples are not padded to --batch-size images
    batch_size = min(args.batch_size, max(shapes["samples"][0], shapes["reference"][0]))
    try:
        evaluator = Evaluator.from_file(str(weights), batch_size=batch_size, progress=args.progress,
                                        estimator=ManifoldEstimator(distance_dtype=args.pr_distance_dtype))
    except CheckpointMismatchError as e:  # hundreds of keys: one line here, the full list with --debug
        raise CheckpointReadError(f"{weights}: not the FID Inception weights: {e.summary()}") from e
    metrics = evaluate_npz(args.samples, args.reference, evaluator, log=say)
    for line in iter_metric_lines(metrics):
        print(line, flush=True)
    if args.json:
        payload = dict(metrics, samples=str(args.samples), reference=str(args.reference),
                       num_samples=int(shapes["samples"][0]), num_reference=int(shapes["reference"][0]),
                       inception_weights=str(weights), seconds=round(time.perf_counter() - t0, 1))
        _write_json(args.json, payload)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
