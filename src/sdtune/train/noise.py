"""The diffusion objective: timesteps, noising and the regression target (epsilon or velocity).

SD was trained with the DDPM schedule ``scaled_linear`` from beta 0.00085 to 0.012 over 1000 steps. With
abar_t = prod(1 - beta_s), a clean latent x0 and noise eps, the noisy latent is
``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``. The model predicts eps (SD 1.x, 2.x-base) or the velocity
``v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0`` (SD 2.x 768-v; Salimans & Ho 2022, "Progressive Distillation",
section 4).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler


def _coefficients(scheduler: DDPMScheduler, latents: torch.Tensor,
                  timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(abar_t) and sqrt(1 - abar_t) per sample, in float32, shaped to broadcast over ``latents``."""
    abar = scheduler.alphas_cumprod.to(latents.device, torch.float32)[timesteps]
    shape = (-1,) + (1,) * (latents.dim() - 1)
    return abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)


def add_noise(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    a, s = _coefficients(scheduler, latents, timesteps)
    return (a * latents.float() + s * noise.float()).to(latents.dtype)


def target(prediction_type: str, scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
           timesteps: torch.Tensor) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a, s = _coefficients(scheduler, latents, timesteps)
        return (a * noise.float() - s * latents.float()).to(latents.dtype)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def sample_noise_and_timesteps(latents: torch.Tensor, num_train_timesteps: int,
                               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and uniformly drawn timesteps from ``generator`` (seeded per step, so a resumed run draws the same)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device, latents.dtype)
    timesteps = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=generator).to(latents.device)
    return noise, timesteps
