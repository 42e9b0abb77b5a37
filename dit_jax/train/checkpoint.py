"""Orbax checkpoints of the train state, the data iterator and the config, with corruption fallback and SIGTERM.

One step directory per checkpoint (orbax CheckpointManager, async saves, the newest `keep` kept):

    <directory>/<step>/state/    ocp.args.StandardSave of {"params", "rest", "opt_state", "step", "rng"} (any pytree)
                      /data/     ocp.args.JsonSave of the data iterator's state dict (absent if none was given)
                      /config/   ocp.args.JsonSave of the config as a dict (absent if none was given)
                      /dit_jax_manifest.json   every file of the step, its size and SHA-256

Orbax writes each step into a temporary directory (`<step>.orbax-checkpoint-tmp...`) and renames it (or, on
GCS, writes commit_success.txt) when complete; only complete steps are ever listed or restored, and leftover
temporary directories of a killed run are removed when the next Checkpointer opens the directory.

Verified checkpoints: the manifest records a content checksum (SHA-256) of every file of the step. It is computed
in orbax's background save thread (off the training thread), once every process has written its files and before
orbax finalises the step (renames the temporary folder, or writes commit_success.txt on GCS): a complete step
carries its manifest from the moment it exists. Orbax's own bookkeeping files at the step's top level
(_CHECKPOINT_METADATA, commit_success.txt), which it rewrites while finalising, are listed but not summed.
Measured cost: about 0.6 s per GB on one core with SHA-NI (BENCHMARKS.md, "Checkpoint checksums").

Restore (`restore(abstract_state)`) takes the newest complete step and falls back to older ones, with a warning
naming the skipped step and why, when a step is corrupt: a file listed in its manifest is missing, has another
size or another checksum (bit rot, a bad copy: the warning names the file), its metadata cannot be read, or orbax
fails to read it. A step without a manifest (a run of an older dit-jax) is restored unverified, with a warning. A checkpoint whose tree or shapes differ from the
abstract state is a configuration mismatch, not corruption: that raises CheckpointMismatchError naming the
leaves, without falling back. Skipped (corrupt) steps newer than the restored one are moved aside to
`<step>.corrupt-<time>` so that the resumed run can save those step numbers again.

Preemption: the loop asks `reached_preemption(step)` every step, then saves with force=True, waits and exits. On
one process, `install_sigterm_handler()` makes SIGTERM set the flag it reads. On several processes, SIGTERM reaches
the hosts at different steps: JAX's preemption notifier (installed by jax.distributed.initialize(), left in place)
takes it, and reached_preemption is orbax's, JAX's preemption sync point: the same step on every process.

Readers never write: `Checkpointer(directory, read_only=True)` (what `dit-jax sample --ckpt`, export, sample-fid
and evaluate use) opens the run without orbax's clean-up of temporary folders (a live trainer's save in flight),
never moves a corrupt step aside and cannot save; a step that the trainer deletes while a reader reads it (the
trainer keeps the newest `keep`) is not corruption: the reader starts over from the newest step. Only the trainer,
which holds the run's lock (dit_jax/train/run_lock.py), repairs a run.

Multi-host: every process calls save/restore with the same arguments; orbax writes each process's shards and
the primary host finalises. Only the primary host writes manifests, sums files on restore (the others check
sizes; all follow its verdict) or moves corrupt steps aside.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from dit_jax import distributed
from dit_jax.errors import CheckpointMismatchError, warn  # noqa: F401  (CheckpointMismatchError: raised, re-exported)
from dit_jax.paths import sha256_file

PyTree = Any
log = logging.getLogger("dit_jax.train.checkpoint")

MANIFEST = "dit_jax_manifest.json"
MANIFEST_FORMAT = "dit_jax.checkpoint.manifest/2"  # /1 (sizes only) is still read
# orbax's files at a step's top level that it rewrites while finalising (after the manifest is written)
UNSUMMED = ("_CHECKPOINT_METADATA", "commit_success.txt")
READER_PATIENCE_S = 300.0  # a reader keeps retrying while a live trainer deletes the steps it reads


class CheckpointError(RuntimeError):
    """No checkpoint could be restored (none exists, or every candidate is corrupt or incomplete)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: PyTree
    data_state: dict | None
    config: dict | None


def _is_primary() -> bool:
    return jax.process_index() == 0


def _warn(message: str) -> None:
    warn(message, log)


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[int, ...] | None]:
    """{"opt_state/1/0/mu/w": shape}: NamedTuple fields, dict keys and sequence indices all become path parts, so
    a state and its orbax metadata tree (where NamedTuples are dicts and tuples lists) flatten alike."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    out = {}
    for path, leaf in leaves:
        shape = getattr(leaf, "shape", None)
        out["/".join(_key_str(k) for k in path)] = None if shape is None else tuple(int(s) for s in shape)
    return out


def _list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def _compare_to_metadata(abstract_state: PyTree, meta_tree: PyTree, step: int, directory: Any) -> None:
    """CheckpointMismatchError (a config mismatch, not corruption) when the checkpoint's tree or shapes differ from
    the abstract state; the model's own leaves (params/) are listed first: they say the most."""
    want, have = _flat_shapes(abstract_state), _flat_shapes(meta_tree)

    def order(k: str) -> tuple[bool, str]:
        return (not k.startswith("params/"), k)

    missing = sorted(set(want) - set(have), key=order)
    unexpected = sorted(set(have) - set(want), key=order)
    mismatched = [(k, want[k], have[k]) for k in sorted(set(want) & set(have), key=order)
                  if want[k] is not None and have[k] is not None and want[k] != have[k]]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(
            missing, unexpected, mismatched, what="checkpoint", where=f"step {step} in {directory}",
            target="the state this config builds (a different model or optimizer config?)",
            hint="Resume with the run's own config, or train this one into a new --workdir",
        )


def _sum_files(d: epath.Path, names: list[str]) -> dict[str, str]:
    """{name: SHA-256 of d / name}, the files summed in parallel (hashlib releases the GIL)."""
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        return dict(zip(names, pool.map(lambda f: sha256_file(d / f), names)))


class Checkpointer:
    """Orbax CheckpointManager with items "state" (pytree), "data" (JSON) and "config" (JSON).

    save(step, state, data_state=, config=, force=) -> bool (async by default: arrays are copied to host before
    it returns, so the caller may donate `state` right after); wait(); close(); latest_step(); all_steps();
    restore(abstract_state, step=None) -> Restored(step, state, data_state, config); newest_verified_step().
    read_only=True: a reader's view (no clean-up, no quarantine, no saves; see the module docstring).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int | None = 3, async_save: bool = True,
                 read_only: bool = False):
        directory = str(directory)
        if "://" not in directory:
            directory = os.path.abspath(directory)
        self.directory = epath.Path(directory)
        if keep is not None and keep < 1:
            raise ValueError(f"keep={keep} must be >= 1 (or None to keep every checkpoint)")
        self.read_only = bool(read_only)
        if self.read_only and not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: no such checkpoint folder")
        self.keep = None if self.read_only else keep
        self.async_save = async_save and not self.read_only
        self._saving: int | None = None  # the step whose save is in flight (saves are serialised by orbax)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            save_interval_steps=0 if self.read_only else 1,
            enable_async_checkpointing=self.async_save,
            create=not self.read_only,
            cleanup_tmp_directories=not self.read_only,  # leftovers of a killed trainer (never a reader's job)
            read_only=self.read_only,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._on_saved) if self.async_save else None,
        )
        handlers = dict(
            state=ocp.StandardCheckpointHandler(),
            data=ocp.JsonCheckpointHandler(),
            config=ocp.JsonCheckpointHandler(),
        )  # registered up front, so a fresh process can read metadata before its first save or restore
        absl_log = logging.getLogger("absl")
        level = absl_log.level
        if self.read_only:  # orbax warns that the directory is read-only: that is the point
            absl_log.setLevel(logging.ERROR)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        finally:
            absl_log.setLevel(level)
        self._preempted = False
        self._prev_sigterm: Any = None
        self._sigterm_installed = False
        self._closed = False

    # ------------------------------------------------------------------------------------------------ save
    def save(self, step: int, state: PyTree, *, data_state: dict | None = None, config: dict | None = None,
             force: bool = False) -> bool:
        """Save (asynchronously unless async_save=False). Returns whether a checkpoint was started: orbax skips
        steps not newer than the latest unless force=True, and a step that already exists is not saved again.
        data_state and config must be JSON-serialisable (they are left out of the checkpoint when None)."""
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only: only its trainer saves checkpoints")
        step = int(step)
        if step in self._mngr.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        items: dict[str, Any] = dict(state=ocp.args.StandardSave(state))
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        self._mngr.wait_until_finished()  # orbax's save() waits for the previous one too; then _saving is free
        self._saving = step
        saved = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))
        if saved and not self.async_save and _is_primary():
            self._write_manifest(step, self.step_dir(step))
        return saved

    def _on_saved(self) -> None:
        """orbax's post-finalisation callback (its background save thread, primary host, every process's files
        written, the step not yet renamed/committed): sum the files into the step's manifest."""
        step = self._saving
        if step is None or not _is_primary():
            return
        try:
            d = self._unfinalized_dir(step)
            if d is None:
                _warn(f"checkpoint step {step} in {self.directory}: its folder was not found to checksum; it will "
                      f"be restored unverified")
                return
            self._write_manifest(step, d)
        except Exception as e:  # noqa: BLE001  (a failed manifest must not fail the save: the step is restorable)
            _warn(f"could not write the checksums of checkpoint step {step} in {self.directory} ({e!r}); it will "
                  f"be restored unverified")

    def _unfinalized_dir(self, step: int) -> epath.Path | None:
        """The folder orbax is finalising for `step`: `<step>.orbax-checkpoint-tmp*` (renamed at the end), or on
        object stores `<step>` itself (committed by commit_success.txt)."""
        final = self.step_dir(step)
        tmps = [p for p in self.directory.glob(f"{step}{TMP_SUFFIX}*") if p.is_dir()]
        if tmps:
            return max(tmps, key=lambda p: p.stat().mtime)
        return final if final.is_dir() else None

    def wait(self) -> None:
        """Block until every pending save (and its manifest) is complete on disk."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves, release orbax's resources, and put the previous SIGTERM handler back."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._mngr.close()
            self.uninstall_sigterm_handler()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def latest_step(self) -> int | None:
        """The newest complete step (complete = finalised by orbax; it may still turn out corrupt on restore)."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(int(s) for s in self._mngr.all_steps())

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(int(step))

    # ------------------------------------------------------------------------------------------------ manifests
    def _write_manifest(self, step: int, d: epath.Path) -> None:
        """Record every file of the step in `d` with its size and SHA-256 (orbax's top-level bookkeeping, which it
        rewrites while finalising: by name only)."""
        t0 = time.perf_counter()
        sizes = self._list_files(d)
        summed = sorted(f for f in sizes if f not in UNSUMMED)
        sums = _sum_files(d, summed)
        files = {f: ({"size": n, "sha256": sums[f]} if f in sums else {}) for f, n in sizes.items()}
        manifest = dict(format=MANIFEST_FORMAT, step=step, algorithm="sha256", files=files,
                        summed_bytes=sum(sizes[f] for f in summed), seconds=round(time.perf_counter() - t0, 3))
        if _is_primary():
            tmp = d / (MANIFEST + ".tmp")
            tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
            tmp.rename(d / MANIFEST)
        log.info("checkpoint step %d: %d files, %.1f MB summed in %.2fs", step, len(files),
                 manifest["summed_bytes"] / 1e6, manifest["seconds"])

    @staticmethod
    def _list_files(d: epath.Path) -> dict[str, int]:
        files = {}
        for root, _, names in d.walk():
            for name in names:
                if name in (MANIFEST, MANIFEST + ".tmp"):
                    continue
                p = epath.Path(root) / name
                files[os.path.relpath(str(p), str(d))] = int(p.stat().length)
        return files

    def _read_manifest(self, step: int) -> dict[str, dict] | None:
        """{file: {"size": n, "sha256": hex}} ({} for orbax's unsummed files) from the step's manifest; None if it has none. Raises ValueError
        if it is unreadable."""
        m = self.step_dir(step) / MANIFEST
        if not m.exists():
            return None
        try:
            files = json.loads(m.read_text())["files"]
            return {str(k): (dict(size=int(v)) if isinstance(v, (int, float)) else  # /1: {file: size}
                             {key: (int(v[key]) if key == "size" else str(v[key])) for key in ("size", "sha256")
                              if key in v})
                    for k, v in files.items()}
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"its manifest is unreadable ({e!r})") from None

    def _verify_files(self, step: int, *, checksums: bool = True) -> str | None:
        """None if the step's files agree with its manifest (or it has none); else what is wrong, naming the files.
        checksums=False checks presence and sizes only."""
        d = self.step_dir(step)
        if not d.is_dir():
            return "its directory is missing"
        if TMP_SUFFIX in d.name or not ocp.step.is_path_finalized(d):
            return "it is an incomplete (temporary) checkpoint"
        try:
            expected = self._read_manifest(step)
        except ValueError as e:
            return str(e)
        if expected is None:
            return None  # an older dit-jax's step: orbax's reads still check it (restore warns that it is unverified)
        found = self._list_files(d)
        missing = sorted(f for f in expected if f not in found)
        resized = sorted(f"{f} ({found[f]} bytes, expected {e['size']})" for f, e in expected.items()
                         if f in found and "size" in e and found[f] != e["size"])
        altered: list[str] = []
        for f in UNSUMMED:  # not summed (orbax rewrites them while finalising), but they must still parse
            if f in expected and f in found and f.endswith("METADATA"):
                try:
                    json.loads((d / f).read_text())
                except (OSError, ValueError):
                    altered.append(f)
        if checksums and not missing and not resized:
            summed = sorted(f for f, e in expected.items() if "sha256" in e)
            actual = _sum_files(d, summed)
            altered += [f for f in summed if actual[f] != expected[f]["sha256"]]
        if not missing and not resized and not altered:
            return None
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing file(s): {_list(missing, 5)}")
        if resized:
            parts.append(f"{len(resized)} truncated or altered file(s): {_list(resized, 5)}")
        if altered:
            parts.append(f"{len(altered)} file(s) whose content changed since it was saved (bit rot or a bad copy): "
                         f"{_list(altered, 5)}")
        return "; ".join(parts)

    def newest_verified_step(self) -> int | None:
        """The newest step whose manifest has checksums and whose files all match them (None: no such step)."""
        self.wait()
        for s in sorted(self.all_steps(), reverse=True):
            try:
                manifest = self._read_manifest(s)
            except ValueError:
                continue
            if manifest and any("sha256" in e for e in manifest.values()) and self._verify_files(s) is None:
                return s
        return None

    # ------------------------------------------------------------------------------------------------ restore
    def restore(self, abstract_state: PyTree | None, step: int | None = None) -> Restored:
        """Restore `step` (None: the newest step that restores, falling back past corrupt ones with a warning).

        abstract_state: the state's tree of jax.ShapeDtypeStruct (with .sharding) or arrays; the result has the
        same tree structure (NamedTuples included), dtypes and shardings. Leaves given as SKIP are not read (they
        stay SKIP in the result). None restores the raw saved tree (dicts
        and lists in place of NamedTuples and tuples; orbax picks the shardings): for inspection, not training.
        Raises CheckpointMismatchError if the tree/shapes differ, CheckpointError if nothing can be restored."""
        deadline = time.monotonic() + READER_PATIENCE_S
        while True:
            listed = self.all_steps() if self.read_only else []
            try:
                return self._restore(abstract_state, step)
            except OSError as e:
                # orbax's own file checks race a trainer deleting a step (e.g. `path.exists() and not path.is_dir()`
                # in its metadata paths): for a reader, a step that vanished meanwhile means "look again"
                gone = [s for s in listed if not self.step_dir(s).exists()]
                if not (self.read_only and gone) or (step is not None and int(step) in gone):
                    raise
                if time.monotonic() > deadline:
                    raise CheckpointError(f"the trainer of {self.directory} deletes its checkpoints faster than they "
                                          f"can be read: raise its train.keep_ckpts or train.ckpt_every, or read a "
                                          f"copy of a step folder") from e
                log.info("checkpoint steps %s were deleted by their trainer while being read (%s); reading the newest "
                         "step again", gone, e)
                self._mngr.reload()
            except _StepVanished as e:  # a live trainer deleted it (max_to_keep): not corruption, look again
                if time.monotonic() > deadline:
                    raise CheckpointError(
                        f"the trainer of {self.directory} deletes its checkpoints faster than they can be read (step "
                        f"{e.step} was the last to vanish): raise its train.keep_ckpts or train.ckpt_every, or read "
                        f"a copy of a step folder") from None
                log.info("checkpoint step %d was deleted by its trainer while it was read; reading the newest "
                         "step again", e.step)
                self._mngr.reload()

    def _restore(self, abstract_state: PyTree | None, step: int | None) -> Restored:
        self.wait()
        steps = self.all_steps()
        if step is not None:
            if int(step) not in steps:
                raise CheckpointError(
                    f"no complete checkpoint for step {step} in {self.directory}; complete steps: {steps or 'none'}"
                )
            candidates = [int(step)]
        else:
            candidates = sorted(steps, reverse=True)
        if not candidates:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")

        tried: list[tuple[int, str]] = []
        for i, s in enumerate(candidates):
            problem = self._verify_files(s, checksums=_is_primary())  # the others follow process 0's verdict
            restored = None
            if problem is None:
                try:
                    meta = self._mngr.item_metadata(s)["state"]
                    meta_tree = meta.tree if hasattr(meta, "tree") else meta
                    if meta_tree is None:
                        raise ValueError("no state metadata")
                except Exception as e:  # noqa: BLE001
                    problem = f"its metadata cannot be read ({type(e).__name__}: {_short(e)})"
            if problem is None:
                if abstract_state is not None:  # raises: a mismatch is not corruption, no fallback
                    _compare_to_metadata(abstract_state, meta_tree, s, self.directory)
                try:
                    restored = self._restore_step(s, abstract_state)
                except Exception as e:  # noqa: BLE001
                    problem = f"orbax could not read it ({type(e).__name__}: {_short(e)})"
            if problem is not None and self.read_only and _vanishing(self.step_dir(s)):
                raise _StepVanished(s)
            if not distributed.all_agree("dit_jax/checkpoint/restore", problem is None):  # all fall back, or none
                problem = problem or "another process could not read it"
            if problem is None:
                if tried:
                    self._quarantine([t for t, _ in tried])
                try:
                    if self._read_manifest(s) is None:
                        _warn(f"checkpoint step {s} in {self.directory} has no checksums (saved by an older "
                              f"dit-jax): restored unverified")
                except ValueError:
                    pass
                return restored
            tried.append((s, problem))
            nxt = f"; falling back to step {candidates[i + 1]}" if i + 1 < len(candidates) else ""
            _warn(f"skipping checkpoint step {s} in {self.directory}: corrupt or incomplete, {problem}{nxt}")
        listing = "; ".join(f"step {s}: {p}" for s, p in tried)
        raise CheckpointError(f"no checkpoint in {self.directory} could be restored. Tried {listing}. Nothing was "
                              f"deleted (the damaged steps are kept for inspection): put back an intact copy of a "
                              f"step, or train into a new --workdir")

    def _restore_step(self, step: int, abstract_state: PyTree) -> Restored:
        d = self.step_dir(step)
        partial = abstract_state is not None and any(leaf is SKIP for leaf in jax.tree.leaves(abstract_state))
        items: dict[str, Any] = {} if partial else dict(state=ocp.args.StandardRestore(abstract_state))
        for name in ("data", "config"):
            if (d / name).exists():
                items[name] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**items)) if items else {}
        state = self._restore_partial(d / "state", abstract_state) if partial else out["state"]
        return Restored(
            step=step,
            state=state,
            data_state=out["data"] if "data" in items else None,
            config=out["config"] if "config" in items else None,
        )

    @staticmethod
    def _restore_partial(path: epath.Path, abstract_state: PyTree) -> PyTree:
        """Only the leaves of `abstract_state` that are not SKIP are read (SKIP stays in their place): orbax's
        PyTree handler with placeholders (StandardRestore refuses them), on the same files."""
        restore_args = jax.tree.map(
            lambda a: a if a is SKIP else ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                                               dtype=a.dtype), abstract_state)
        with ocp.PyTreeCheckpointer() as reader:
            return reader.restore(path, args=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args))

    def _quarantine(self, steps: list[int]) -> None:
        """Move corrupt steps aside (`<step>.corrupt-<time>`): the resumed run will save these step numbers again,
        and orbax would otherwise refuse them and keep counting the corrupt steps as the newest."""
        if self.read_only:
            return  # a reader never changes the run
        if _is_primary():
            for s in steps:
                src = self.step_dir(s)
                dst = self.directory / f"{s}.corrupt-{int(time.time())}"
                try:
                    src.rename(dst)
                    _warn(f"moved the corrupt checkpoint step {s} aside to {dst}")
                except Exception as e:  # noqa: BLE001
                    # left in place it would stay the "latest" step and block saving step {s} again
                    _warn(f"could not move the corrupt checkpoint step {s} aside ({e!r}); deleting {src}")
                    try:
                        src.rmtree()
                    except Exception as e2:  # noqa: BLE001
                        _warn(f"could not delete {src} either ({e2!r}): remove it by hand")
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes("dit_jax_checkpoint_quarantine")
        self._mngr.reload()

    # ------------------------------------------------------------------------------------------------ preemption
    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (after install_sigterm_handler). Local to this process."""
        return self._preempted

    def reached_preemption(self, step: int) -> bool:
        """Whether to save and stop at `step`: orbax's preemption sync point (JAX's preemption service agrees on
        one step across hosts), or the local SIGTERM flag on a single host."""
        if jax.process_count() == 1 and self._preempted:
            return True
        return bool(self._mngr.reached_preemption(int(step)))

    def install_sigterm_handler(self) -> None:
        """SIGTERM sets `preempted` instead of killing the process (the previous handler is restored by close()).
        Must be called from the main thread. A handler installed outside Python (JAX's preemption notifier in
        multi-host runs) is left in place: use reached_preemption(step) there."""
        if self._sigterm_installed:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_sigterm_handler() must be called from the main thread")
        if jax.process_count() > 1:
            # jax.distributed.initialize() set up JAX's preemption notifier (a SIGTERM handler in C++, invisible to
            # signal.getsignal): a Python handler would take the signal from it and no process would ever reach the
            # preemption sync point (reached_preemption)
            log.info("multi-process job: SIGTERM is left to JAX's preemption notifier")
            return
        prev = signal.getsignal(signal.SIGTERM)
        if prev is None:
            log.info("SIGTERM has a handler installed outside Python (JAX's preemption service?); leaving it: "
                     "use Checkpointer.reached_preemption(step)")
            return

        def on_sigterm(signum: int, frame: Any) -> None:
            self._preempted = True
            # only async-signal-safe work here (no logging locks, no buffered prints)
            os.write(2, b"SIGTERM received: the trainer will save a checkpoint and stop\n")

        signal.signal(signal.SIGTERM, on_sigterm)
        self._prev_sigterm = prev
        self._sigterm_installed = True

    def uninstall_sigterm_handler(self) -> None:
        if not self._sigterm_installed:
            return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._prev_sigterm)
        self._sigterm_installed = False


TMP_SUFFIX = ocp.step.TMP_DIR_SUFFIX
# a leaf of the abstract state given to restore() that is not read (orbax's placeholder): readers that need only
# part of the state (the EMA weights to sample) restore only that part
SKIP = ocp.PLACEHOLDER


def _vanishing(step_dir: epath.Path, grace_s: float = 0.5) -> bool:
    """Whether a step folder that a reader could not read is being deleted by its trainer (orbax removes old steps
    file by file: the folder can still exist, with files already gone, when the read fails)."""
    deadline = time.monotonic() + grace_s
    while step_dir.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


class _StepVanished(Exception):
    def __init__(self, step: int):
        super().__init__(step)
        self.step = step


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= n else s[:n] + "..."
