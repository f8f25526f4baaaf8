"""The sampling pipeline: the settings of every image of a run, and text-to-image over diffusers' schedulers.

The loop is written here rather than taken from ``StableDiffusionPipeline`` so that the prompt embeddings come from
:func:`sdtune.models.text.encode_prompts`, the function training uses: the same CLIP skip, the same 75/150/225-token
chunking, the same SD 2.x padding. A model therefore sees at generation exactly the conditioning it was trained on.

One image, step by step (classifier-free guidance, as in Ho & Salimans 2022 and every SD front end)::

    latents = N(0, I) from the image's own seed * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        e_u, e_c = unet(scale_model_input([latents, latents]), t, [negative, prompt])
        latents = scheduler.step(e_u + scale * (e_c - e_u), t, latents)
    image = vae.decode(latents / vae.config.scaling_factor)

**Seeds.** Image ``i`` of a run (counting from 0 over all prompts and their ``--images_per_prompt`` copies, in order)
uses seed ``--seed + i``; a prompt-file line with its own ``--d S`` uses ``S, S + 1, ...`` for its copies. Each image
draws its starting noise, and the noise of ancestral samplers, from a CPU generator seeded with its own seed, so the
same seed gives the same image whatever the batch size or device (up to floating-point differences between devices).

**Hypernetworks.** A :class:`sdtune.models.hypernetwork.Hypernetwork` (an AUTOMATIC1111/NovelAI ``.pt``) changes
every attention's keys and values, scaled by its multiplier; at 0 the images are the base model's.

**LoRAs.** :mod:`sdtune.sampling.loras` hooks LoRA files onto the model for a run; :class:`ImageSettings` records
their names, weights and hashes (``loras``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from sdtune.devices import same_device
from sdtune.errors import SdtuneError
from sdtune.models.choices import ALLOWED_TOKEN_LENGTHS
from sdtune.models.text import encode_prompts
from sdtune.sampling.png import infotext, settings_json
from sdtune.sampling.prompts import MAX_SEED, PromptSpec, check_size
from sdtune.sampling.samplers import get_sampler, make_scheduler

if TYPE_CHECKING:
    from sdtune.models.hypernetwork import Hypernetwork
    from sdtune.models.sd import StableDiffusion
    from sdtune.sampling.loras import LoraUse

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSettings:
    """Everything that made one image; written into its PNG."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    seed: int
    steps: int
    scale: float
    sampler: str
    clip_skip: int
    max_token_length: int
    model: str = ""
    family: str = ""
    prediction_type: str = ""
    hypernetwork: str = ""  # its name; "" for none
    hypernetwork_multiplier: float = 1.0
    loras: tuple[LoraUse, ...] = ()  # the LoRAs applied (sdtune generate --lora), in order

    def batch_key(self) -> tuple[int, int, int, float]:
        """Images with equal keys can share a batch (one scheduler run, one latent size)."""
        return self.width, self.height, self.steps, self.scale

    def parameters_text(self) -> str:
        """The ``parameters`` chunk in AUTOMATIC1111's infotext format (see :func:`sdtune.sampling.png.infotext`)."""
        return infotext(self)

    def to_json(self) -> dict[str, Any]:
        """The ``sdtune`` chunk: every field, with the metadata and sdtune versions."""
        return settings_json(self)


@dataclass
class GeneratedImage:
    """One generated image and the settings that made it."""

    image: Image.Image
    settings: ImageSettings


def random_seed() -> int:
    """A fresh seed for a run given none (below 2**32, short enough to retype)."""
    return secrets.randbelow(2**32)


def _check_run_settings(*, sampler: str, steps: int, width: int, height: int, seed: int, images_per_prompt: int,
                        clip_skip: int, max_token_length: int) -> None:
    get_sampler(sampler)
    if images_per_prompt < 1:
        raise SdtuneError(f"--images_per_prompt must be at least 1, not {images_per_prompt}")
    if steps < 1:
        raise SdtuneError(f"--steps must be at least 1, not {steps}")
    if max_token_length not in ALLOWED_TOKEN_LENGTHS:
        raise SdtuneError(f"--max_token_length must be one of 75, 150, 225 (got {max_token_length})")
    if clip_skip < 1:
        raise SdtuneError(f"--clip_skip must be 1 or more, not {clip_skip}")
    if not 0 <= seed <= MAX_SEED:
        raise SdtuneError(f"--seed must be between 0 and {MAX_SEED}, not {seed}")
    check_size(width, height, "--W/--H")


def plan_images(
    prompts: Sequence[PromptSpec | str],
    *,
    sampler: str = "euler_a",
    steps: int = 30,
    scale: float = 7.5,
    width: int,
    height: int,
    seed: int,
    negative_prompt: str = "",
    images_per_prompt: int = 1,
    clip_skip: int = 1,
    max_token_length: int = 75,
    model_name: str = "",
    family: str = "",
    prediction_type: str = "",
    hypernetwork: str = "",
    hypernetwork_multiplier: float = 1.0,
    loras: Sequence[LoraUse] = (),
) -> list[ImageSettings]:
    """The settings of every image of a run, in order (see the module docstring for the seed rule)."""
    _check_run_settings(sampler=sampler, steps=steps, width=width, height=height, seed=seed,
                        images_per_prompt=images_per_prompt, clip_skip=clip_skip, max_token_length=max_token_length)
    sampler = get_sampler(sampler).name
    out: list[ImageSettings] = []
    for spec in prompts:
        spec = PromptSpec(spec) if isinstance(spec, str) else spec
        for copy in range(images_per_prompt):
            image_seed = spec.seed + copy if spec.seed is not None else seed + len(out)
            out.append(ImageSettings(
                prompt=spec.prompt,
                negative_prompt=spec.negative_prompt if spec.negative_prompt is not None else negative_prompt,
                width=spec.width or width, height=spec.height or height, seed=image_seed % (MAX_SEED + 1),
                steps=spec.steps or steps, scale=spec.scale if spec.scale is not None else scale,
                sampler=sampler, clip_skip=clip_skip, max_token_length=max_token_length, model=model_name,
                family=family, prediction_type=prediction_type, hypernetwork=hypernetwork,
                hypernetwork_multiplier=hypernetwork_multiplier, loras=tuple(loras),
            ))
    return out


def _batches(settings: Sequence[ImageSettings], batch_size: int) -> Iterator[list[ImageSettings]]:
    """Consecutive images of equal size, steps and scale, at most ``batch_size`` at a time (order kept)."""
    current: list[ImageSettings] = []
    for item in settings:
        if current and (len(current) == batch_size or item.batch_key() != current[0].batch_key()):
            yield current
            current = []
        current.append(item)
    if current:
        yield current


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _text_states(model: StableDiffusion, batch: Sequence[ImageSettings], guided: bool) -> torch.Tensor:
    """The prompts' embeddings on the U-Net's device and dtype; under guidance ``[negative, prompt]`` so the
    chunk order of the predictions reads as the formula."""
    first, unet = batch[0], model.unet
    texts = [s.prompt for s in batch] + ([s.negative_prompt for s in batch] if guided else [])
    states = encode_prompts(model.tokenizer, model.text_encoder, texts, first.max_token_length, first.clip_skip)
    states = states.to(_module_device(unet), _module_dtype(unet))
    return torch.cat([states[len(batch):], states[:len(batch)]]) if guided else states


def _decode(model: StableDiffusion, latents: torch.Tensor, batch: Sequence[ImageSettings]) -> list[Image.Image]:
    """The VAE's images of ``latents`` (a warning for each image with NaN/inf latents)."""
    vae = model.vae
    for s, ok in zip(batch, torch.isfinite(latents).flatten(1).all(1).tolist()):
        if not ok:
            logger.warning("image with seed %d of %r has NaN/inf values (an fp16 overflow or a diverged model); "
                           "try --dtype float", s.seed, s.prompt[:60])
    scaled = latents / float(vae.config.scaling_factor)
    pixels = vae.decode(scaled.to(_module_device(vae), _module_dtype(vae))).sample.float()
    pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


@torch.no_grad()
def sample_batch(model: StableDiffusion, batch: Sequence[ImageSettings]) -> list[Image.Image]:
    """Images for settings that share :meth:`ImageSettings.batch_key`, the sampler and the text settings.

    Runs each module where it is (the U-Net's device does the denoising); the scheduler math is float32 whatever
    the U-Net's dtype.
    """
    first = batch[0]
    unet, vae = model.unet, model.vae
    device, unet_dtype = _module_device(unet), _module_dtype(unet)
    guided = first.scale != 1.0  # at scale 1 guidance is the conditional prediction itself: skip the other half
    states = _text_states(model, batch, guided)

    scheduler = make_scheduler(first.sampler, model.family)
    scheduler.set_timesteps(first.steps, device=device)
    generators = [torch.Generator("cpu").manual_seed(s.seed) for s in batch]
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = (unet.config.in_channels, first.height // factor, first.width // factor)
    latents = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]).to(device)
    latents = latents * scheduler.init_noise_sigma
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for t in scheduler.timesteps:
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        pred = unet(model_in.to(unet_dtype), t, encoder_hidden_states=states).sample.float()
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + first.scale * (cond - uncond)
        latents = scheduler.step(pred, t, latents, **step_kwargs).prev_sample
    return _decode(model, latents, batch)


def iter_images(model: StableDiffusion, settings: Sequence[ImageSettings], *, batch_size: int = 1,
                progress: bool = True) -> Iterator[GeneratedImage]:
    """Generate ``settings`` in batches, yielding each image as its batch finishes."""
    if batch_size < 1:
        raise SdtuneError(f"--batch_size must be at least 1, not {batch_size}")
    with tqdm(total=len(settings), desc="generate", unit="img", disable=None if progress else True) as bar:
        for batch in _batches(settings, batch_size):
            for image, s in zip(sample_batch(model, batch), batch):
                yield GeneratedImage(image, s)
            bar.update(len(batch))


def move_model(model: StableDiffusion, device: torch.device | str) -> None:
    """Put the U-Net, VAE and text encoder on ``device`` (modules already there are left alone)."""
    device = torch.device(device)
    for module in (model.unet, model.vae, model.text_encoder):
        if not same_device(_module_device(module), device):
            module.to(device)


def hypernetwork_applied(model: StableDiffusion, hypernetwork: Hypernetwork | None,
                         multiplier: float) -> contextlib.AbstractContextManager[Any]:
    """A context in which ``hypernetwork`` (None: nothing) acts on the U-Net at ``multiplier``."""
    if hypernetwork is None:
        return contextlib.nullcontext()
    return hypernetwork.applied(model.unet, multiplier)


def generate_images(
    model: StableDiffusion,
    prompts: Sequence[PromptSpec | str],
    *,
    sampler: str = "euler_a",
    steps: int = 30,
    scale: float = 7.5,
    width: int | None = None,
    height: int | None = None,
    seed: int | None = None,
    negative_prompt: str = "",
    images_per_prompt: int = 1,
    clip_skip: int | None = None,
    max_token_length: int = 75,
    device: torch.device | str | None = None,
    batch_size: int = 1,
    model_name: str = "",
    progress: bool = True,
    hypernetwork: Hypernetwork | None = None,
    hypernetwork_multiplier: float = 1.0,
) -> list[GeneratedImage]:
    """Text-to-image with ``model``: one :class:`GeneratedImage` (PIL image + settings) per image, in order.

    ``width``/``height`` default to the family's resolution, ``clip_skip`` to its default (1), ``seed`` to a random
    one (logged). ``device`` moves the model there first; None uses the modules where they are. Prompt lines'
    inline options override the run's settings. Set the modules' train/eval mode yourself (loaded models are in
    eval mode; :func:`sdtune.train.samples.sample_during_training` handles a model that is being trained).
    ``hypernetwork`` is applied to the U-Net at ``hypernetwork_multiplier`` for the call (it should be on the
    U-Net's device).
    """
    if device is not None:
        move_model(model, device)
    if seed is None:
        seed = random_seed()
        logger.info("seed: %d (pass --seed %d to repeat this run)", seed, seed)
    settings = plan_images(
        prompts, sampler=sampler, steps=steps, scale=scale, width=width or model.family.resolution,
        height=height or model.family.resolution, seed=seed, negative_prompt=negative_prompt,
        images_per_prompt=images_per_prompt,
        clip_skip=clip_skip if clip_skip is not None else model.family.default_clip_skip,
        max_token_length=max_token_length, model_name=model_name, family=model.family.name,
        prediction_type=model.family.prediction_type,
        hypernetwork=hypernetwork.name if hypernetwork is not None else "",
        hypernetwork_multiplier=hypernetwork_multiplier,
    )
    with hypernetwork_applied(model, hypernetwork, hypernetwork_multiplier):
        return list(iter_images(model, settings, batch_size=batch_size, progress=progress))


__all__ = ["GeneratedImage", "ImageSettings", "generate_images", "hypernetwork_applied", "iter_images",
           "move_model", "plan_images", "random_seed", "sample_batch"]
