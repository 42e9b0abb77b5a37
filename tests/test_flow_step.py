"""The flow-matching train step with REPA (dit_jax/train/flow_step.py, dit_jax/train/repa.py): where REPA's
gradient goes, and one DDT step on 8 simulated devices equal to one device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.models import DDT
from dit_jax.models.dinov2 import random_target_encoder
from dit_jax.train.config_schema import base_config
from dit_jax.train.flow_step import frozen_state, make_flow_loss, make_flow_train_step
from dit_jax.train.optim import make_optimizer
from dit_jax.train.repa import cosine_loss, match_token_grid
from dit_jax.train.sharding import make_mesh, param_shardings, shard_batch

ALIGN = 2  # encoder block whose output REPA aligns (of 3 encoder blocks)


def make_model(seed: int = 0) -> DDT:
    # 3-channel pixels, 16x16 at patch 2: 64 tokens; the random target encoder (patch 7) sees 28x28 -> 16 tokens
    return DDT(input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=5, num_heads=2,
               num_encoder_blocks=3, num_classes=10, repa_dim=24, repa_hidden=32, rngs=nnx.Rngs(seed))


def make_encoder():
    return random_target_encoder(depth=1, width=24, heads=2, patch=7, seed=0)


def batch(n: int = 8, seed: int = 0) -> dict:
    r = np.random.default_rng(seed)
    return dict(x=r.uniform(-1, 1, (n, 16, 16, 3)).astype(np.float32), y=r.integers(0, 10, n).astype(np.int32),
                images=r.uniform(0, 1, (n, 32, 32, 3)).astype(np.float32))


def test_repa_gradient_reaches_only_the_aligned_blocks_and_never_the_target_encoder():
    model, encoder = make_model(), make_encoder()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    enc_graphdef, frozen = nnx.split(encoder)
    params, rest, frozen = params.to_pure_dict(), rest.to_pure_dict(), frozen.to_pure_dict()
    b = jax.tree.map(jnp.asarray, batch())
    loss_fn = make_flow_loss(graphdef, repa_weight=0.5, repa_layer=ALIGN, encoder_graphdef=enc_graphdef,
                             fm_weight=0.0)  # the REPA term alone
    grads, frozen_grads = jax.jit(jax.grad(lambda p, f: loss_fn(p, f, rest, b, jax.random.key(0))[0],
                                           argnums=(0, 1)))(params, frozen)

    def norm(tree) -> float:
        return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))

    assert norm(frozen_grads) == 0.0  # stop_gradient: the target encoder gets nothing
    for i in range(5):
        g = norm(grads["blocks"][i])
        if i < ALIGN:
            assert g > 0, f"block {i} (before the align layer) got no REPA gradient"
        else:
            assert g == 0.0, f"block {i} (after the align layer) got REPA gradient {g}"
    for name in ("final_layer", "x_embedder"):
        assert norm(grads[name]) == 0.0, name
    assert norm(grads["repa_proj"]) > 0 and norm(grads["s_embedder"]) > 0
    # with the flow term on, the decoder trains too
    full = make_flow_loss(graphdef, repa_weight=0.5, repa_layer=ALIGN, encoder_graphdef=enc_graphdef)
    g_full = jax.jit(jax.grad(lambda p: full(p, frozen, rest, b, jax.random.key(0))[0]))(params)
    assert norm(g_full["blocks"][4]) > 0 or norm(g_full["final_layer"]) > 0


def test_cosine_loss_and_token_grid():
    a = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 5)), jnp.float32)
    np.testing.assert_allclose(np.asarray(cosine_loss(a, 3.0 * a)), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cosine_loss(a, -a)), 2.0, atol=1e-6)
    assert match_token_grid(a, 4) is a and match_token_grid(a, 16).shape == (2, 16, 5)
    with pytest.raises(ValueError, match="square"):
        match_token_grid(a, 6)


def _one_step(mesh, fsdp: bool = False) -> tuple[dict, dict]:
    model, encoder = make_model(), make_encoder()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    enc_graphdef = nnx.split(encoder)[0]
    optim_cfg = base_config().optim
    optim_cfg.update(dict(lr=1e-3, b2=0.95, ema_decay=0.9))
    optimizer = make_optimizer(optim_cfg)
    params = params.to_pure_dict()
    state = dict(params=params, rest=rest.to_pure_dict(), opt_state=optimizer.init(params),
                 step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(0)),
                 frozen=frozen_state(encoder))
    shardings = param_shardings(state, mesh, fsdp=fsdp)
    state = jax.device_put(state, shardings)
    step = make_flow_train_step(graphdef, optimizer, repa_weight=0.5, repa_layer=ALIGN, encoder_graphdef=enc_graphdef)
    step = jax.jit(step, in_shardings=(shardings, None), out_shardings=(shardings, None), donate_argnums=(0,))
    data = shard_batch(batch(), mesh)
    for _ in range(2):
        state, metrics = step(state, data)
    return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.parametrize("fsdp", [False, True])
def test_one_ddt_repa_step_on_8_devices_equals_1_device(fsdp):
    one = _one_step(make_mesh(-1, 1, jax.devices()[:1]))
    eight = _one_step(make_mesh(2, 4) if fsdp else make_mesh(-1, 1), fsdp=fsdp)
    assert len(jax.devices()) == 8
    for k in ("loss", "fm_loss", "repa_loss"):
        np.testing.assert_allclose(eight[1][k], one[1][k], rtol=1e-5)
    assert one[1]["repa_loss"] > 0
    for a, b in zip(jax.tree.leaves(eight[0]["params"]), jax.tree.leaves(one[0]["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(eight[0]["frozen"]), jax.tree.leaves(one[0]["frozen"])):
        np.testing.assert_array_equal(a, b)


def test_trainer_trains_and_resumes_a_ddt_with_repa(tmp_path, capsys, monkeypatch):
    """The real trainer (dit_jax.train.loop) on the digits with objective=flow, a DDT and REPA against the frozen
    random ViT: losses finite, the REPA term logged, the frozen encoder checkpointed and resumed unchanged."""
    from dit_jax.train.checkpoint import Checkpointer
    from dit_jax.train.config_load import load_config
    from dit_jax.sampling import sampler as sampler_lib
    from dit_jax.train.loop import train

    overrides = ["objective=flow", "model.arch=ddt", "model.learn_sigma=False", "model.num_encoder_blocks=1",
                 "repa.weight=0.5", "repa.encoder=random", "repa.layer=1", "repa.proj_dim=24",
                 "train.sample_every=1", "train.sample_sampler=heun", "train.sample_steps=4", "train.steps=4",
                 "train.log_every=2", "train.ckpt_every=2"]
    cfg = load_config("configs/digits.py:runlocal=True", overrides)
    built = []
    sampler_init = sampler_lib.Sampler.__init__
    monkeypatch.setattr(sampler_lib.Sampler, "__init__", lambda self, *a, **kw: (built.append(1),
                                                                                 sampler_init(self, *a, **kw))[1])
    sampler_lib._CACHE.clear()
    first = train(cfg, tmp_path)
    assert first["step"] == 4
    grids = sorted(p.name for p in (tmp_path / "samples").glob("ema_samples_*.png"))
    # one sampler built (and compiled), then reused with the new EMA weights by the later sample events
    assert len(grids) >= 2 and len(built) == 1, (grids, built)
    assert [key[1].sampler for key in sampler_lib._CACHE] == ["heun"]  # train.sample_sampler
    m = first["metrics"]
    assert np.isfinite(m["loss"]) and 0 < m["repa_loss"] <= 2 and m["fm_loss"] > 0
    frozen_before = jax.device_get(first["state"]["frozen"])
    assert (tmp_path / "samples" / "ema_samples_0000002.png").is_file()  # the flow model's EMA sample grid
    cfg = load_config("configs/digits.py:runlocal=True", overrides[:-3] + ["train.steps=6", "train.log_every=2",
                                                                         "train.ckpt_every=2"])
    second = train(cfg, tmp_path)
    assert second["step"] == 6
    for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(jax.device_get(second["state"]["frozen"]))):
        np.testing.assert_array_equal(a, b)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    assert ckpt.latest_step() == 6
    ckpt.close()
    _sample_the_ddt_run(tmp_path, capsys)


def _sample_the_ddt_run(run, capsys) -> None:
    """The run samples as a user would: `sample --ckpt RUN` (EMA weights, the run's pixel size) writes the grid
    of the library Sampler's output, `ddt-schedule --checkpoint RUN` computes a schedule, `sample-ddt` (another name
    for `sample`) samples with it, and a diffusion sampler is refused naming the run's objective."""
    import json

    from PIL import Image

    from dit_jax import cli
    from dit_jax.images import make_grid, to_uint8
    from dit_jax.sampling import SampleSettings, Sampler, example_keys
    from dit_jax.sampling.load import load_model
    from dit_jax.train.export import load_ema_model

    ema, config, step = load_ema_model(run)
    # sampling reads only the weights: the bytes restored are the EMA's (and the model's small non-param state),
    # not the optimizer's moments, the trained params or REPA's frozen target encoder
    from dit_jax.train.export import restore_run, weights_only
    from dit_jax.train.optim import ema_params

    _, _, weights = restore_run(run, only=weights_only)
    _, _, full = restore_run(run)
    nbytes = lambda tree: sum(int(x.nbytes) for x in jax.tree.leaves(tree) if hasattr(x, "nbytes"))  # noqa: E731
    ema_bytes = nbytes(ema_params(full.state["opt_state"]))
    assert ema_bytes <= nbytes(weights.state) <= 1.2 * ema_bytes, (nbytes(weights.state), ema_bytes)
    assert nbytes(full.state) > 3 * ema_bytes  # what it used to read
    loaded = load_model(str(run))
    assert isinstance(loaded.model, DDT) and loaded.objective == "flow" and loaded.pixel_space
    assert loaded.image_size == 16 and step == 6
    assert loaded.name == f"{run.name}-step0000006" and loaded.time_scale == 1.0
    for a, b in zip(jax.tree.leaves(nnx.state(loaded.model, nnx.Param)), jax.tree.leaves(nnx.state(ema, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    trained = load_model(str(run), which="model").model
    assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 0 for a, b in zip(
        jax.tree.leaves(nnx.state(trained, nnx.Param)), jax.tree.leaves(nnx.state(ema, nnx.Param))))

    # the CLI's defaults: Euler, cfg 2.0 on (0.3, 1), last step 0.04; example i's noise from fold_in(key(seed), i).
    # DDT's encoder-sharing Euler with the encoder on every step equals the plain Euler sampler.
    settings = SampleSettings(sampler="euler", num_steps=4, cfg_scale=2.0, interval_min=0.3, interval_max=1.0,
                              last_step=0.04)
    labels = np.array([1, 2, 3], np.int32)
    keys = example_keys(0, np.arange(3))
    shared = np.asarray(Sampler(ema, dataclasses.replace(settings, schedule=(0, 1, 2, 3)))(labels, keys))
    np.testing.assert_allclose(np.asarray(Sampler(ema, settings)(labels, keys)), shared, atol=1e-5)
    out = run / "grid.png"
    assert cli.main(["sample", "--ckpt", str(run), "--steps", "4", "--labels", "1,2,3", "--nrow", "3",
                     "--out", str(out)]) == 0
    assert f"from {loaded.name}" in capsys.readouterr().out
    png = np.asarray(Image.open(out)).astype(int)
    grid = make_grid(to_uint8(shared), nrow=3)[..., 0]
    grid = grid.repeat(4, axis=0).repeat(4, axis=1)  # 16 px samples are written 4x enlarged
    assert png.shape == grid.shape and np.abs(png - grid).max() <= 1 and grid.std() > 0

    sched = run / "schedule.json"
    assert cli.main(["ddt-schedule", "--checkpoint", str(run), "--num-steps", "4", "--refresh-rate", "2",
                     "--batch", "2", "--out", str(sched)]) == 0
    meta = json.loads(sched.read_text())
    assert len(meta["schedule"]) == 2 and meta["meta"]["variant"] == loaded.name
    assert cli.main(["sample-ddt", "--ckpt", str(run), "--steps", "4", "--schedule", str(sched),
                     "--out", str(out)]) == 0
    assert "encoder on 2 of 4 steps" in capsys.readouterr().out

    assert cli.main(["sample", "--ckpt", str(run), "--sampler", "ddpm", "--out", str(run / "x.png")]) == 2
    assert "objective=flow" in (err := capsys.readouterr().err) and "--sampler ddpm" in err and "euler" in err
    assert cli.main(["sample", "--ckpt", str(run), "--image-size", "256", "--out", str(out)]) == 1
    assert "trained for 16 px" in capsys.readouterr().err
    assert cli.main(["sample", "--ckpt", str(run), "--vae", "ema", "--out", str(out)]) == 1
    assert "--vae does not apply" in capsys.readouterr().err


def test_a_dit_trains_with_the_flow_objective_sit_style(tmp_path, capsys):
    """objective=flow with model.arch=dit: the DiT read as a velocity model (learn_sigma off), t scaled to the
    timestep embedder's range."""
    from dit_jax.train.config_load import ConfigError, load_config
    from dit_jax.train.loop import train

    overrides = ["objective=flow", "model.learn_sigma=False", "diffusion.learn_sigma=False", "flow.time_scale=1000",
                 "flow.t_dist=uniform", "train.sample_sampler=euler", "train.steps=3", "train.log_every=3",
                 "train.ckpt_every=3"]
    out = train(load_config("configs/digits.py:runlocal=True", overrides), tmp_path)
    assert out["step"] == 3 and np.isfinite(out["metrics"]["loss"]) and "repa_loss" not in out["metrics"]
    with pytest.raises(ConfigError, match="learn_sigma=False"):
        load_config("configs/digits.py:runlocal=True", ["objective=flow"])

    # sampled by `sample` (flow: euler) with t * 1000 and no encoder sharing; ddt-schedule has nothing to share
    from dit_jax import cli
    from dit_jax.models import DiT
    from dit_jax.sampling.load import load_model

    loaded = load_model(str(tmp_path))
    assert isinstance(loaded.model, DiT) and loaded.objective == "flow" and loaded.time_scale == 1000.0
    assert cli.main(["sample", "--ckpt", str(tmp_path), "--steps", "3", "--labels", "4,5",
                     "--out", str(tmp_path / "g.png")]) == 0
    printed = capsys.readouterr().out
    assert "euler, 3 steps" in printed and "encoder" not in printed  # no condition encoder to run or share
    assert cli.main(["sample", "--ckpt", str(tmp_path), "--refresh-rate", "2",
                     "--out", str(tmp_path / "g.png")]) == 1
    assert "condition encoder" in capsys.readouterr().err
    assert cli.main(["ddt-schedule", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "s.json")]) == 1
    assert "no condition encoder" in capsys.readouterr().err

    # --sampler heun and euler_maruyama: the CLI's images are dit_jax.diffusion.flow.sample's (the library solver)
    # on the run's EMA model with the CLI's defaults (cfg 2.0 in (0.3, 1), last step 0.04, t * 1000), from example
    # i's key fold_in(key(seed), i) (x_0 = normal(key); Euler-Maruyama's step noise from fold_in(key, step))
    from dit_jax.diffusion import flow
    from dit_jax.images import to_uint8
    from dit_jax.sampling import example_keys
    from dit_jax.sampling.methods import initial_noise, velocity_fn

    labels, keys = jnp.array([4, 5]), example_keys(0, np.arange(2))
    images = {}
    for method in ("euler", "heun", "euler_maruyama"):
        npz = tmp_path / f"{method}.npz"
        assert cli.main(["sample", "--ckpt", str(tmp_path), "--sampler", method, "--steps", "3", "--labels", "4,5",
                         "--out", str(tmp_path / f"{method}.png"), "--npz", str(npz), "--no-progress"]) == 0
        assert f"{method}, 3 steps" in capsys.readouterr().out
        with np.load(npz) as f:
            images[method] = f["images"]
        fs = flow.FlowSampleSettings(num_steps=3, sampler=method, cfg_scale=2.0, interval_min=0.3, interval_max=1.0,
                                     last_step=0.04)
        v = flow.guided_velocity(velocity_fn(loaded.model, 1000.0), labels, loaded.model.num_classes, fs)
        ref = flow.sample(v, initial_noise(loaded.model, keys), fs,
                          key=keys if method == "euler_maruyama" else None)
        assert np.abs(images[method].astype(int) - to_uint8(np.asarray(ref)).astype(int)).max() <= 1
    # (after 3 steps the adaLN-Zero model's velocity is still near zero, so Heun's images equal Euler's here; they
    # differ on a model with weight: tests/test_sampling_flow.py) Euler-Maruyama adds its step noise
    assert np.abs(images["euler_maruyama"].astype(int) - images["euler"].astype(int)).max() > 2
