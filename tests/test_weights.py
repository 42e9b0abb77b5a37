"""The weights manager against a loopback HTTP server serving generated files: verified downloads, pinned and
announced checksums, truncated transfers, resume with Range, servers ignoring Range, offline mode, corrupt cache
files, locking, pretrained_dit / pretrained_vae end to end (Orbax cache), and `dit-jax download`."""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import re
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from dit_jax import cli
from dit_jax.convert.common import assign, model_to_numpy
from dit_jax.convert.diffusers_vae import expected_diffusers_keys, load_diffusers_vae_folder
from dit_jax.convert.official_dit import to_official_state_dict
from dit_jax.models import DiT
from dit_jax.models.vae import AutoencoderKL
from dit_jax.weights import (
    REGISTRY,
    ChecksumMismatchError,
    CorruptCacheError,
    Entry,
    IncompleteDownloadError,
    OfflineError,
    RemoteFile,
    UnknownWeightsError,
    cache_dir,
    download,
    pretrained_dit,
    pretrained_vae,
    transfer,
)

SIZE = 300_000


# ----------------------------------------------------------------------------------------------------------
# A loopback file server that can misbehave.
# ----------------------------------------------------------------------------------------------------------
class FileServer:
    """Serves `files` (path -> bytes) on 127.0.0.1 with Range support. Switches: truncate_after (bytes of body
    sent before the connection is closed) for the next `truncate_times` responses (None: all), ignore_range,
    corrupt (first byte flipped), delay (seconds before the body), redirects (path -> (target, extra headers)).
    `requests` records (path, Range header) of every request."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.redirects: dict[str, tuple[str, dict[str, str]]] = {}
        self.extra_headers: dict[str, dict[str, str]] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.truncate_after: int | None = None
        self.truncate_times: int | None = None
        self.ignore_range = False
        self.corrupt = False
        self.delay = 0.0
        self.lock = threading.Lock()
        state = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                state.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def _truncate_now(self) -> bool:
        with self.lock:
            if self.truncate_after is None:
                return False
            if self.truncate_times is None:
                return True
            if self.truncate_times > 0:
                self.truncate_times -= 1
                return True
            return False

    def handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        with self.lock:
            self.requests.append((h.path, rng))
        if h.path in self.redirects:
            target, extra = self.redirects[h.path]
            h.send_response(302)
            h.send_header("Location", target)
            for k, v in extra.items():
                h.send_header(k, v)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        data = self.files.get(h.path)
        if data is None:
            h.send_error(404)
            return
        if self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and not self.ignore_range:
            start = int(m.group(1))
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            h.send_response(200)
        body = data[start:]
        h.send_header("Content-Length", str(len(body)))
        for k, v in self.extra_headers.get(h.path, {}).items():
            h.send_header(k, v)
        h.end_headers()
        if self._truncate_now():
            body = body[: self.truncate_after]
        time.sleep(self.delay)
        h.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture(autouse=True)
def quick_and_isolated(monkeypatch, tmp_path):
    """No backoff, few retries, short timeouts; no offline switches or cache from the environment."""
    monkeypatch.setattr(transfer, "BACKOFF_S", 0.0)
    monkeypatch.setattr(transfer, "RETRIES", 1)
    monkeypatch.setattr(transfer, "TIMEOUT_S", 10.0)
    for var in ("DIT_JAX_OFFLINE", "HF_HUB_OFFLINE", "DIT_JAX_DIT_URL_BASE", "DIT_JAX_HF_URL_BASE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DIT_JAX_CACHE", str(tmp_path / "env-cache"))


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def random_bytes(n: int = SIZE, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def add_entry(monkeypatch, name: str, url: str, kind: str = "dit", **file_kw) -> Entry:
    """Register a one-file entry `name` served from `url` (kind "dit": stored in downloads/)."""
    options = file_kw.pop("convert_options", {})
    entry = Entry(name=name, kind=kind, files=(RemoteFile(name, url, **file_kw),), convert_options=options)
    monkeypatch.setitem(REGISTRY, name, entry)
    return entry


def blob(server: FileServer, monkeypatch, data: bytes, **file_kw) -> tuple[str, str]:
    """Serve `data` as /files/blob.bin under the registry name blob.bin; returns (name, url)."""
    server.files["/files/blob.bin"] = data
    url = server.url("/files/blob.bin")
    add_entry(monkeypatch, "blob.bin", url, **file_kw)
    return "blob.bin", url


def leftovers(folder: Path) -> list[str]:
    """Non-hidden files in folder (hidden ones are the lock files)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


# ----------------------------------------------------------------------------------------------------------
# Downloads.
# ----------------------------------------------------------------------------------------------------------
def test_cache_dir_resolution(monkeypatch, tmp_path):
    assert cache_dir(tmp_path / "x") == tmp_path / "x"
    assert cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("DIT_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "dit_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "dit_jax"


def test_download_verifies_and_records_sha256(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data)
    path = download(name, cache_dir=cache, progress=False)
    assert path == cache / "downloads" / name
    assert path.read_bytes() == data
    assert (cache / "downloads" / f"{name}.sha256").read_text() == f"{sha(data)}  {name}\n"
    assert leftovers(cache / "downloads") == [name, f"{name}.sha256"]
    assert server.requests == [("/files/blob.bin", None)]
    # Cached: checked against the record, no request.
    assert download(name, cache_dir=cache, progress=False) == path
    assert len(server.requests) == 1


def test_download_with_correct_pins(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data, size=len(data), sha256=sha(data).upper())
    assert download(name, cache_dir=cache, progress=False).read_bytes() == data


def test_pinned_sha256_mismatch_leaves_nothing(server, monkeypatch, cache):
    data = random_bytes()
    name, url = blob(server, monkeypatch, data, sha256="0" * 64)
    with pytest.raises(ChecksumMismatchError) as e:
        download(name, cache_dir=cache, progress=False)
    msg = str(e.value)
    assert "0" * 64 in msg and sha(data) in msg and url in msg and "pinned" in msg and "Nothing was kept" in msg
    assert leftovers(cache / "downloads") == []  # neither the file, nor .part, nor .sha256


def test_pinned_size_contradicted_by_server_fails_before_downloading(server, monkeypatch, cache):
    data = random_bytes()
    name, url = blob(server, monkeypatch, data, size=len(data) + 1)
    with pytest.raises(ChecksumMismatchError, match=rf"announces {len(data):,} bytes .*refusing"):
        download(name, cache_dir=cache, progress=False)
    assert leftovers(cache / "downloads") == []


def test_truncated_transfer_errors_keeps_part_then_resumes(server, monkeypatch, cache):
    data = random_bytes()
    name, url = blob(server, monkeypatch, data)
    server.truncate_after = 100_000  # every response stops after 100 kB
    with pytest.raises(IncompleteDownloadError) as e:
        download(name, cache_dir=cache, progress=False)  # 2 attempts (RETRIES = 1): 200 kB arrive
    msg = str(e.value)
    part = cache / "downloads" / f"{name}.part"
    assert url in msg and f"closed after 200,000 of {SIZE:,} bytes" in msg and str(part) in msg
    assert "No file was put in the cache" in msg
    assert leftovers(cache / "downloads") == [f"{name}.part"]  # no final file, no record
    assert part.read_bytes() == data[:200_000]
    assert server.requests == [("/files/blob.bin", None), ("/files/blob.bin", "bytes=100000-")]
    # The server recovers: the next call resumes where the .part ends and the result is byte-exact.
    server.truncate_after = None
    path = download(name, cache_dir=cache, progress=False)
    assert server.requests[-1] == ("/files/blob.bin", "bytes=200000-")
    assert path.read_bytes() == data
    assert leftovers(cache / "downloads") == [name, f"{name}.sha256"]


def test_truncated_once_is_retried_with_range_in_the_same_call(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data)
    server.truncate_after, server.truncate_times = 123_457, 1
    assert download(name, cache_dir=cache, progress=False).read_bytes() == data
    assert server.requests == [("/files/blob.bin", None), ("/files/blob.bin", "bytes=123457-")]


def test_resume_existing_part_with_range(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data, sha256=sha(data))
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / f"{name}.part").write_bytes(data[:123_456])
    assert download(name, cache_dir=cache, progress=False).read_bytes() == data
    assert server.requests == [("/files/blob.bin", "bytes=123456-")]
    assert leftovers(cache / "downloads") == [name, f"{name}.sha256"]


def test_complete_part_is_finished_after_416(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data, sha256=sha(data))
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / f"{name}.part").write_bytes(data)
    assert download(name, cache_dir=cache, progress=False).read_bytes() == data
    assert server.requests == [("/files/blob.bin", f"bytes={SIZE}-")]


def test_server_ignoring_range_restarts_from_zero(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data)
    server.ignore_range = True
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / f"{name}.part").write_bytes(random_bytes(50_000, seed=1))  # not even a prefix
    assert download(name, cache_dir=cache, progress=False).read_bytes() == data
    assert server.requests == [("/files/blob.bin", "bytes=50000-")]  # asked to resume, got 200, started over


def test_bad_part_caught_by_checksum_and_deleted(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data, sha256=sha(data))
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / f"{name}.part").write_bytes(random_bytes(50_000, seed=1))
    with pytest.raises(ChecksumMismatchError, match="sha256"):
        download(name, cache_dir=cache, progress=False)
    assert leftovers(cache / "downloads") == []


def test_hugging_face_redirect_headers_give_the_sha256(server, monkeypatch, cache):
    """HF answers /resolve/ with a redirect carrying X-Linked-Etag (sha256) and X-Linked-Size; the CDN's own ETag
    (here 64 hex digits that are not the sha256) must not be taken for one."""
    data = random_bytes()
    server.files["/cdn/abc"] = data
    server.extra_headers["/cdn/abc"] = {"ETag": '"' + "f" * 64 + '"'}
    server.redirects["/org/m/resolve/main/w.safetensors"] = (
        "/cdn/abc",
        {"X-Linked-Etag": f'"{sha(data)}"', "X-Linked-Size": str(len(data)), "ETag": f'"{sha(data)}"'},
    )
    url = server.url("/org/m/resolve/main/w.safetensors")
    files = (RemoteFile("w.safetensors", url, etag_is_sha256=True),)
    monkeypatch.setitem(REGISTRY, "hf-like", Entry("hf-like", "vae", files))
    folder = cache / "vae" / "hf-like"
    folder.mkdir(parents=True)
    (folder / "w.safetensors.part").write_bytes(data[:100_000])  # resumed across the redirect
    assert download("hf-like", cache_dir=cache, progress=False) == folder
    assert (folder / "w.safetensors").read_bytes() == data
    assert server.requests == [("/org/m/resolve/main/w.safetensors", "bytes=100000-"), ("/cdn/abc", "bytes=100000-")]
    # The server now sends other bytes than its header announces: refused; the verified copy stays intact.
    server.corrupt = True
    with pytest.raises(ChecksumMismatchError) as e:
        download("hf-like", cache_dir=cache, progress=False, force=True)
    assert sha(data) in str(e.value) and "ETag" in str(e.value) and url in str(e.value)
    assert (folder / "w.safetensors").read_bytes() == data
    assert leftovers(folder) == ["w.safetensors", "w.safetensors.sha256"]


@pytest.mark.parametrize("how", ["argument", "DIT_JAX_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_missing_file_names_path_and_url(server, monkeypatch, cache, how):
    name, url = blob(server, monkeypatch, random_bytes())
    if how != "argument":
        monkeypatch.setenv(how, "1")
    with pytest.raises(OfflineError) as e:
        download(name, cache_dir=cache, offline=True if how == "argument" else None, progress=False)
    msg = str(e.value)
    assert str(cache / "downloads" / name) in msg and url in msg and "offline" in msg
    assert server.requests == []


def test_offline_uses_cached_and_hand_placed_files(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data)
    path = download(name, cache_dir=cache, progress=False)
    server.requests.clear()
    assert download(name, cache_dir=cache, offline=True) == path
    # A file copied in by hand (no record) is accepted once and recorded; a later change is caught.
    add_entry(monkeypatch, "manual.bin", server.url("/nowhere"))
    manual = cache / "downloads" / "manual.bin"
    manual.write_bytes(data)
    assert download("manual.bin", cache_dir=cache, offline=True) == manual
    assert (cache / "downloads" / "manual.bin.sha256").read_text().split()[0] == sha(data)
    manual.write_bytes(data[:-1] + b"x")
    with pytest.raises(CorruptCacheError):
        download("manual.bin", cache_dir=cache, offline=True)
    assert server.requests == []


def test_corrupted_cache_file_detected_and_repaired_with_force(server, monkeypatch, cache):
    data = random_bytes()
    name, url = blob(server, monkeypatch, data)
    path = download(name, cache_dir=cache, progress=False)
    changed = bytearray(data)
    changed[1000] ^= 1
    path.write_bytes(bytes(changed))  # same size, one bit different
    for offline in (False, True):
        with pytest.raises(CorruptCacheError) as e:
            download(name, cache_dir=cache, offline=offline, progress=False)
        msg = str(e.value)
        assert str(path) in msg and sha(data) in msg and f"dit-jax download --force {name}" in msg and url in msg
    assert len(server.requests) == 1
    assert download(name, cache_dir=cache, force=True, progress=False).read_bytes() == data


def test_http_error_is_clear_and_not_retried(server, monkeypatch, cache):
    add_entry(monkeypatch, "gone.bin", server.url("/missing"))
    with pytest.raises(OSError, match=r"/missing: HTTP 404"):
        download("gone.bin", cache_dir=cache, progress=False)
    assert len(server.requests) == 1
    assert leftovers(cache / "downloads") == []


def test_two_concurrent_downloads_make_one_transfer(server, monkeypatch, cache):
    data = random_bytes()
    name, _ = blob(server, monkeypatch, data)
    server.delay = 0.3
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(download(name, cache_dir=cache, progress=False)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and all(p.read_bytes() == data for p in results)
    assert len(server.requests) == 1


def test_unknown_name():
    with pytest.raises(UnknownWeightsError, match="DiT-XL-2-256x256.pt"):
        download("DiT-XXL-2-256x256.pt")


# ----------------------------------------------------------------------------------------------------------
# Models through the loopback server.
# ----------------------------------------------------------------------------------------------------------
TINY = dict(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory) -> tuple[Path, DiT]:
    """(official-layout .pt of a tiny DiT with random weights, the same DiT in dit_jax)."""
    model = DiT(**TINY, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    ours = {
        k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32)
        for k, v in model_to_numpy(model).items()
        if k != "pos_embed"
    }
    assign(model, ours)
    sd = {k: torch.from_numpy(v) for k, v in to_official_state_dict(model).items()}
    path = tmp_path_factory.mktemp("tiny") / "tiny-dit.pt"
    torch.save(sd, path)
    return path, model


def dit_inputs():
    k = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(k[0], (2, 4, 4, 4))
    return x, jnp.array([3.0, 500.0]), jnp.array([1, 7])


def serve_tiny_dit(server, monkeypatch, pt: Path) -> str:
    """Serve the tiny .pt under the {dit} URL base (as the official ones) and register it as tiny-dit.pt."""
    server.files["/DiT/models/tiny-dit.pt"] = pt.read_bytes()
    monkeypatch.setenv("DIT_JAX_DIT_URL_BASE", server.url("/DiT/models"))
    add_entry(monkeypatch, "tiny-dit.pt", "{dit}/tiny-dit.pt", convert_options={"num_heads": 2})
    return "tiny-dit"


def test_pretrained_dit_end_to_end(server, monkeypatch, cache, tiny_official, caplog):
    pt, reference = tiny_official
    name = serve_tiny_dit(server, monkeypatch, pt)
    x, t, y = dit_inputs()
    want = np.asarray(reference(x, t, y))

    model = pretrained_dit(name, cache_dir=cache, progress=False)
    got = np.asarray(model(x, t, y))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert server.requests == [("/DiT/models/tiny-dit.pt", None)]
    converted = cache / "converted" / "tiny-dit"
    assert (converted / "dit_config.json").is_file() and (converted / "state").is_dir()
    assert json.loads((converted / "dit_config.json").read_text())["input_sha256"] == sha(pt.read_bytes())

    # Second call: from the Orbax cache, no request (even with the .pt gone), same outputs.
    (cache / "downloads" / "tiny-dit.pt").unlink()
    again = pretrained_dit("tiny-dit.pt", cache_dir=cache, progress=False)
    np.testing.assert_array_equal(np.asarray(again(x, t, y)), got)
    assert len(server.requests) == 1

    # A damaged converted folder is reported and converted again (downloading the .pt again).
    (converted / "dit_config.json").write_text("{ not json")
    with caplog.at_level(logging.WARNING, logger="dit_jax.weights"):
        repaired = pretrained_dit(name, cache_dir=cache, progress=False, scan_blocks=True)
    assert "damaged" in caplog.text and str(converted) in caplog.text
    np.testing.assert_allclose(np.asarray(repaired(x, t, y)), got, rtol=1e-6, atol=1e-6)
    assert len(server.requests) == 2
    # Damaged Orbax data (found only when restoring): reported, converted again from the cached .pt.
    caplog.clear()
    (converted / "state" / "_METADATA").unlink()
    with caplog.at_level(logging.WARNING, logger="dit_jax.weights"):
        repaired = pretrained_dit(name, cache_dir=cache, offline=True, progress=False)
    assert "damaged" in caplog.text and str(converted) in caplog.text
    np.testing.assert_array_equal(np.asarray(repaired(x, t, y)), got)
    assert len(server.requests) == 2

    # Options fixed by the weights are refused before anything is loaded.
    with pytest.raises(ValueError, match="fixed by the converted weights"):
        pretrained_dit(name, cache_dir=cache, offline=True, depth=3)


def test_pretrained_dit_from_local_paths(cache, tiny_official):
    pt, reference = tiny_official
    x, t, y = dit_inputs()
    model = pretrained_dit(str(pt), cache_dir=cache, progress=False, convert_options={"num_heads": 2})
    np.testing.assert_allclose(np.asarray(model(x, t, y)), np.asarray(reference(x, t, y)), rtol=1e-6, atol=1e-6)
    (folder,) = [p for p in (cache / "converted").iterdir() if not p.name.startswith(".")]  # not the lock
    assert folder.name == f"tiny-dit-{sha(pt.read_bytes())[:16]}"
    # A converted folder passed by path is loaded as it is.
    again = pretrained_dit(str(folder), cache_dir=cache)
    np.testing.assert_array_equal(np.asarray(again(x, t, y)), np.asarray(model(x, t, y)))
    assert leftovers(cache / "converted") == [folder.name]


def tiny_vae_folder(folder: Path) -> Path:
    """A diffusers-format VAE folder (config.json + safetensors) with random weights."""
    cfg = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
    model = nnx.eval_shape(lambda: AutoencoderKL(**cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    tensors = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in expected_diffusers_keys(model).items()}
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    config = {
        "_class_name": "AutoencoderKL",
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": 4,
        "scaling_factor": 0.18215,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_pretrained_vae_through_the_registry_urls(server, monkeypatch, cache, tmp_path):
    """The real sd-vae-ft-ema entry, with the hub base pointed at the loopback server laid out like the hub."""
    src = tiny_vae_folder(tmp_path / "src-vae")
    cfg, weights = (src / "config.json").read_bytes(), (src / "diffusion_pytorch_model.safetensors").read_bytes()
    base = "/stabilityai/sd-vae-ft-ema/resolve/main/"
    server.files[base + "config.json"] = cfg
    server.extra_headers[base + "config.json"] = {"ETag": '"' + hashlib.sha1(cfg).hexdigest() + '"'}  # git blob id
    server.files["/cdn/vae"] = weights
    server.redirects[base + "diffusion_pytorch_model.safetensors"] = (
        "/cdn/vae",
        {"X-Linked-Etag": f'"{sha(weights)}"', "X-Linked-Size": str(len(weights))},
    )
    monkeypatch.setenv("DIT_JAX_HF_URL_BASE", server.url(""))

    vae = pretrained_vae("ema", cache_dir=cache, progress=False)
    ref = load_diffusers_vae_folder(src)
    for a, b in zip(jax.tree.leaves(nnx.state(vae)), jax.tree.leaves(nnx.state(ref)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert vae.scaling_factor == pytest.approx(0.18215)
    folder = cache / "vae" / "sd-vae-ft-ema"
    assert leftovers(folder) == sorted(
        [
            "config.json",
            "config.json.sha256",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.safetensors.sha256",
        ]
    )
    n = len(server.requests)
    assert n == 3  # config.json, the redirect, the CDN
    pretrained_vae("sd-vae-ft-ema", cache_dir=cache, offline=True)
    pretrained_vae(str(src), cache_dir=cache)  # a local folder
    assert len(server.requests) == n


# ----------------------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------------------
def test_cli_list_download_and_errors(server, monkeypatch, cache, capsys):
    assert cli.main(["download", "--list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    for key in ("DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt", "sd-vae-ft-ema", "sd-vae-ft-mse"):
        assert key in out
    assert "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt" in out
    assert "https://huggingface.co/stabilityai/sd-vae-ft-mse/resolve/main/diffusion_pytorch_model.safetensors" in out
    assert "not cached" in out

    data = random_bytes()
    server.files["/mirror/DiT-XL-2-256x256.pt"] = data
    monkeypatch.setenv("DIT_JAX_DIT_URL_BASE", server.url("/mirror"))
    assert cli.main(["download", "DiT-XL/2-256", "--no-convert", "--cache-dir", str(cache)]) == 0
    path = cache / "downloads" / "DiT-XL-2-256x256.pt"
    assert path.read_bytes() == data and str(path) in capsys.readouterr().out
    assert cli.main(["download", "--list", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"DiT-XL-2-256x256.pt\s+dit\s+downloaded", out) and sha(data) in out

    assert cli.main(["download", "nope", "--cache-dir", str(cache)]) == 1
    assert capsys.readouterr().err.startswith("dit-jax download: error: unknown weights 'nope'")
    assert cli.main(["download", "mse", "--offline", "--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dit-jax download: error: offline") and str(cache / "vae" / "sd-vae-ft-mse") in err
    assert len(server.requests) == 1


def test_cli_download_converts(server, monkeypatch, cache, tiny_official, capsys):
    pt, _ = tiny_official
    name = serve_tiny_dit(server, monkeypatch, pt)
    assert cli.main(["download", name, "--cache-dir", str(cache)]) == 0
    assert (cache / "converted" / "tiny-dit" / "dit_config.json").is_file()
    assert "converted ->" in capsys.readouterr().out
    # Offline, everything cached: the files are checked, nothing is fetched.
    assert cli.main(["download", name, "--offline", "--cache-dir", str(cache)]) == 0
    assert len(server.requests) == 1
