"""The PyTorch references of `dit-jax bench`: the official facebookresearch/DiT training iteration and guided
forward, and the same loop around diffusers' DiTTransformer2DModel as a second column.

    python bench/torch_reference.py train --variant S/2 --batch 32               # one JSON line (median of windows)
    python bench/torch_reference.py serve train --impl official --variant S/2    # a worker for interleaved runs

Models (`--impl`):
- official: tests/official_dit_torch.py, the repository's one transcription of the official models.py (imported by
  path), built as train.py builds it (class dropout 0.1) and with timm >= 0.9's attention, which calls
  torch.nn.functional.scaled_dot_product_attention (timm's default unless TIMM_FUSED_ATTN=0);
- official-math: the same with timm's explicit softmax(q k^T / sqrt(d)) v attention (TIMM_FUSED_ATTN=0, or a
  timm older than 0.9);
- diffusers: diffusers' DiTTransformer2DModel with the same shape (its own DiT conversion layout).

Training iteration, as the official train.py (github.com/facebookresearch/DiT) does it after the VAE encode: a latent
0.18215 * (mean + std * eps) drawn from VAE moments (our trainer's input; the VAE is not timed on either side), t
uniform in [0, 1000), the guided-diffusion hybrid loss (MSE on eps + the learned-range VB term, `HybridLoss`
below), AdamW(lr=1e-4, weight_decay=0), zero_grad / backward / step, then train.py's update_ema (a loop over named
parameters: ema.mul_(decay).add_(param, alpha=1 - decay)) and loss.item() (train.py reads the loss every step).

The loss is restated in torch from the official diffusion/gaussian_diffusion.py (training_losses with LossType.MSE
and ModelVarType.LEARNED_RANGE): x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; mse on eps; the VB term is the KL (in bits
per dim) between the true posterior and the model's, with the model's eps detached, and the discretised decoder NLL
at t = 0. tests/test_bench.py checks it equal to our loss per example.

Sampling: one classifier-free-guided denoiser evaluation for B images (the model on 2B inputs [x | x] with
[y | null]): the official forward_with_cfg for official*, the same combination around the diffusers model.

Worker protocol (`serve`, used by dit_jax.perf.bench.Worker): dit_jax/perf/worker.py (standard library only, so this
worker does not import jax). Only this file imports torch and diffusers (neither is a dependency of the library).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: the library's worker protocol (standard library only)
    sys.path.insert(0, str(REPO))
from dit_jax.perf.worker import die_with_parent, serve_windows, say, window  # noqa: E402

OFFICIAL_TRANSCRIPTION = REPO / "tests" / "official_dit_torch.py"
IMPLS = ("official", "official-math", "diffusers")
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # DiT Table 1


def official_module() -> ModuleType:
    """tests/official_dit_torch.py (the transcription the parity tests use), imported by path."""
    if not OFFICIAL_TRANSCRIPTION.is_file():
        raise FileNotFoundError(f"{OFFICIAL_TRANSCRIPTION} not found: the reference needs a source checkout")
    name = "dit_jax_bench_official_dit_torch"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, OFFICIAL_TRANSCRIPTION)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def official_dit(depth: int, hidden_size: int, num_heads: int, patch_size: int, input_size: int,
                 in_channels: int = 4, num_classes: int = 1000, learn_sigma: bool = True,
                 fused_attn: bool = True, class_dropout_prob: float = 0.1) -> torch.nn.Module:
    """The official DiT (models.py transcription) as train.py builds it (class dropout 0.1); fused_attn: timm >= 0.9."""
    return official_module().OfficialDiT(
        input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size, depth=depth,
        num_heads=num_heads, num_classes=num_classes, learn_sigma=learn_sigma, class_dropout_prob=class_dropout_prob,
        fused_attn=fused_attn)


def diffusers_dit(depth: int, hidden_size: int, num_heads: int, patch_size: int, input_size: int,
                  in_channels: int = 4, num_classes: int = 1000, learn_sigma: bool = True) -> torch.nn.Module:
    """A DiTTransformer2DModel with the official DiT's shape (diffusers' own DiT conversion layout)."""
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=num_heads,
        attention_head_dim=hidden_size // num_heads,
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_layers=depth,
        sample_size=input_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        dropout=0.0,
    )


def build_model(impl: str, depth: int, hidden_size: int, num_heads: int, patch_size: int, input_size: int,
                in_channels: int = 4, num_classes: int = 1000) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """(model, forward) for `impl`; forward(x (N, C, H, W), t (N,), y (N,)) -> (N, 2C, H, W) = [eps | v]."""
    if impl in ("official", "official-math"):
        model = official_dit(depth, hidden_size, num_heads, patch_size, input_size, in_channels, num_classes,
                             fused_attn=impl == "official")
        return model, model
    if impl == "diffusers":
        model = diffusers_dit(depth, hidden_size, num_heads, patch_size, input_size, in_channels, num_classes)
        return model, lambda x, t, y: model(x, timestep=t, class_labels=y).sample
    raise ValueError(f"unknown reference {impl!r}; expected one of {IMPLS}")


class HybridLoss:
    """guided-diffusion training_losses (MSE + learned-range VB), linear schedule, T steps, in torch."""

    def __init__(self, steps: int = 1000, device: torch.device | str = "cpu"):
        scale = 1000 / steps
        betas = np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        self.num_timesteps = steps

        def f32(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(device)  # tables beside the model

        self.sqrt_abar = f32(np.sqrt(abar))
        self.sqrt_1m_abar = f32(np.sqrt(1.0 - abar))
        self.sqrt_recip_abar = f32(np.sqrt(1.0 / abar))
        self.sqrt_recipm1_abar = f32(np.sqrt(1.0 / abar - 1.0))
        self.post_log_var = f32(np.log(np.append(post_var[1], post_var[1:])))
        self.log_betas = f32(np.log(betas))
        self.coef1 = f32(betas * np.sqrt(abar_prev) / (1.0 - abar))
        self.coef2 = f32((1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar))

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return table[t].view(-1, 1, 1, 1)

    def __call__(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                 noise: torch.Tensor) -> dict[str, torch.Tensor]:
        """model_out (B, 2C, H, W) = [eps | v]; returns per-example loss, mse, vb, each (B,)."""
        c = x0.shape[1]
        eps, v = model_out[:, :c], model_out[:, c:]
        mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
        eps_frozen = eps.detach()  # the VB term trains only the variance
        min_log, max_log = self._at(self.post_log_var, t), self._at(self.log_betas, t)
        frac = (v + 1) / 2
        model_log_var = frac * max_log + (1 - frac) * min_log
        x0_pred = self._at(self.sqrt_recip_abar, t) * x_t - self._at(self.sqrt_recipm1_abar, t) * eps_frozen
        model_mean = self._at(self.coef1, t) * x0_pred + self._at(self.coef2, t) * x_t
        true_mean = self._at(self.coef1, t) * x0 + self._at(self.coef2, t) * x_t
        true_log_var = min_log
        kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                    + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
        kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return dict(loss=mse + vb, mse=mse, vb=vb)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_abar, t) * x0 + self._at(self.sqrt_1m_abar, t) * noise


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor):
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float = 0.9999) -> None:
    """train.py's update_ema: every named parameter, ema <- decay * ema + (1 - decay) * param, one at a time."""
    ema_params = OrderedDict(ema_model.named_parameters())
    for name, param in model.named_parameters():
        ema_params[name].mul_(decay).add_(param.data, alpha=1 - decay)


class TorchTrainer:
    """train.py's iteration per call, on a batch of VAE moments (B, 2C, H, W) and labels (B,).

    forward(x_t, t, y) -> (B, 2C, H, W) is the model call (the model itself for the official DiT)."""

    def __init__(self, model: torch.nn.Module, forward: Callable[..., torch.Tensor] | None = None, *,
                 lr: float = 1e-4, ema_decay: float = 0.9999, latent_scale: float = 0.18215, seed: int = 0):
        torch.manual_seed(seed)
        self.model = model.train()
        self.forward = forward or model
        self.ema = copy.deepcopy(model).requires_grad_(False)  # train.py: deepcopy, no grads, updated every step
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # train.py
        self.decay = ema_decay
        self.scale = latent_scale
        self.loss = HybridLoss(device=next(model.parameters()).device)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(self.model.parameters())

    def step(self, moments: torch.Tensor, y: torch.Tensor) -> float:
        """One iteration; returns the batch-mean loss (read back as train.py does, loss.item())."""
        mean, logvar = moments.chunk(2, dim=1)
        with torch.no_grad():  # the latent train.py gets from vae.encode(x).latent_dist.sample().mul_(0.18215)
            x0 = self.scale * (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean))
        t = torch.randint(0, self.loss.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.loss.q_sample(x0, t, noise)
        loss = self.loss(self.forward(x_t, t, y), x0, x_t, t, noise)["loss"].mean()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        update_ema(self.ema, self.model, self.decay)
        return loss.item()


def cfg_forward(forward: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                null_class: int, cfg_scale: float = 4.0, cfg_channels: int = 3) -> torch.Tensor:
    """One guided denoiser evaluation for B images: forward on [x | x] with [y | null], eps combined on the first
    cfg_channels channels (the official forward_with_cfg's arithmetic). -> (B, 2C, H, W)."""
    xx = torch.cat([x, x], dim=0)
    tt = torch.cat([t, t], dim=0)
    yy = torch.cat([y, torch.full_like(y, null_class)], dim=0)
    out = forward(xx, tt, yy)
    eps, rest = out[:, :cfg_channels], out[:, cfg_channels:]
    cond, uncond = eps.chunk(2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([guided, rest[: x.shape[0]]], dim=1)


def _variant(name: str) -> tuple[int, int, int, int]:
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if size not in SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown variant {name!r}; expected S|B|L|XL / 2|4|8")
    return (*SIZES[size], int(patch))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(mode: str, variant: str, batch: int, res: int = 256, device: str = "cpu", amp: str = "none",
            cfg_scale: float = 4.0, num_classes: int = 1000, seed: int = 0,
            impl: str = "official") -> tuple[Callable[[], Any], dict[str, Any]]:
    """(run, info): run() is one train iteration or one guided forward of `batch` images; info describes it."""
    if impl not in IMPLS:
        raise ValueError(f"unknown reference {impl!r}; expected one of {IMPLS}")
    depth, hidden, heads, patch = _variant(variant)
    dev = torch.device(device)
    if dev.type == "cuda":  # the official train.py's setting
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    side = res // 8
    model, forward = build_model(impl, depth, hidden, heads, patch, side, num_classes=num_classes)
    model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if amp == "bf16"
                else torch.autocast(dev.type, enabled=False))
    if mode == "train":
        trainer = TorchTrainer(model, forward, seed=seed)
        mean = 5.0 * torch.randn(batch, 4, side, side, generator=gen)
        moments = torch.cat([mean, torch.full_like(mean, -6.0)], dim=1).to(dev)

        def run() -> Any:
            with autocast:
                return trainer.step(moments, y)
    elif mode == "sample":
        model.eval()
        x = torch.randn(batch, 4, side, side, generator=gen).to(dev)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(dev)
        if impl == "diffusers":
            def run() -> Any:
                with torch.inference_mode(), autocast:
                    return cfg_forward(forward, x, t, y, num_classes, cfg_scale)
        else:  # the official method itself, on the 2B inputs the official sampler hands it
            xx, tt = torch.cat([x, x]), torch.cat([t, t])
            yy = torch.cat([y, torch.full_like(y, num_classes)])

            def run() -> Any:
                with torch.inference_mode(), autocast:
                    return model.forward_with_cfg(xx, tt, yy, cfg_scale)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    info = dict(impl=f"pytorch-{impl}", reference=impl, mode=mode, variant=variant, batch=batch, res=res,
                dtype="bfloat16-autocast" if amp == "bf16" else "float32", device=str(dev),
                torch=torch.__version__, threads=torch.get_num_threads())

    def synced() -> Any:
        out = run()
        _sync(dev)
        return out

    return synced, info


def _peak(device: str) -> float | None:
    dev = torch.device(device)
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def bench(mode: str, variant: str, batch: int, res: int = 256, steps: int = 20, warmup: int = 3, windows: int = 5,
          device: str = "cpu", amp: str = "none", cfg_scale: float = 4.0, num_classes: int = 1000,
          seed: int = 0, impl: str = "official") -> dict[str, Any]:
    """Median seconds per train step / guided forward over timed windows, after warm-up (as dit_jax.perf.bench)."""
    run, info = prepare(mode, variant, batch, res, device, amp, cfg_scale, num_classes, seed, impl)
    for _ in range(warmup):
        run()
    per = max(1, steps // windows)
    times = [window(run, per)["seconds_per_call"] for _ in range(windows)]
    step_s = statistics.median(times)
    return dict(info, step_s=step_s, step_s_min=min(times), step_s_max=max(times), steps_per_s=1.0 / step_s,
                images_per_s=batch / step_s, peak_memory_gib=_peak(device))


def serve(mode: str, variant: str, batch: int, res: int = 256, warmup: int = 3, device: str = "cpu",
          amp: str = "none", cfg_scale: float = 4.0, num_classes: int = 1000, seed: int = 0,
          impl: str = "official") -> None:
    """The worker loop (module docstring): build, warm up, then time windows on request until `quit`."""
    run, info = prepare(mode, variant, batch, res, device, amp, cfg_scale, num_classes, seed, impl)
    t0 = time.perf_counter()
    for _ in range(warmup):
        run()
    say("ready", info=dict(info, warmup_s=time.perf_counter() - t0))
    serve_windows(run)
    say("done", info=dict(peak_memory_gib=_peak(device)))


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="The PyTorch reference side of `dit-jax bench` (one JSON line, or a "
                                            "worker with `serve`).")
    p.add_argument("mode", choices=("train", "sample", "serve"))
    p.add_argument("serve_mode", nargs="?", choices=("train", "sample"), help="with serve: what the worker times")
    p.add_argument("--impl", choices=IMPLS, default="official", help="which reference model (default official)")
    p.add_argument("--variant", default="S/2")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="torch.autocast bf16 (default: fp32)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--num-classes", type=int, default=1000)
    a = p.parse_args(argv)
    if a.mode == "serve":
        die_with_parent()
        if a.serve_mode is None:
            p.error("serve needs the mode it times: serve train|sample")
        serve(a.serve_mode, a.variant, a.batch, a.res, a.warmup, a.device, a.amp, a.cfg_scale, a.num_classes,
              impl=a.impl)
        return
    print(json.dumps(bench(a.mode, a.variant, a.batch, a.res, a.steps, a.warmup, a.windows, a.device, a.amp,
                           a.cfg_scale, a.num_classes, impl=a.impl)))


if __name__ == "__main__":
    main()
