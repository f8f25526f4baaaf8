"""``sdtune caption``: one BLIP caption per image, written to ``<image stem>.caption`` next to the image.

Replaces sd-scripts' ``finetune/make_captions.py``. The model is any BLIP captioning model in the Hugging Face
layout (``BlipForConditionalGeneration`` + a BERT tokenizer + ``preprocessor_config.json``), by repo id or local
folder; the default is ``Salesforce/blip-image-captioning-large``, the model sd-scripts' ``model_large_caption.pth``
was converted from.

Decoding follows the original BLIP ``generate`` (salesforce/BLIP models/blip.py, ``BLIP_Decoder.generate``), which
sd-scripts' make_captions.py calls: the decoder starts from BLIP's prompt "a picture of " (its first token replaced
by the [DEC] bos token, the closing [SEP] dropped) -- the captioning weights were fine-tuned with that prefix -- and
the prompt is cut from the decoded text. Nucleus sampling (``top_p`` 0.9, transformers' ``top_k`` 50, which BLIP
leaves at its default, repetition penalty 1.1) by default, or beam search (repetition penalty 1.0) with
``--beam_search``. ``--max_length``/``--min_length`` count the prompt's tokens too, as in BLIP and sd-scripts.
Sampling is reproducible: each batch draws from its own generator state derived from ``--seed`` and the batch's
index, so the same images, batch size, seed and device give the same captions.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sdtune.atomic import write_text_atomic
from sdtune.data.images import open_image
from sdtune.devices import resolve_device
from sdtune.label.common import (
    LabelError,
    LabelReport,
    Stopwatch,
    WorkItem,
    hub_offline,
    iter_batches,
    normalize_extension,
    plan_work,
    resolve_workers,
)
from sdtune.option_groups import ImageFolder, LoaderWorkers
from sdtune.options import opt
from sdtune.seeds import derived_seed

logger = logging.getLogger(__name__)

DEFAULT_BLIP_MODEL = "Salesforce/blip-image-captioning-large"
# BLIP's own settings (salesforce/BLIP models/blip.py, BLIP_Decoder: prompt='a picture of '; generate: sampling
# with repetition_penalty=1.1 and no top_k, so transformers' default 50 applies).
BLIP_PROMPT = "a picture of "
SAMPLING_REPETITION_PENALTY = 1.1
SAMPLING_TOP_K = 50
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CaptionOptions(ImageFolder, LoaderWorkers):
    """``caption``: BLIP writes a caption file beside each image of TRAIN_DIR."""

    model: str = opt(DEFAULT_BLIP_MODEL, "BLIP captioning model: a Hugging Face repo id or a local folder in the "
                     "same layout (config.json, model weights, tokenizer files, preprocessor_config.json)")
    caption_extension: str = opt(".caption", "extension of the caption files written next to the images",
                                 aliases=("--caption_extention",))
    batch_size: int = opt(1, "images per model call")
    beam_search: bool = opt(False, "beam search instead of nucleus sampling (deterministic)")
    num_beams: int = opt(1, "beams for --beam_search (1 is greedy decoding)")
    top_p: float = opt(0.9, "nucleus sampling: keep the smallest set of tokens whose probability reaches top_p")
    max_length: int = opt(75, "longest caption, in tokens (counting BLIP's 4-token prompt, as BLIP and sd-scripts do)")
    min_length: int = opt(5, "shortest caption, in tokens (counting the prompt)")
    seed: int | None = opt(42, "seed for sampling; the same seed, images, batch size and device repeat the captions")
    overwrite: bool = opt(False, "caption images that already have a caption file, replacing it (without it they are skipped)")
    device: str | None = opt(None, "torch device, e.g. cuda, cuda:1, cpu; unset means cuda if available, else cpu")
    caption_weights: str | None = opt(
        None, "sd-scripts' option (BLIP's original model_large_caption.pth): sdtune runs BLIP through transformers "
        "and cannot read that file; a folder in transformers' layout is taken as --model, anything else is refused "
        "with the fix")


def _validate(options: CaptionOptions) -> str:
    """Check every option before a model is loaded; returns the normalized caption extension."""
    if options.batch_size < 1:
        raise LabelError(f"--batch_size must be at least 1, got {options.batch_size}")
    if options.num_beams < 1:
        raise LabelError(f"--num_beams must be at least 1, got {options.num_beams}")
    if not 0.0 < options.top_p <= 1.0:
        raise LabelError(f"--top_p must be in (0, 1], got {options.top_p}")
    if options.min_length < 0 or options.max_length < 1:
        raise LabelError("--min_length must be 0 or more and --max_length at least 1")
    if options.min_length > options.max_length:
        raise LabelError(f"--min_length {options.min_length} is longer than --max_length {options.max_length}")
    if options.caption_weights is not None:
        _check_caption_weights(options)
    resolve_workers(options.max_data_loader_n_workers)
    return normalize_extension(options.caption_extension, "--caption_extension")


def _check_caption_weights(options: CaptionOptions) -> None:
    """sd-scripts' --caption_weights names the .pth of Salesforce's BLIP repository; sdtune uses transformers' BLIP,
    whose weights are laid out differently. A transformers folder is used as --model; anything else is refused."""
    weights = Path(options.caption_weights)  # type: ignore[arg-type]
    if weights.is_dir() and (weights / "config.json").is_file():
        if options.model != DEFAULT_BLIP_MODEL and Path(options.model) != weights:
            raise LabelError(f"--caption_weights {weights} and --model {options.model} name two models; give one")
        options.model = str(weights)
        return
    raise LabelError(
        f"--caption_weights {options.caption_weights}: sdtune cannot read BLIP's original .pth weights (sd-scripts' "
        "make_captions.py format); it runs BLIP through transformers. Drop --caption_weights to use "
        f"{DEFAULT_BLIP_MODEL} (the same large captioning model), or pass --model with a Hugging Face repo id or a "
        "folder holding config.json and the weights")


def _image_processor_class() -> Any:
    """BLIP's image processor that needs only PIL and numpy.

    transformers 5 defaults to a torchvision-backed processor and names the PIL one ``BlipImageProcessorPil``;
    in transformers 4 ``BlipImageProcessor`` is the PIL/numpy one. torchvision is not a dependency of sdtune.
    """
    try:
        from transformers import BlipImageProcessorPil as processor_class
    except ImportError:  # transformers 4.x
        from transformers import BlipImageProcessor as processor_class
    return processor_class


@dataclass
class BlipModel:
    """What ``load_blip`` returns: the captioning model (in eval mode, on ``device``), its tokenizer and image
    processor."""

    model: Any
    tokenizer: Any
    image_processor: Any
    device: Any


def load_blip(name: str, device: Any) -> BlipModel:
    """Load a BLIP captioning model, tokenizer and image processor from a local folder or the hub.

    Raises ``LabelError`` with the fix when the folder does not exist, the hub cannot be reached (or is switched
    off) and the model is not cached, or the files are not a readable BLIP captioning model.
    """
    from transformers import AutoConfig, AutoTokenizer, BlipForConditionalGeneration

    local = Path(name).expanduser()
    layout = (f"as on https://huggingface.co/{DEFAULT_BLIP_MODEL} (config.json, model.safetensors, "
              "preprocessor_config.json and the tokenizer files)")
    if local.is_dir():
        from_hub, source, where = False, str(local), f"folder {local}"
        if not (local / "config.json").is_file():
            raise LabelError(f"--model folder {local} has no config.json; it should hold a BLIP captioning model "
                             f"{layout}")
    elif _REPO_ID.match(name) and not local.exists():
        from_hub, source, where = True, name, f"https://huggingface.co/{name}"
    else:
        raise LabelError(f"--model {name}: no such folder, and not a Hugging Face repo id (owner/name)")
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as exc:
        # transformers raises OSError for every "cannot find/fetch the files" case; say what to do instead.
        if from_hub:
            offline = " and the Hugging Face hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else ""
            raise LabelError(
                f"cannot load BLIP model {name}{offline}: {exc}\nDownload the model folder from {where} "
                "(config.json, model.safetensors, preprocessor_config.json and the tokenizer files) and pass it "
                "with --model FOLDER, or connect to the hub once to cache it"
            ) from exc
        raise LabelError(f"cannot read the config of the BLIP model in {where}: {exc}") from exc
    except ValueError as exc:  # unknown or malformed model_type
        raise LabelError(f"{where} is not a BLIP captioning model ({exc})") from exc
    if config.model_type != "blip":
        # Loading another architecture into BLIP would "work" with random weights and write nonsense captions.
        raise LabelError(f"{where} holds a {config.model_type!r} model, not BLIP; pass a BLIP captioning model "
                         f"{layout}")
    try:
        model = BlipForConditionalGeneration.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = _image_processor_class().from_pretrained(source)
    except Exception as exc:  # OSError, ValueError, safetensors' SafetensorError...: all mean unusable files
        hint = " (a damaged download? delete it from the Hugging Face cache to fetch it again)" if from_hub else ""
        raise LabelError(f"cannot load the BLIP model in {where}{hint}: {type(exc).__name__}: {exc}") from exc
    return BlipModel(model=model.to(device).eval(), tokenizer=tokenizer, image_processor=image_processor,
                     device=device)


def _forked_rng(device: Any) -> Any:
    """A context restoring the CPU generator (and ``device``'s) afterwards: seeding for one batch must not change
    anyone else's randomness."""
    import torch

    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    # torch.device("cuda") means the current GPU, which is where .to(device) put the model.
    index = device.index if device.index is not None else getattr(torch, device.type).current_device()
    return torch.random.fork_rng(devices=[index], device_type=device.type)


def _generate_kwargs(options: CaptionOptions) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"max_length": options.max_length, "min_length": options.min_length}
    if options.beam_search:
        kwargs.update(do_sample=False, num_beams=options.num_beams, repetition_penalty=1.0)
    else:
        # BLIP passes no top_k: transformers' default 50 applied. Given explicitly, so that a model folder's
        # generation_config.json cannot change it.
        kwargs.update(do_sample=True, num_beams=1, top_p=options.top_p, top_k=SAMPLING_TOP_K,
                      repetition_penalty=SAMPLING_REPETITION_PENALTY)
    return kwargs


def caption_batch(blip: BlipModel, pixel_values: np.ndarray, options: CaptionOptions, batch_index: int) -> list[str]:
    """Captions for a batch of preprocessed images (N, 3, H, W)."""
    import torch

    pixels = torch.from_numpy(pixel_values).to(blip.device, dtype=blip.model.dtype)
    # transformers' BlipForConditionalGeneration.generate does BLIP's prompt handling: it sets the first token
    # ([CLS]) to the bos token and drops the last ([SEP]).
    prompt = blip.tokenizer([BLIP_PROMPT] * len(pixel_values), return_tensors="pt")
    kwargs = dict(_generate_kwargs(options), pixel_values=pixels, input_ids=prompt.input_ids.to(blip.device),
                  attention_mask=prompt.attention_mask.to(blip.device))
    with torch.inference_mode():
        if options.beam_search or options.seed is None:
            ids = blip.model.generate(**kwargs)
        else:
            with _forked_rng(blip.device):
                torch.manual_seed(derived_seed(options.seed, batch_index, bits=64))
                ids = blip.model.generate(**kwargs)
        ids = ids.cpu()
    return [strip_prompt(text) for text in blip.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def strip_prompt(decoded: str) -> str:
    """The caption without BLIP's prompt, as BLIP cuts it (``caption[len(self.prompt):]``)."""
    if not decoded.startswith(BLIP_PROMPT.strip()):
        raise LabelError(f"the BLIP model's output {decoded!r} does not start with its prompt {BLIP_PROMPT!r}; is "
                         "--model a BLIP captioning model?")
    return decoded[len(BLIP_PROMPT):].strip()


def run_captioning(options: CaptionOptions) -> LabelReport:
    """Caption every image in ``options.train_data_dir`` that needs it; the report lists done/skipped/failed."""
    extension = _validate(options)
    workers = resolve_workers(options.max_data_loader_n_workers)
    report = LabelReport()
    items = plan_work(Path(options.train_data_dir), options.recursive, extension, options.overwrite, report)
    if not items:
        logger.info("every image already has a %s file; nothing to caption (--overwrite captions them again)",
                    extension)
        return report

    device = resolve_device(options.device)
    started = time.perf_counter()
    logger.info("loading BLIP model %s on %s", options.model, device)
    blip = load_blip(options.model, device)
    report.load_seconds = time.perf_counter() - started

    def load(item: WorkItem) -> np.ndarray:
        image = open_image(item.image)
        return blip.image_processor(images=image, return_tensors="np")["pixel_values"][0]

    model_time = Stopwatch()
    started = time.perf_counter()
    with logging_redirect_tqdm(), tqdm(total=len(items), unit="img", desc="caption") as progress:
        for index, batch in enumerate(iter_batches(items, load, options.batch_size, workers)):
            for item, error in batch.failed:
                logger.warning("skipping %s", error)
                report.failed.append((item.image, error.reason))
            if batch.items:
                with model_time:
                    captions = caption_batch(blip, np.stack(batch.data), options, index)
                for item, caption in zip(batch.items, captions):
                    _write_caption(item, caption, report)
            progress.update(len(batch.items) + len(batch.failed))
    report.model_seconds = model_time.seconds
    report.wall_seconds = time.perf_counter() - started
    return report


def _write_caption(item: WorkItem, caption: str, report: LabelReport) -> None:
    logger.debug("%s: %s", item.image.name, caption)
    try:
        write_text_atomic(item.sidecar, caption + "\n")
    except OSError as exc:
        logger.warning("cannot write %s: %s", item.sidecar, exc)
        report.failed.append((item.image, f"cannot write {item.sidecar.name}: {exc.strerror or exc}"))
        return
    report.done.append(item.image)


def caption_images(options: CaptionOptions) -> int:
    """``sdtune caption``: returns 1 when any image failed (after captioning all the others), else 0."""
    report = run_captioning(options)
    report.log_summary(logger, "captioned", "a caption file exists; --overwrite captions them again")
    return report.exit_code
