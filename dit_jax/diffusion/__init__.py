"""Gaussian diffusion for DiT (JAX port of facebookresearch/DiT's diffusion/ package), NHWC.

    diffusion = create_diffusion("250")            # DDPM sampling with 250 respaced steps
    losses = create_diffusion("").training_losses(model_fn, x0, t, dict(y=y), key=key)
    x0 = diffusion.p_sample_loop(model_fn, (B, H, W, C), model_kwargs=dict(y=y), key=key)
"""

from __future__ import annotations

from collections.abc import Sequence

from .gaussian import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    betas_for_alpha_bar,
    get_beta_schedule,
    get_named_beta_schedule,
)
from .respace import SpacedDiffusion, space_timesteps
from .utils import (
    approx_standard_normal_cdf,
    continuous_gaussian_log_likelihood,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
)


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """The official DiT `create_diffusion` (same arguments, defaults and semantics).

    timestep_respacing: "" or None for all diffusion_steps, else a space_timesteps spec ("250",
    "ddim50", "10,15,20" or a list of counts). Loss: RESCALED_KL if use_kl, else RESCALED_MSE if
    rescale_learned_sigmas, else MSE. Mean: START_X if predict_xstart else EPSILON. Variance:
    LEARNED_RANGE if learn_sigma, else FIXED_SMALL if sigma_small else FIXED_LARGE.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )


__all__ = [
    "GaussianDiffusion",
    "LossType",
    "ModelMeanType",
    "ModelVarType",
    "SpacedDiffusion",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "continuous_gaussian_log_likelihood",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_beta_schedule",
    "get_named_beta_schedule",
    "mean_flat",
    "normal_kl",
    "space_timesteps",
]
