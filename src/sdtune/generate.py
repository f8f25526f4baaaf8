"""``sdtune generate``: text-to-image from any model sdtune loads or writes, with training's text conditioning.

The sampling loop is written here over diffusers' schedulers rather than taken from ``StableDiffusionPipeline`` so
that the prompt embeddings come from :func:`sdtune.models.text.encode_prompts`, the function training uses: the same
CLIP skip, the same 75/150/225-token chunking, the same SD 2.x padding. A model therefore sees at generation exactly
the conditioning it was trained on.

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

**Files.** ``<outdir>/<number:05d>-<seed>.png``, numbered after the highest number already in the folder; a name is
claimed with an exclusive create before the image is written (atomically) over it, so no file is ever overwritten,
even by two runs writing into one folder. Every PNG carries a ``parameters`` text chunk in AUTOMATIC1111's format
(readable by its "PNG Info" tab and by image sites) and an ``sdtune`` chunk with the full settings as JSON.

**Hypernetworks.** ``--hypernetwork FILE`` (an AUTOMATIC1111/NovelAI ``.pt``, see
:mod:`sdtune.models.hypernetwork`) changes every attention's keys and values, scaled by
``--hypernetwork_multiplier``; at 0 the images are the base model's.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import re
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from sdtune import __version__
from sdtune.atomic import atomic_path
from sdtune.devices import HALF_ON_CPU_HELP, half_precision_on_cpu_warning, resolve_device, same_device
from sdtune.errors import SdtuneError
from sdtune.models.sd import place
from sdtune.models.text import ALLOWED_TOKEN_LENGTHS, encode_prompts
from sdtune.option_groups import ModelSource
from sdtune.options import opt

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from sdtune.models.families import Family
    from sdtune.models.hypernetwork import Hypernetwork
    from sdtune.models.sd import StableDiffusion

logger = logging.getLogger(__name__)

METADATA_VERSION = 1
MAX_SEED = 2**63 - 1


# ------------------------------------------------------------------------------------------------ samplers
@dataclass(frozen=True)
class Sampler:
    name: str  # sdtune's name (--sampler)
    scheduler: str  # diffusers class
    a1111_name: str  # what AUTOMATIC1111 writes in "Sampler:", so its PNG Info and image sites recognise it
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the family's scheduler config


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", "DDIMScheduler", "DDIM"),
    # SD's own PNDM config skips the Runge-Kutta warm-up steps; so do diffusers' SD pipelines.
    Sampler("pndm", "PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    Sampler("lms", "LMSDiscreteScheduler", "LMS"),  # sdtune.lms: diffusers' LMS with SciPy-free coefficients
    Sampler("euler", "EulerDiscreteScheduler", "Euler"),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
    Sampler("heun", "HeunDiscreteScheduler", "Heun"),
    Sampler("dpm_2", "KDPM2DiscreteScheduler", "DPM2"),
    Sampler("dpm_2_a", "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    Sampler("dpm++", "DPMSolverMultistepScheduler", "DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler("dpm++_karras", "DPMSolverMultistepScheduler", "DPM++ 2M Karras",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    Sampler("unipc", "UniPCMultistepScheduler", "UniPC"),
)}
# sd-scripts' (gen_img_diffusers.py, --sample_sampler) and common spellings.
SAMPLER_ALIASES: dict[str, str] = {
    "plms": "pndm", "k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "euler_ancestral": "euler_a",
    "k_heun": "heun", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a", "dpmsolver++": "dpm++", "dpmpp_2m": "dpm++",
    "dpm++_2m": "dpm++", "dpmpp_2m_karras": "dpm++_karras", "dpm++_2m_karras": "dpm++_karras",
}
SAMPLER_CHOICES: tuple[str, ...] = (*SAMPLERS, *SAMPLER_ALIASES)


def get_sampler(name: str) -> Sampler:
    key = name.strip().lower()
    key = SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise SdtuneError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[key]


def make_scheduler(sampler: str | Sampler, family: Family) -> SchedulerMixin:
    """A fresh scheduler of ``sampler`` for ``family``: SD's training schedule and the family's prediction type
    (epsilon or v_prediction), so SD 2.x 768-v models are sampled as what they are."""
    import diffusers

    spec = sampler if isinstance(sampler, Sampler) else get_sampler(sampler)
    if spec.scheduler == "LMSDiscreteScheduler":
        from sdtune.lms import LMSScheduler as cls
    else:
        cls = getattr(diffusers, spec.scheduler)
    config = {k: v for k, v in family.scheduler_config().items() if k != "_class_name"}
    return cls.from_config({**config, **spec.config})


# ------------------------------------------------------------------------------------------------ prompts
class PromptFileError(SdtuneError):
    """A prompt file that cannot be read, or a line with a bad inline option."""


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the settings it overrides (None: the run's setting)."""

    prompt: str
    negative_prompt: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    seed: Optional[int] = None
    scale: Optional[float] = None
    steps: Optional[int] = None


# Inline options of a prompt-file line, as sd-scripts' sample prompts spell them.
_INLINE = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "steps"}
_INLINE_HELP = "--n NEGATIVE PROMPT, --w WIDTH, --h HEIGHT, --d SEED, --l CFG SCALE, --s STEPS"
_INLINE_SPLIT = re.compile(r"(?:^|\s)--(?=\S)")


def check_size(width: int, height: int, where: str) -> None:
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise SdtuneError(f"{where}: image size {width}x{height} must be multiples of 8 (the VAE works on 8x8 "
                          f"pixel blocks); use e.g. {max(8, round(width / 8) * 8)}x{max(8, round(height / 8) * 8)}")


def parse_prompt_line(line: str, where: str = "prompt") -> PromptSpec:
    """``a cat --n low quality --w 512 --h 512 --d 42 --l 7.5 --s 28`` -> PromptSpec.

    ``where`` (e.g. ``prompts.txt:3``) names the line in errors. Raises :class:`PromptFileError`.
    """
    prompt, *parts = _INLINE_SPLIT.split(line.strip())
    values: dict[str, Any] = {}
    for part in parts:
        key, _, value = part.strip().partition(" ")
        key, value = key.lower(), value.strip()
        if key not in _INLINE:
            raise PromptFileError(f"{where}: unknown option --{key}; a prompt line may carry {_INLINE_HELP}")
        name = _INLINE[key]
        if name == "negative_prompt":
            values[name] = value
            continue
        try:
            number: float = float(value) if name == "scale" else int(value)
        except ValueError:
            raise PromptFileError(f"{where}: --{key} needs a {'number' if name == 'scale' else 'whole number'}, "
                                  f"not {value!r}") from None
        if name == "steps" and number < 1:
            raise PromptFileError(f"{where}: --s (steps) must be at least 1, not {value}")
        if name == "seed" and not 0 <= number <= MAX_SEED:
            raise PromptFileError(f"{where}: --d (seed) must be between 0 and {MAX_SEED}, not {value}")
        values[name] = number
    if "width" in values or "height" in values:
        width, height = values.get("width", 8), values.get("height", 8)
        try:
            check_size(width, height, where)
        except SdtuneError as exc:
            raise PromptFileError(str(exc)) from None
    prompt = prompt.strip()
    if not prompt:
        raise PromptFileError(f"{where}: the line has options but no prompt before them")
    return PromptSpec(prompt, **values)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """The prompts of a text file, one a line; blank lines and lines starting with ``#`` are skipped. A line may
    carry inline options (see :func:`parse_prompt_line`)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: prompt file does not exist") from None
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    # line ends as sd-scripts' readlines() sees them (\n, \r\n, \r); str.splitlines would also cut a prompt at
    # U+2028, U+0085, form feed or vertical tab
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    specs = [parse_prompt_line(line, f"{path}:{number}") for number, line in enumerate(lines, 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise PromptFileError(f"{path}: holds no prompts (only blank or # lines); write one prompt a line")
    return specs


# ------------------------------------------------------------------------------------------------ settings
def _a1111_quote(value: Any) -> str:
    """AUTOMATIC1111 quotes a value holding a comma, colon or newline as a JSON string (its ``quote()``)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


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

    def batch_key(self) -> tuple[int, int, int, float]:
        """Images with equal keys can share a batch (one scheduler run, one latent size)."""
        return self.width, self.height, self.steps, self.scale

    def parameters_text(self) -> str:
        """The ``parameters`` chunk in AUTOMATIC1111's infotext format."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        fields: dict[str, Any] = {
            "Steps": self.steps, "Sampler": get_sampler(self.sampler).a1111_name, "CFG scale": self.scale,
            "Seed": self.seed, "Size": f"{self.width}x{self.height}",
        }
        if self.model:
            fields["Model"] = self.model
        if self.hypernetwork:  # the names A1111 wrote before it moved hypernetworks into the prompt
            fields["Hypernet"] = self.hypernetwork
            fields["Hypernet strength"] = self.hypernetwork_multiplier
        fields["Clip skip"] = self.clip_skip
        lines.append(", ".join(f"{key}: {_a1111_quote(value)}" for key, value in fields.items()))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"version": METADATA_VERSION, "sdtune_version": __version__, **asdict(self)}


@dataclass
class GeneratedImage:
    image: Image.Image
    settings: ImageSettings


def random_seed() -> int:
    return secrets.randbelow(2**32)


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
) -> list[ImageSettings]:
    """The settings of every image of a run, in order (see the module docstring for the seed rule)."""
    sampler = get_sampler(sampler).name
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
                hypernetwork_multiplier=hypernetwork_multiplier,
            ))
    return out


# ------------------------------------------------------------------------------------------------ sampling
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
    texts = [s.prompt for s in batch] + ([s.negative_prompt for s in batch] if guided else [])
    states = encode_prompts(model.tokenizer, model.text_encoder, texts, first.max_token_length, first.clip_skip)
    states = states.to(device, unet_dtype)
    if guided:  # [negative, prompt] so the chunk order below reads as the formula
        states = torch.cat([states[len(batch):], states[:len(batch)]])

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

    for s, ok in zip(batch, torch.isfinite(latents).flatten(1).all(1).tolist()):
        if not ok:
            logger.warning("image with seed %d of %r has NaN/inf values (an fp16 overflow or a diverged model); "
                           "try --dtype float", s.seed, s.prompt[:60])
    scaled = latents / float(vae.config.scaling_factor)
    pixels = vae.decode(scaled.to(_module_device(vae), _module_dtype(vae))).sample.float()
    pixels = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


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
    with _hypernetwork_applied(model, hypernetwork, hypernetwork_multiplier):
        return list(iter_images(model, settings, batch_size=batch_size, progress=progress))


def _hypernetwork_applied(model: StableDiffusion, hypernetwork: Hypernetwork | None,
                          multiplier: float) -> contextlib.AbstractContextManager[Any]:
    if hypernetwork is None:
        return contextlib.nullcontext()
    return hypernetwork.applied(model.unet, multiplier)


# ------------------------------------------------------------------------------------------------ files
def png_info(settings: ImageSettings, extra: dict[str, Any] | None = None) -> PngInfo:
    info = PngInfo()
    info.add_text("parameters", settings.parameters_text())  # PIL switches to iTXt for non-Latin-1 text
    info.add_text("sdtune", json.dumps({**settings.to_json(), **(extra or {})}, ensure_ascii=False))
    return info


def save_png(image: Image.Image, path: str | Path, settings: ImageSettings,
             extra: dict[str, Any] | None = None) -> Path:
    """Write ``image`` to ``path`` atomically, with the ``parameters`` and ``sdtune`` text chunks.

    ``extra`` adds keys to the ``sdtune`` JSON (training adds ``step`` and ``epoch``).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(settings, extra))
    return path


def read_png_settings(path: str | Path) -> dict[str, Any]:
    """The ``sdtune`` JSON of a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("sdtune")
    if text is None:
        raise SdtuneError(f"{path}: has no sdtune metadata (not written by sdtune generate)")
    return json.loads(text)


_NUMBERED = re.compile(r"^(\d+)-")


class NumberedWriter:
    """Saves images as ``<outdir>/<number:05d>-<seed>.png``, numbers continuing after the folder's highest."""

    def __init__(self, outdir: str | Path) -> None:
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in self.outdir.iterdir() if (m := _NUMBERED.match(p.name))]
        self.next_number = max(numbers, default=-1) + 1

    def _claim(self, seed: int) -> Path:
        while True:
            path = self.outdir / f"{self.next_number:05d}-{seed}.png"
            self.next_number += 1
            try:
                with open(path, "xb"):  # exclusive create: fails if the name exists, on every OS
                    return path
            except FileExistsError:
                continue

    def save(self, generated: GeneratedImage) -> Path:
        path = self._claim(generated.settings.seed)
        try:
            return save_png(generated.image, path, generated.settings)
        except BaseException:
            path.unlink(missing_ok=True)  # release the claimed (still empty) name
            raise


# ------------------------------------------------------------------------------------------------ command
DTYPES = {"float": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class GenerateOptions(ModelSource):
    pretrained_model_name_or_path: str = opt(
        None, "model: diffusers folder, .safetensors or .ckpt (anything sdtune train / convert writes)",
        aliases=("--ckpt",))
    prompt: Optional[str] = opt(None, "the prompt")
    from_file: Optional[Path] = opt(None, "text file of prompts, one a line (blank and # lines skipped); a line may "
                                    "carry " + _INLINE_HELP)
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



def model_display_name(source: str | Path) -> str:
    path = Path(source)
    return path.stem if path.is_file() else path.name or str(source)


def read_prompts(opts: GenerateOptions) -> list[PromptSpec]:
    if (opts.prompt is None) == (opts.from_file is None):
        raise SdtuneError("give either --prompt TEXT or --from_file FILE (one prompt a line)")
    if opts.prompt is not None:
        if not opts.prompt.strip():
            raise SdtuneError("--prompt is empty")
        return [PromptSpec(opts.prompt)]
    return read_prompt_file(opts.from_file)  # type: ignore[arg-type]


def generate(opts: GenerateOptions) -> list[Path]:
    """The ``generate`` stage: validate, load, generate, save; returns the written files in order."""
    prompts = read_prompts(opts)  # every option and the prompt file are checked before the model loads
    device = resolve_device(opts.device)
    seed = opts.seed if opts.seed is not None else random_seed()
    plan_images(prompts, sampler=opts.sampler, steps=opts.steps, scale=opts.scale, width=opts.W or 8,
                height=opts.H or 8, seed=seed, images_per_prompt=opts.images_per_prompt,
                clip_skip=opts.clip_skip if opts.clip_skip is not None else 1, max_token_length=opts.max_token_length)
    if opts.batch_size < 1:
        raise SdtuneError(f"--batch_size must be at least 1, not {opts.batch_size}")
    hypernetwork = None
    if opts.hypernetwork is not None:
        from sdtune.models.hypernetwork import Hypernetwork, describe

        hypernetwork = Hypernetwork.load(opts.hypernetwork)  # small: a bad file fails before the model loads
        logger.info("%s: %s", opts.hypernetwork, describe(hypernetwork))
    dtype = DTYPES[opts.dtype]
    slow = half_precision_on_cpu_warning(device, "--dtype", opts.dtype, "--dtype float")
    if slow:
        logger.warning(slow)

    from sdtune.atomic import check_writable
    from sdtune.models.io import load_model, model_summary

    check_writable([("--outdir", Path(opts.outdir))])  # before the model loads, not after the first image
    model = load_model(opts.pretrained_model_name_or_path, v2=opts.v2, v_parameterization=opts.v_parameterization,
                       vae=opts.vae, tokenizer=opts.tokenizer, dtype=dtype)
    place(model.vae, dtype=torch.float32)  # SD's VAE overflows in fp16 (black or NaN images); float32 costs little memory
    logger.info("loaded %s: %s", opts.pretrained_model_name_or_path, model_summary(model))
    move_model(model, device)
    if hypernetwork is not None:
        hypernetwork.check_model(model.unet, opts.hypernetwork)  # type: ignore[arg-type]
        hypernetwork.to(device).eval()  # float32, as in A1111: the hooks cast the context to it and back
    family = model.family
    width, height = opts.W or family.resolution, opts.H or family.resolution
    clip_skip = opts.clip_skip if opts.clip_skip is not None else family.default_clip_skip
    plan = plan_images(prompts, sampler=opts.sampler, steps=opts.steps, scale=opts.scale, width=width, height=height,
                       seed=seed, negative_prompt=opts.negative_prompt, images_per_prompt=opts.images_per_prompt,
                       clip_skip=clip_skip, max_token_length=opts.max_token_length,
                       model_name=model_display_name(opts.pretrained_model_name_or_path), family=family.name,
                       prediction_type=family.prediction_type,
                       hypernetwork=hypernetwork.name if hypernetwork is not None else "",
                       hypernetwork_multiplier=opts.hypernetwork_multiplier)
    logger.info("%d image(s) of %d prompt(s); sampler %s, %d steps, CFG scale %g, seeds from %d; %s, clip skip %d, "
                "max tokens %d", len(plan), len(prompts), plan[0].sampler, opts.steps, opts.scale, seed,
                family.prediction_type, clip_skip, opts.max_token_length)
    writer = NumberedWriter(opts.outdir)
    with _hypernetwork_applied(model, hypernetwork, opts.hypernetwork_multiplier):
        paths = [writer.save(g) for g in iter_images(model, plan, batch_size=opts.batch_size)]
    logger.info("wrote %d image(s) to %s (%s ... %s)", len(paths), opts.outdir, paths[0].name, paths[-1].name)
    return paths


def generate_command(opts: GenerateOptions) -> int:
    generate(opts)
    return 0


__all__ = [
    "GenerateOptions", "GeneratedImage", "ImageSettings", "NumberedWriter", "PromptFileError", "PromptSpec",
    "SAMPLERS", "generate", "generate_command", "generate_images", "get_sampler", "iter_images", "make_scheduler",
    "move_model", "parse_prompt_line", "plan_images", "read_png_settings", "read_prompt_file", "sample_batch",
    "save_png",
]
