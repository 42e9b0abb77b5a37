"""The PyTorch reference for the side-by-side benchmarks: diffusers' DiTTransformer2DModel trained the way the
official facebookresearch/DiT train.py trains it (hybrid MSE + VB loss of guided-diffusion, AdamW lr 1e-4 with
no weight decay, EMA 0.9999 every step), and its classifier-free-guidance sampling forward (the
DiTPipeline / official forward_with_cfg combination).

The loss is restated here in torch from the official diffusion/gaussian_diffusion.py (training_losses with
LossType.MSE and ModelVarType.LEARNED_RANGE): x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; mse on eps; the VB term
is the KL (in bits per dim) between the true posterior and the model's, with the model's eps detached, and the
discretised decoder NLL at t = 0. It is a benchmark workload, not a numerical reference (the library's parity tests
use tests/official_dit_torch.py); it is kept honest by tests/test_bench.py, which checks it against our loss.

Only this file imports torch and diffusers (neither is a dependency of the library).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


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
        """model_out (B, 2C, H, W) = [eps | v]; returns per-example loss, mse, vb."""
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


class TorchTrainer:
    """One official-style training iteration per call on a batch of VAE moments (B, 2C, H, W) and labels (B,)."""

    def __init__(self, model: torch.nn.Module, *, lr: float = 1e-4, ema_decay: float = 0.9999,
                 latent_scale: float = 0.18215, seed: int = 0):
        torch.manual_seed(seed)
        self.model = model.train()
        self.ema = [p.detach().clone() for p in model.parameters()]
        self.params = [p for p in model.parameters()]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)  # official train.py
        self.decay = ema_decay
        self.scale = latent_scale
        self.loss = HybridLoss(device=self.params[0].device)

    def step(self, moments: torch.Tensor, y: torch.Tensor) -> float:
        mean, logvar = moments.chunk(2, dim=1)
        x0 = self.scale * (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn_like(mean))
        t = torch.randint(0, self.loss.num_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.loss.q_sample(x0, t, noise)
        out = self.model(x_t, timestep=t, class_labels=y).sample
        loss = self.loss(out, x0, x_t, t, noise)["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():  # update_ema of train.py, as one fused foreach op
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], 1.0 - self.decay)
        return float(loss.detach())


def cfg_forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, null_class: int,
                cfg_scale: float = 4.0, cfg_channels: int = 3) -> torch.Tensor:
    """One guided denoiser evaluation for B images: the model on [x | x] with [y | null], eps combined on the
    first cfg_channels channels (the official forward_with_cfg). -> (B, out_channels, H, W)."""
    xx = torch.cat([x, x], dim=0)
    tt = torch.cat([t, t], dim=0)
    yy = torch.cat([y, torch.full_like(y, null_class)], dim=0)
    out = model(xx, timestep=tt, class_labels=yy).sample
    eps, rest = out[:, :cfg_channels], out[:, cfg_channels:]
    cond, uncond = eps.chunk(2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([guided, rest[: x.shape[0]]], dim=1)


SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}  # DiT Table 1


def _variant(name: str) -> tuple[int, int, int, int]:
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if size not in SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown variant {name!r}; expected S|B|L|XL / 2|4|8")
    return (*SIZES[size], int(patch))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(mode: str, variant: str, batch: int, res: int = 256, steps: int = 20, warmup: int = 3, windows: int = 5,
          device: str = "cpu", amp: str = "none", cfg_scale: float = 4.0, num_classes: int = 1000,
          seed: int = 0) -> dict[str, Any]:
    """Median seconds per train step / guided forward over timed windows, after warm-up (as dit_jax.perf.bench)."""
    import statistics
    import time

    depth, hidden, heads, patch = _variant(variant)
    dev = torch.device(device)
    if dev.type == "cuda":  # the official train.py's setting
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(seed)
    side = res // 8
    model = diffusers_dit(depth, hidden, heads, patch, side, num_classes=num_classes).to(dev)
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (batch,), generator=gen).to(dev)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if amp == "bf16"
                else torch.autocast(dev.type, enabled=False))
    if mode == "train":
        trainer = TorchTrainer(model, seed=seed)
        mean = 5.0 * torch.randn(batch, 4, side, side, generator=gen)
        moments = torch.cat([mean, torch.full_like(mean, -6.0)], dim=1).to(dev)

        def run() -> Any:
            with autocast:
                return trainer.step(moments, y)
    elif mode == "sample":
        model.eval()
        x = torch.randn(batch, 4, side, side, generator=gen).to(dev)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(dev)

        def run() -> Any:
            with torch.inference_mode(), autocast:
                return cfg_forward(model, x, t, y, num_classes, cfg_scale)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    for _ in range(warmup):
        run()
    _sync(dev)
    per = max(1, steps // windows)
    times = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(per):
            run()
        _sync(dev)
        times.append((time.perf_counter() - t0) / per)
    step_s = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return dict(impl="pytorch", mode=mode, variant=variant, batch=batch, res=res,
                dtype="bfloat16-autocast" if amp == "bf16" else "float32", device=str(dev),
                torch=torch.__version__, threads=torch.get_num_threads(), step_s=step_s, step_s_min=min(times),
                step_s_max=max(times), steps_per_s=1.0 / step_s, images_per_s=batch / step_s,
                peak_memory_gib=peak)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser(description="The PyTorch reference side of `dit-jax bench` (prints one JSON line).")
    p.add_argument("mode", choices=("train", "sample"))
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
    print(json.dumps(bench(a.mode, a.variant, a.batch, a.res, a.steps, a.warmup, a.windows, a.device, a.amp,
                           a.cfg_scale, a.num_classes)))


if __name__ == "__main__":
    main()
