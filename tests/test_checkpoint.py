"""dit_jax.train.checkpoint: Orbax round trip (NamedTuples, shardings), keep, data/config items, async saves,
corruption fallback, leftover tmp dirs, shape mismatch, SIGTERM preemption."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dit_jax.train.checkpoint import MANIFEST, UNSUMMED, Checkpointer, CheckpointError, CheckpointMismatchError
from dit_jax.train.config_schema import base_config
from dit_jax.train.optim import EmaState, ema_params, make_optimizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.asarray(jax.devices()), ("data",))


def _optimizer(**kw):
    cfg = base_config().optim
    cfg.update(dict(dict(lr=1e-3, weight_decay=0.0, ema_decay=0.9), **kw))
    return make_optimizer(cfg)


def _state(mesh, seed=0, w_shape=(8, 4)):
    """A train state with an adamw + ema optax state, one leaf sharded over the 8 devices."""
    rng = np.random.default_rng(seed)
    row = NamedSharding(mesh, P("data"))
    params = {
        "w": jax.device_put(jnp.asarray(rng.normal(size=w_shape), jnp.float32), row),
        "blk": {"b": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
    }
    opt = _optimizer()
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: 0.1 * p, params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial mu, nu, count, ema
    return dict(
        params=params,
        opt_state=opt_state,
        step=jnp.asarray(seed, jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def _abstract(state, shardings=None):
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def _assert_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(ck, mesh, steps, **kw):
    states = {}
    for s in steps:
        states[s] = _state(mesh, seed=s)
        assert ck.save(s, states[s], **kw)
    ck.wait()
    return states


# ==========================================================================================================
# Round trip
# ==========================================================================================================
def test_round_trip_structure_values_and_requested_shardings(tmp_path, mesh):
    state = _state(mesh, seed=3)
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.latest_step() is None
        assert ck.save(3, state)
        ck.wait()
        assert ck.latest_step() == 3 and ck.all_steps() == [3]
        # ask for other shardings than those saved: w replicated, everything else row-sharded where possible
        rep, row = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        want = jax.tree.map(lambda a: row if a.ndim and a.shape[0] % 8 == 0 else rep, state)
        want["params"]["w"] = rep
        want["opt_state"][-1].ema["w"] = rep
        out = ck.restore(_abstract(state, want))
    assert out.step == 3
    _assert_equal(out.state, state)
    # NamedTuples intact: the optax states, and ema_params finds the EMA
    assert isinstance(out.state["opt_state"][0][0], optax.ScaleByAdamState)
    assert isinstance(out.state["opt_state"][-1], EmaState)
    _assert_equal(ema_params(out.state["opt_state"]), ema_params(state["opt_state"]))
    for got, w in zip(jax.tree.leaves(out.state), jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(w, got.ndim), (got.sharding, w)
    assert out.state["opt_state"][0][0].mu["w"].sharding.is_equivalent_to(row, 2)
    assert out.data_state is None and out.config is None


def test_restore_without_target_gives_raw_arrays(tmp_path, mesh):
    state = _state(mesh, seed=4)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(4, state)
        out = ck.restore(None)
    assert out.step == 4
    for name in ("params", "opt_state", "rng", "step"):
        la, lb = jax.tree.leaves(out.state[name]), jax.tree.leaves(state[name])
        assert len(la) == len(lb) > 0
        for x, y in zip(la, lb):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_keep_only_newest_n(tmp_path, mesh):
    with Checkpointer(tmp_path / "ck", keep=2) as ck:
        _save_steps(ck, mesh, [1, 2, 3, 4])
        assert ck.all_steps() == [3, 4]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["3", "4"]


def test_data_state_and_config_round_trip(tmp_path, mesh):
    data_state = {"epoch": 2, "index": 12345, "shuffle_seed": 7, "sources": ["a", "b"], "nested": {"x": 1.5}}
    config = {"model": {"variant": "S/8", "input_size": 32}, "optim": {"lr": 1e-4, "weight_decay": 0.0}}
    state = _state(mesh, 1)
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, state, data_state=data_state, config=config)
        ck.save(2, state)  # neither: restored as None
        ck.wait()
        out = ck.restore(_abstract(state), step=1)
        assert out.data_state == data_state and out.config == config
        out2 = ck.restore(_abstract(state))
        assert out2.step == 2 and out2.data_state is None and out2.config is None


def test_async_save_returns_before_writing_and_survives_donation(tmp_path, mesh):
    state = _state(mesh, 5)
    expected = jax.tree.map(np.asarray, state)
    ck = Checkpointer(tmp_path / "ck", keep=3, async_save=True)
    assert ck.save(5, state, data_state={"i": 5})
    # the caller may donate / delete the arrays as soon as save returns (the train step donates the state)
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ck.wait()
    assert ck.latest_step() == 5
    assert (tmp_path / "ck" / "5" / MANIFEST).exists()
    out = ck.restore(_abstract(_state(mesh, 5)))
    _assert_equal(jax.tree.map(np.asarray, out.state), expected)
    # a step that exists is not saved twice (a preemption save right after a periodic save)
    assert ck.save(5, out.state, force=True) is False
    ck.close()
    ck.close()  # idempotent


# ==========================================================================================================
# Corruption
# ==========================================================================================================
def _largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST), key=lambda p: p.stat().st_size)


def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _array_file(d: Path) -> Path:
    """The OCDBT data file holding the arrays of a step (the biggest under state/d/)."""
    return _largest_file(d / "state" / "d")


CORRUPTIONS = {
    "truncate array data file": lambda d: _truncate(_array_file(d)),
    "delete array data file": lambda d: _array_file(d).unlink(),
    "truncate state metadata": lambda d: _truncate(d / "state" / "_METADATA"),
    "delete state metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "truncate step metadata (verification catches it)": lambda d: _truncate(d / "_CHECKPOINT_METADATA"),
    "no manifest, truncated array data (orbax catches it)": lambda d: (
        (d / MANIFEST).unlink(), _truncate(_array_file(d))),
    "no manifest, deleted state metadata": lambda d: ((d / MANIFEST).unlink(), (d / "state" / "_METADATA").unlink()),
    "no manifest, deleted json item": lambda d: ((d / MANIFEST).unlink(), (d / "data" / "metadata").unlink()),
}


# orbax leaves tensorstore callbacks behind when a read fails ("Event loop is closed"): harmless noise
ORBAX_NOISE = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@ORBAX_NOISE
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupt_newest_falls_back_with_warning(tmp_path, mesh, corruption, caplog, capsys):
    directory = tmp_path / "ck"
    with Checkpointer(directory, keep=3) as ck:
        states = _save_steps(ck, mesh, [10, 20], data_state={"pos": 0})
    CORRUPTIONS[corruption](directory / "20")
    caplog.set_level(logging.WARNING, logger="dit_jax.train.checkpoint")
    with Checkpointer(directory, keep=3) as ck:
        assert ck.latest_step() == 20  # complete as far as orbax knows
        out = ck.restore(_abstract(states[10]))
        assert out.step == 10
        _assert_equal(out.state, states[10])
        assert out.data_state == {"pos": 0}
        text = caplog.text
        assert "skipping checkpoint step 20" in text and "falling back to step 10" in text, text
        assert "skipping checkpoint step 20" in capsys.readouterr().err
        # the corrupt step was moved aside: the resumed run can save step 20 again
        assert ck.all_steps() == [10] and ck.latest_step() == 10
        assert any(p.name.startswith("20.corrupt") for p in directory.iterdir())
        assert ck.save(20, states[20], force=True)
        ck.wait()
        _assert_equal(ck.restore(_abstract(states[20])).state, states[20])


@ORBAX_NOISE
def test_all_corrupt_raises_listing_what_was_tried(tmp_path, mesh):
    directory = tmp_path / "ck"
    with Checkpointer(directory) as ck:
        states = _save_steps(ck, mesh, [1, 2])
    for s in (1, 2):
        _truncate(_array_file(directory / str(s)))
    with Checkpointer(directory) as ck:
        with pytest.raises(CheckpointError, match=r"could be restored\. Tried step 2: .*; step 1: "):
            ck.restore(_abstract(states[1]))
        assert ck.all_steps() == [1, 2]  # nothing moved aside when nothing restored
    # an explicit step does not fall back
    with Checkpointer(directory) as ck:
        with pytest.raises(CheckpointError, match="step 2"):
            ck.restore(_abstract(states[1]), step=2)
        with pytest.raises(CheckpointError, match="no complete checkpoint for step 7"):
            ck.restore(_abstract(states[1]), step=7)
    with Checkpointer(tmp_path / "empty") as ck:
        with pytest.raises(CheckpointError, match="no complete checkpoint"):
            ck.restore(_abstract(states[1]))


def test_leftover_tmp_directory_is_ignored(tmp_path, mesh, caplog):
    """A run killed mid-save leaves `<step>.orbax-checkpoint-tmp...`; even a full copy of a step there is never
    listed or restored."""
    directory = tmp_path / "ck"
    with Checkpointer(directory) as ck:
        states = _save_steps(ck, mesh, [1, 2])
    shutil.copytree(directory / "2", directory / "3.orbax-checkpoint-tmp-1700000000")
    shutil.copytree(directory / "2", directory / "4.orbax-checkpoint-tmp")
    caplog.set_level(logging.WARNING, logger="dit_jax.train.checkpoint")
    with Checkpointer(directory) as ck:
        assert ck.latest_step() == 2 and ck.all_steps() == [1, 2]
        out = ck.restore(_abstract(states[2]))
        assert out.step == 2
        _assert_equal(out.state, states[2])
        assert "skipping" not in caplog.text
        # the next save of those step numbers is not blocked by the leftovers
        assert ck.save(3, states[2], force=True)
        ck.wait()
        assert ck.all_steps() == [1, 2, 3]


def _tree_listing(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_size for p in sorted(d.rglob("*")) if p.is_file()}


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 2, min(len(data) // 2 + 8, len(data))):
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


@ORBAX_NOISE
def test_read_only_reader_changes_nothing(tmp_path, mesh, caplog):
    """A reader leaves a live trainer's temporary folder, a corrupt newest step and everything else as they are,
    still falls back past the corrupt step, and cannot save."""
    directory = tmp_path / "ck"
    with Checkpointer(directory) as ck:
        states = _save_steps(ck, mesh, [1, 2])
    shutil.copytree(directory / "2", directory / "3.orbax-checkpoint-tmp-1700000000")  # a save in flight
    _flip(_array_file(directory / "2"))
    before = _tree_listing(directory)
    caplog.set_level(logging.WARNING, logger="dit_jax.train.checkpoint")
    with Checkpointer(directory, read_only=True) as ck:
        out = ck.restore(_abstract(states[1]))
        assert out.step == 1
        _assert_equal(out.state, states[1])
        assert "skipping checkpoint step 2" in caplog.text and "content changed" in caplog.text
        with pytest.raises(CheckpointError, match="read-only"):
            ck.save(5, states[1])
    assert _tree_listing(directory) == before
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        Checkpointer(tmp_path / "missing", read_only=True)
    assert not (tmp_path / "missing").exists()


@ORBAX_NOISE
def test_flipped_bytes_in_any_file_are_caught_and_named(tmp_path, mesh, caplog):
    directory = tmp_path / "ck"
    with Checkpointer(directory) as ck:
        states = _save_steps(ck, mesh, [1, 2], data_state={"pos": 3}, config={"a": 1})
        assert ck.newest_verified_step() == 2
    files = [p for p in (directory / "2").rglob("*") if p.is_file() and p.name not in (MANIFEST, *UNSUMMED)]
    assert len(files) >= 5
    for f in files:  # each file of the step in turn: the data, orbax's metadata, the JSON items
        original = f.read_bytes()
        _flip(f)
        with Checkpointer(directory, read_only=True) as ck:
            problem = ck._verify_files(2)
            assert problem and str(f.relative_to(directory / "2")) in problem, (f, problem)
            assert ck.newest_verified_step() == 1
        f.write_bytes(original)
    with Checkpointer(directory, read_only=True) as ck:
        assert ck._verify_files(2) is None
        _assert_equal(ck.restore(_abstract(states[2])).state, states[2])


def test_manifest_records_checksums_computed_off_the_training_thread(tmp_path, mesh, monkeypatch):
    import threading

    import dit_jax.train.checkpoint as ckpt_lib

    threads = []
    real = ckpt_lib.sha256_file
    monkeypatch.setattr(ckpt_lib, "sha256_file", lambda p: (threads.append(threading.current_thread()), real(p))[1])
    with Checkpointer(tmp_path / "ck") as ck:
        _save_steps(ck, mesh, [1])
        manifest = __import__("json").loads((tmp_path / "ck" / "1" / MANIFEST).read_text())
    assert threads and threading.main_thread() not in threads
    summed = {f: e for f, e in manifest["files"].items() if "sha256" in e}
    assert summed and all(len(e["sha256"]) == 64 for e in summed.values())
    assert manifest["summed_bytes"] == sum(e["size"] for e in summed.values())


def test_reader_starts_over_when_the_trainer_deletes_the_step_it_reads(tmp_path, mesh, monkeypatch):
    directory = tmp_path / "ck"
    with Checkpointer(directory, keep=None) as ck:
        states = _save_steps(ck, mesh, [1, 2])
    reader = Checkpointer(directory, read_only=True)
    real = reader._restore_step
    calls = []

    def deleting_trainer(step, abstract):  # the trainer's max_to_keep removes step 2 under the reader...
        calls.append(step)
        if step == 2 and len(calls) == 1:
            shutil.rmtree(directory / "2")
            (directory / "3").mkdir()  # ...after finalising a newer one (here: a copy of step 1)
            shutil.copytree(directory / "1", directory / "3", dirs_exist_ok=True)
            raise FileNotFoundError("gone")
        return real(step, abstract)

    monkeypatch.setattr(reader, "_restore_step", deleting_trainer)
    out = reader.restore(_abstract(states[1]))
    assert calls == [2, 3] and out.step == 3
    _assert_equal(out.state, states[1])
    reader.close()


def test_shape_mismatch_is_a_clear_error_not_a_fallback(tmp_path, mesh, caplog):
    directory = tmp_path / "ck"
    with Checkpointer(directory) as ck:
        _save_steps(ck, mesh, [1, 2])
    caplog.set_level(logging.WARNING, logger="dit_jax.train.checkpoint")
    other = _state(mesh, w_shape=(16, 4))
    with Checkpointer(directory) as ck:
        with pytest.raises(CheckpointMismatchError, match=r"(?s)step 2 in .*params/w: expected \(16, 4\), got \(8, 4\)"):
            ck.restore(_abstract(other))
        assert "skipping" not in caplog.text
        assert ck.all_steps() == [1, 2]
        # another optimizer (gradient clipping adds a link to the chain): named leaves missing / unexpected
        params = _state(mesh)["params"]
        clip_state = dict(_state(mesh), opt_state=_optimizer(grad_clip_norm=1.0).init(params))
        with pytest.raises(CheckpointMismatchError, match="(?s)missing from the checkpoint.*opt_state/2/ema/w"):
            ck.restore(_abstract(clip_state))


# ==========================================================================================================
# Preemption
# ==========================================================================================================
def test_sigterm_flag_and_handler_restored_on_close(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    ck = Checkpointer(tmp_path / "ck")
    ck.install_sigterm_handler()
    assert not ck.preempted and not ck.reached_preemption(0)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ck.preempted and ck.reached_preemption(0)
    ck.close()
    assert signal.getsignal(signal.SIGTERM) is before


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import jax.numpy as jnp
    from dit_jax.train.checkpoint import Checkpointer

    ck = Checkpointer(sys.argv[1], keep=2)
    ck.install_sigterm_handler()
    state = {"w": jnp.zeros(4), "step": jnp.zeros((), jnp.int32)}
    step = 0
    print("ready", flush=True)
    while step < 100_000:
        state = {"w": state["w"] + 1, "step": state["step"] + 1}  # one "training" step
        step += 1
        time.sleep(0.002)
        if step % 100 == 0 or ck.preempted:
            ck.save(step, state, data_state={"step": step}, force=True)
            if ck.preempted:
                ck.wait()
                ck.close()
                print(f"saved {step}", flush=True)
                sys.exit(0)
    sys.exit(3)
    """
)


def test_sigterm_saves_the_current_step_and_exits_zero(tmp_path):
    directory = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device is enough here
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(directory)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        import time

        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    saved = int(out.strip().split()[-1])
    assert "SIGTERM received" in err
    with Checkpointer(directory) as ck:
        assert ck.latest_step() == saved
        abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
        out = ck.restore(abstract)
    assert out.step == saved and int(out.state["step"]) == saved
    np.testing.assert_array_equal(np.asarray(out.state["w"]), np.full(4, saved, np.float32))
    assert out.data_state == {"step": saved}
