"""The diffusion objective: timesteps, noising and the regression target (epsilon or velocity).

SD was trained with the DDPM schedule ``scaled_linear`` from beta 0.00085 to 0.012 over 1000 steps. With
abar_t = prod(1 - beta_s), a clean latent x0 and noise eps, the noisy latent is
``x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps``. The model predicts eps (SD 1.x, 2.x-base) or the velocity
``v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0`` (SD 2.x 768-v; Salimans & Ho 2022, "Progressive Distillation",
section 4).

Two optional refinements, as in sd-scripts:

* **noise offset** (``--noise_offset``; Guttenberg, "Diffusion With Offset Noise", Crosstalk Labs 2023): each
  sample's noise gets a constant per channel, ``eps += offset * N(0, 1)[B, C, 1, 1]``, so the model learns to change
  an image's mean brightness (plain SD cannot make very dark or very bright images). 0.05-0.1 is typical.
* **min-SNR weighting** (``--min_snr_gamma``; Hang et al. 2023, "Efficient Diffusion Training via Min-SNR
  Weighting Strategy"): with SNR_t = abar_t / (1 - abar_t), each sample's loss is weighted by
  ``min(SNR_t, gamma) / SNR_t`` for epsilon and ``min(SNR_t, gamma) / (SNR_t + 1)`` for velocity, so the easy
  low-noise timesteps stop dominating the gradient. gamma = 5 is the paper's choice.

**Masked loss** (``--masked_loss``; sd-scripts' ``apply_masked_loss`` in library/custom_train_functions.py): the
elementwise squared error is multiplied by the image's mask at latent resolution (broadcast over the channels; a mask
of another size is area-interpolated to the latents' first) before the usual mean over every latent pixel, and
min-SNR weighting still applies per sample after it. The mean is not renormalised by the mask's area, as in
sd-scripts: a mask that is white on half the image roughly halves the loss, and an all-white mask changes nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from diffusers import DDPMScheduler


def _abar(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """abar_t per sample, float32, on the timesteps' device (the trainer moves ``alphas_cumprod`` to the training
    device once, so this is no copy)."""
    return scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]


def _coefficients(scheduler: DDPMScheduler, latents: torch.Tensor,
                  timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(abar_t) and sqrt(1 - abar_t) per sample, in float32, shaped to broadcast over ``latents``."""
    abar = _abar(scheduler, timesteps.to(latents.device))
    shape = (-1,) + (1,) * (latents.dim() - 1)
    return abar.sqrt().reshape(shape), (1 - abar).sqrt().reshape(shape)


def add_noise(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
              timesteps: torch.Tensor) -> torch.Tensor:
    """The noisy latent x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, in the latents' dtype."""
    a, s = _coefficients(scheduler, latents, timesteps)
    return (a * latents.float() + s * noise.float()).to(latents.dtype)


def target(prediction_type: str, scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
           timesteps: torch.Tensor) -> torch.Tensor:
    """What the model learns to predict: the noise (epsilon) or the velocity (v_prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a, s = _coefficients(scheduler, latents, timesteps)
        return (a * noise.float() - s * latents.float()).to(latents.dtype)
    raise ValueError(f"unknown prediction type {prediction_type!r}")


def sample_noise_and_timesteps(latents: torch.Tensor, num_train_timesteps: int, generator: torch.Generator,
                               noise_offset: float = 0.0, min_timestep: int = 0,
                               max_timestep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps drawn uniformly from [min_timestep, max_timestep) (default: all of them), from
    ``generator`` (seeded per step, so a resumed run draws the same); with ``noise_offset`` a per-sample,
    per-channel constant is added to the noise (drawn after the rest, so the noise and timesteps of a run without
    the offset are unchanged)."""
    high = num_train_timesteps if max_timestep is None else max_timestep
    device = generator.device  # drawn where the generator lives (the training device): no copy, no wait
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32, device=device)
    timesteps = torch.randint(min_timestep, high, (latents.shape[0],), generator=generator, device=device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator, device=device)
    return noise.to(latents.device, latents.dtype), timesteps.to(latents.device)


def min_snr_weights(prediction_type: str, scheduler: DDPMScheduler, timesteps: torch.Tensor,
                    gamma: float) -> torch.Tensor:
    """Per-sample loss weights of min-SNR weighting (see the module docstring), float32, shaped (B,)."""
    abar = _abar(scheduler, timesteps)
    snr = abar / (1 - abar)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def prediction_loss(prediction_type: str, scheduler: DDPMScheduler, pred: torch.Tensor, target: torch.Tensor,
                    timesteps: torch.Tensor, min_snr_gamma: float | None = None,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """The batch's mean squared error in float32; with ``mask`` ([B, 1, h, w] in [0, 1]) the elementwise error is
    weighted by it first, and with ``min_snr_gamma`` each sample's error is weighted (see the module docstring)."""
    if min_snr_gamma is None and mask is None:
        return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
    error = squared_errors(pred, target, mask)
    if min_snr_gamma is None:
        return error.mean()
    per_sample = error.mean(dim=tuple(range(1, pred.dim())))
    return (per_sample * min_snr_weights(prediction_type, scheduler, timesteps, min_snr_gamma)).mean()


def squared_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The elementwise squared error in float32; with ``mask`` ([B, 1, h, w], see :func:`latent_mask`) weighted by
    it (the loss, the validation score and the loss by timestep quarter all start here)."""
    errors = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        errors = errors * latent_mask(mask.to(errors.device), errors.shape[2:])
    return errors


def per_sample_errors(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each sample's mean (mask-weighted) squared error, float32, shaped (B,)."""
    errors = squared_errors(pred, target, mask)
    return errors.mean(dim=tuple(range(1, errors.dim())))


def latent_mask(mask: torch.Tensor, size: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """``mask`` [B, 1, h, w] as float32 of spatial ``size``: as it is when it has that size already (the cached
    masks do), else area-interpolated as sd-scripts does with its pixel masks."""
    mask = mask.float()
    if tuple(mask.shape[2:]) != tuple(size):
        mask = torch.nn.functional.interpolate(mask, size=tuple(size), mode="area")
    return mask
