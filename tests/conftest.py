"""Test set-up: 8 simulated CPU devices (set before jax is imported anywhere) and float32 everywhere."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for this session (empty at the start, removed at the end), also seen by the
# subprocesses the tests start: many tests compile the same program through different jit wrappers (the same
# tiny model's train step, sampler, VAE decode), and a hit skips XLA's compile. Measured on 2 cores:
# test_train + test_models 218 s -> 178 s. It changes no result: a hit is the same executable.
# Under pytest-xdist (`make test`), each worker gets its own sub-folder: JAX writes entries in place, without
# a lock, so two processes must not share one.
_BASE = "DIT_JAX_TESTS_XLA_CACHE"
if _BASE not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ[_BASE] = tempfile.mkdtemp(prefix="dit-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, os.environ[_BASE], ignore_errors=True)
if _BASE in os.environ:
    _xla_cache = os.path.join(os.environ[_BASE], os.environ.get("PYTEST_XDIST_WORKER", "main"))
    os.makedirs(_xla_cache, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
