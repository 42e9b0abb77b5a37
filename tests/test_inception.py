"""The FID Inception-v3 (dit_jax.models.inception) and its weight loader (dit_jax.convert.inception).

Parity: random weights in the pytorch-fid layout go through torch.save -> load_inception_file -> Evaluator (jitted,
batch sharded over the 8 simulated CPU devices, last batch padded) and must reproduce an independent PyTorch
transcription of pytorch-fid's FID Inception (tests/inception_reference.py, with the TF1 resize done as float64
interpolation matrices) on pool, spatial (mixed_6/conv[..., :7]) and logits (no bias) to 1e-4 relative.
The TF1 resize is also checked on cases worked out by hand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
from inception_reference import (  # noqa: E402
    FIDInceptionTorch,
    random_inception_state_dict,
    reference_features,
    resize_tf1_reference,
)

from dit_jax.convert.common import CheckpointMismatchError, CheckpointReadError  # noqa: E402
from dit_jax.convert.inception import WEIGHTS_URL, load_inception, load_inception_file  # noqa: E402
from dit_jax.evaluate.evaluator import Evaluator  # noqa: E402
from dit_jax.models import InceptionV3  # noqa: E402
from dit_jax.models.inception import SPATIAL_DIM, resize_bilinear_tf1, tf1_resize_weights  # noqa: E402

RTOL = 1e-4


def abstract_model(**kw) -> InceptionV3:
    return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), **kw))


# ----------------------------------------------------------------------------------------------------------
# TF1 resize.
# ----------------------------------------------------------------------------------------------------------
def test_resize_2x2_to_4x4_by_hand():
    # scale = 2/4 = 0.5, source positions 0, 0.5, 1, 1.5 -> (lo, hi, lerp) = (0,1,0), (0,1,.5), (1,1,0), (1,1,.5):
    # no half-pixel offset, and the last row/column repeats the edge (hi is clamped to 1).
    x = np.array([[0.0, 4.0], [8.0, 12.0]])[None, :, :, None]
    want = np.array([[0, 2, 4, 4], [4, 6, 8, 8], [8, 10, 12, 12], [8, 10, 12, 12]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(resize_bilinear_tf1(x, (4, 4)))[0, :, :, 0], want)
    np.testing.assert_array_equal(resize_tf1_reference(x, (4, 4))[0, :, :, 0], want)
    # half-pixel centres (TF2 / torch align_corners=False) would give another answer: the modes are distinguishable
    half_pixel = np.asarray(jax.image.resize(jnp.asarray(x, jnp.float32), (1, 4, 4, 1), "linear"))[0, :, :, 0]
    assert not np.allclose(half_pixel, want)
    lo, hi, lerp = tf1_resize_weights(2, 4)
    assert lo.tolist() == [0, 0, 1, 1] and hi.tolist() == [1, 1, 1, 1] and lerp.tolist() == [0, 0.5, 0, 0.5]


def test_resize_3x3_to_2x2_by_hand():
    # scale = 1.5, source positions 0 and 1.5: out[1, 1] = mean of rows 1, 2 at column 1.5 = (4.5 + 7.5) / 2 = 6.
    x = np.arange(9.0).reshape(1, 3, 3, 1)
    want = np.array([[0.0, 1.5], [4.5, 6.0]], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(resize_bilinear_tf1(x, (2, 2)))[0, :, :, 0], want)
    np.testing.assert_array_equal(resize_tf1_reference(x, (2, 2))[0, :, :, 0], want)


@pytest.mark.parametrize("shape", [(2, 37, 53, 3), (1, 331, 310, 3), (1, 299, 299, 3)])
def test_resize_to_299_matches_reference(shape):
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    got = np.asarray(resize_bilinear_tf1(jnp.asarray(x), (299, 299)))
    want = resize_tf1_reference(x, (299, 299))
    assert got.dtype == np.float32 and got.shape == (shape[0], 299, 299, 3)
    np.testing.assert_allclose(got, want, atol=1e-3)  # float32 arithmetic on values in [0, 255]
    if shape[1:3] == (299, 299):
        np.testing.assert_array_equal(got, x)  # same size: the identity


# ----------------------------------------------------------------------------------------------------------
# Model structure and loader.
# ----------------------------------------------------------------------------------------------------------
def test_structure_matches_pytorch_fid_layout():
    model = abstract_model()
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    n_stats = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    ref = FIDInceptionTorch()
    assert n_params == sum(p.numel() for p in ref.parameters()) == 23_850_960  # incl. fc 2048 x 1008 + 1008
    assert n_stats == sum(b.numel() for n, b in ref.named_buffers() if "running" in n)
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((3, 64, 80, 3), jnp.uint8))
    assert {k: v.shape for k, v in out.items()} == {"pool": (3, 2048), "spatial": (3, SPATIAL_DIM),
                                                     "logits": (3, 1008)}
    assert SPATIAL_DIM == 17 * 17 * 7
    bf16 = abstract_model(dtype=jnp.bfloat16)
    out = nnx.eval_shape(lambda m, x: m(x), bf16, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
    assert all(v.dtype == jnp.float32 for v in out.values())


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    sd = random_inception_state_dict(seed=0)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd.items()}, path)
    return sd, path


def test_parity_with_pytorch_reference(weights):
    sd, path = weights
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3)).astype(np.uint8)
    want = reference_features(sd, images)
    evaluator = Evaluator(load_inception_file(path), batch_size=8, progress=False)  # 8 devices, padded 2 -> 8
    got = evaluator.activations(images)
    for key in ("pool", "spatial", "logits"):
        g, w = getattr(got, key), want[key]
        assert g.shape == w.shape and g.dtype == np.float32, key
        scale = np.abs(w).max()
        err = np.abs(g - w).max() / scale
        print(f"{key}: max rel err {err:.2e}, reference max {scale:.3g}")
        assert scale > 0.1 and np.abs(w).std() > 0.01, key  # not degenerate
        assert err < RTOL, (key, err)


def test_loader_reports_every_bad_key(weights):
    sd, _ = weights
    bad = dict(sd)
    del bad["Mixed_6d.branch1x1.bn.running_var"]
    bad["Mixed_6d.extra.weight"] = np.zeros(3, np.float32)
    bad["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(CheckpointMismatchError) as e:
        load_inception(abstract_model(), bad)
    err = e.value
    assert err.missing == ["Mixed_6d.branch1x1.bn.running_var"]
    assert err.unexpected == ["Mixed_6d.extra.weight"]
    assert err.mismatched == [("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3), (32, 3, 5, 5))]
    assert WEIGHTS_URL in str(err)


def test_loader_hint_for_torchvision_weights(weights):
    sd, _ = weights
    tv = dict(sd, **{"AuxLogits.fc.weight": np.zeros((1000, 768), np.float32)})
    tv["fc.weight"] = np.zeros((1000, 2048), np.float32)
    tv["fc.bias"] = np.zeros((1000,), np.float32)
    with pytest.raises(CheckpointMismatchError, match="torchvision"):
        load_inception(abstract_model(), tv)


def test_loader_values_and_safetensors(weights, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    sd, _ = weights
    path = tmp_path / "inception.safetensors"
    safetensors_numpy.save_file({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, str(path))
    model = load_inception_file(path)  # numpy only, no torch
    np.testing.assert_array_equal(np.asarray(model.fc.kernel.get_value()), sd["fc.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.Mixed_7c.branch3x3_2a.conv.kernel.get_value()),
                                  sd["Mixed_7c.branch3x3_2a.conv.weight"].transpose(2, 3, 1, 0))
    bn = model.Mixed_5b.branch_pool.bn
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"), ("var", "running_var")):
        np.testing.assert_array_equal(np.asarray(getattr(bn, ours).get_value()),
                                      sd[f"Mixed_5b.branch_pool.bn.{theirs}"])


def test_load_inception_file_missing(tmp_path):
    with pytest.raises(CheckpointReadError, match="no such file"):
        load_inception_file(tmp_path / "absent.pth")
