"""``sdtune generate``: text-to-image from any model sdtune loads or writes, with training's text conditioning.

The command's options and the call: validate every option and the prompt file, load the model (and hypernetwork),
plan the images, sample and write them. The work is in :mod:`sdtune.sampling` (samplers, prompt files, the sampling
pipeline and its seed rule, PNG files and their infotext). Importing this module imports no torch, so
``sdtune generate --help`` is instant; :func:`generate` imports what it needs.

``--hypernetwork FILE`` (an AUTOMATIC1111/NovelAI ``.pt``, see :mod:`sdtune.models.hypernetwork`) changes every
attention's keys and values, scaled by ``--hypernetwork_multiplier``; at 0 the images are the base model's.

``--lora FILE[:WEIGHT] ...`` (sd-scripts / kohya LoRA and LoCon files, see :mod:`sdtune.sampling.loras`) hooks each
file's layers at its weight (default 1.0) for the run; the images are those of the model ``sdtune merge-lora`` would
write with the same files and weights. Every file is read before the model loads and checked against it before the
first image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from sdtune.errors import SdtuneError
from sdtune.models.choices import ALLOWED_TOKEN_LENGTHS, HALF_ON_CPU_HELP
from sdtune.option_groups import ModelSource
from sdtune.options import opt
from sdtune.sampling.prompts import INLINE_HELP, PromptSpec, read_prompt_file
from sdtune.sampling.samplers import SAMPLER_CHOICES, SAMPLERS

if TYPE_CHECKING:
    import torch

    from sdtune.models.hypernetwork import Hypernetwork
    from sdtune.models.sd import StableDiffusion
    from sdtune.sampling.loras import LoraFile

logger = logging.getLogger(__name__)



@dataclass
class GenerateOptions(ModelSource):
    """The options of ``sdtune generate`` (the model-source group, the prompts, the sampling and the files)."""

    pretrained_model_name_or_path: str = opt(
        None, "model: diffusers folder, .safetensors or .ckpt (anything sdtune train / convert writes)",
        aliases=("--ckpt",))
    prompt: Optional[str] = opt(None, "the prompt")
    from_file: Optional[Path] = opt(None, "text file of prompts, one a line (blank and # lines skipped); a line may "
                                    "carry " + INLINE_HELP)
    negative_prompt: str = opt("", "what the images should not show (a prompt-file line's --n overrides it)")
    W: Optional[int] = opt(None, "image width, a multiple of 8 (default: the model's resolution, 512 or 768)",
                           aliases=("--width",))
    H: Optional[int] = opt(None, "image height, a multiple of 8 (default: the model's resolution)",
                           aliases=("--height",))
    steps: int = opt(30, "sampling steps")
    scale: float = opt(7.5, "classifier-free guidance scale (1: no guidance, no negative prompt)")
    seed: Optional[int] = opt(None, "seed of the first image; image i uses seed + i (default: random, logged)")
    sampler: str = opt("euler_a", f"sampler: {', '.join(SAMPLERS)} (sd-scripts' names such as k_euler_a and "
                       "dpmsolver++ work too)", choices=SAMPLER_CHOICES, metavar="SAMPLER")
    images_per_prompt: int = opt(1, "images generated for each prompt")
    batch_size: int = opt(1, "images generated at once (more memory, faster on GPUs)")
    clip_skip: Optional[int] = opt(None, "use the hidden state N layers from the end of the text encoder, as in "
                                   "training (default 1)")
    max_token_length: int = opt(75, "prompt length in tokens, as in training (150/225: 75-token chunks joined)",
                                choices=ALLOWED_TOKEN_LENGTHS)
    outdir: Path = opt(Path("outputs"), "folder for the PNG files (created; existing files are never overwritten)")
    device: str = opt("auto", "device (auto: cuda when available, else cpu)")
    dtype: str = opt("float", "precision of the U-Net and text encoder (the VAE always runs in float32); "
                     f"{HALF_ON_CPU_HELP}",
                     choices=("float", "fp16", "bf16"))
    hypernetwork: Optional[Path] = opt(None, "apply this hypernetwork .pt (sdtune train --hypernetwork_module, "
                                       "AUTOMATIC1111 or NovelAI format)")
    hypernetwork_multiplier: float = opt(1.0, "strength of --hypernetwork (0: the base model's images)")
    lora: list[str] = opt(help="LoRA files to apply (sd-scripts/kohya LoRA or LoCon, as sdtune train writes them), "
                          "each FILE or FILE:WEIGHT (weight 1.0 by default; 0: no effect), all after one --lora: "
                          "--lora a.safetensors:0.7 b.safetensors:0.5; the images equal those of the model "
                          "sdtune merge-lora writes with the same weights",
                          default_factory=list, metavar="FILE[:WEIGHT]")


def read_prompts(opts: GenerateOptions) -> list[PromptSpec]:
    """The run's prompts: ``--prompt`` or the lines of ``--from_file`` (exactly one of them)."""
    if (opts.prompt is None) == (opts.from_file is None):
        raise SdtuneError("give either --prompt TEXT or --from_file FILE (one prompt a line)")
    if opts.prompt is not None:
        if not opts.prompt.strip():
            raise SdtuneError("--prompt is empty")
        return [PromptSpec(opts.prompt)]
    return read_prompt_file(opts.from_file)  # type: ignore[arg-type]


def _check_options(opts: GenerateOptions, prompts: list[PromptSpec], seed: int) -> None:
    """Every option checked before the model loads (the model's own sizes and clip skip stand in as 8 and 1)."""
    from sdtune.sampling.pipeline import plan_images

    plan_images(prompts, sampler=opts.sampler, steps=opts.steps, scale=opts.scale, width=opts.W or 8,
                height=opts.H or 8, seed=seed, images_per_prompt=opts.images_per_prompt,
                clip_skip=opts.clip_skip if opts.clip_skip is not None else 1, max_token_length=opts.max_token_length)
    if opts.batch_size < 1:
        raise SdtuneError(f"--batch_size must be at least 1, not {opts.batch_size}")


def _load_hypernetwork(opts: GenerateOptions) -> Hypernetwork | None:
    if opts.hypernetwork is None:
        return None
    from sdtune.models.hypernetwork import Hypernetwork, describe

    hypernetwork = Hypernetwork.load(opts.hypernetwork)  # small: a bad file fails before the model loads
    logger.info("%s: %s", opts.hypernetwork, describe(hypernetwork))
    return hypernetwork


def _read_loras(opts: GenerateOptions) -> list[LoraFile]:
    if not opts.lora:
        return []
    from sdtune.sampling.loras import parse_lora_options, read_lora_files

    return read_lora_files(parse_lora_options(opts.lora))  # small: a bad file fails before the model loads


def _load_model(opts: GenerateOptions, device: torch.device, hypernetwork: Hypernetwork | None) -> StableDiffusion:
    """The model on ``device`` in ``--dtype`` (its VAE in float32), the hypernetwork checked against it and moved."""
    import torch

    from sdtune.models.io import load_model, model_summary
    from sdtune.models.sd import place
    from sdtune.precision_names import dtype_of
    from sdtune.sampling.pipeline import move_model

    model = load_model(opts.pretrained_model_name_or_path, v2=opts.v2, v_parameterization=opts.v_parameterization,
                       vae=opts.vae, tokenizer=opts.tokenizer, dtype=dtype_of(opts.dtype))
    # SD's VAE overflows in fp16 (black or NaN images); float32 costs little memory
    place(model.vae, dtype=torch.float32)
    logger.info("loaded %s: %s", opts.pretrained_model_name_or_path, model_summary(model))
    move_model(model, device)
    if hypernetwork is not None:
        hypernetwork.check_model(model.unet, opts.hypernetwork)  # type: ignore[arg-type]
        hypernetwork.to(device).eval()  # float32, as in A1111: the hooks cast the context to it and back
    return model


def generate(opts: GenerateOptions) -> list[Path]:
    """The ``generate`` stage: validate, load, generate, save; returns the written files in order."""
    from sdtune.atomic import check_writable
    from sdtune.devices import half_precision_on_cpu_warning, resolve_device
    from sdtune.sampling.loras import build_networks, loras_applied
    from sdtune.sampling.pipeline import hypernetwork_applied, iter_images, plan_images, random_seed
    from sdtune.sampling.png import NumberedWriter, model_display_name

    prompts = read_prompts(opts)  # every option and the prompt file are checked before the model loads
    device = resolve_device(opts.device)
    seed = opts.seed if opts.seed is not None else random_seed()
    _check_options(opts, prompts, seed)
    hypernetwork = _load_hypernetwork(opts)
    loras = _read_loras(opts)
    slow = half_precision_on_cpu_warning(device, "--dtype", opts.dtype, "--dtype float")
    if slow:
        logger.warning(slow)
    check_writable([("--outdir", Path(opts.outdir))])  # before the model loads, not after the first image
    model = _load_model(opts, device, hypernetwork)
    networks = build_networks(model, loras)  # a LoRA of another family fails here, before any image
    family = model.family
    clip_skip = opts.clip_skip if opts.clip_skip is not None else family.default_clip_skip
    plan = plan_images(prompts, sampler=opts.sampler, steps=opts.steps, scale=opts.scale,
                       width=opts.W or family.resolution, height=opts.H or family.resolution, seed=seed,
                       negative_prompt=opts.negative_prompt, images_per_prompt=opts.images_per_prompt,
                       clip_skip=clip_skip, max_token_length=opts.max_token_length,
                       model_name=model_display_name(opts.pretrained_model_name_or_path), family=family.name,
                       prediction_type=family.prediction_type,
                       hypernetwork=hypernetwork.name if hypernetwork is not None else "",
                       hypernetwork_multiplier=opts.hypernetwork_multiplier, loras=[f.use for f in loras])
    logger.info("%d image(s) of %d prompt(s); sampler %s, %d steps, CFG scale %g, seeds from %d; %s, clip skip %d, "
                "max tokens %d", len(plan), len(prompts), plan[0].sampler, opts.steps, opts.scale, seed,
                family.prediction_type, clip_skip, opts.max_token_length)
    writer = NumberedWriter(opts.outdir)
    with hypernetwork_applied(model, hypernetwork, opts.hypernetwork_multiplier), loras_applied(networks):
        paths = [writer.save(g) for g in iter_images(model, plan, batch_size=opts.batch_size)]
    logger.info("wrote %d image(s) to %s (%s ... %s)", len(paths), opts.outdir, paths[0].name, paths[-1].name)
    return paths


def generate_command(opts: GenerateOptions) -> int:
    """``sdtune generate``: :func:`generate`, exit code 0."""
    generate(opts)
    return 0


__all__ = ["GenerateOptions", "generate", "generate_command", "read_prompts"]
