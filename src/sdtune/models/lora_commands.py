"""``sdtune merge-lora`` and ``sdtune extract-lora``: sd-scripts' ``networks/merge_lora.py`` (into a checkpoint) and
``networks/extract_lora_from_models.py``, with their option names. Heavy imports happen inside the commands, so
``--help`` needs no torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdtune.errors import SdtuneError
from sdtune.models.choices import SAVE_FORMATS
from sdtune.option_groups import ModelSource
from sdtune.options import opt

logger = logging.getLogger(__name__)

PRECISION_CHOICES = ("float", "fp16", "bf16")


@dataclass
class MergeLoraOptions(ModelSource):
    """``merge-lora``: LoRA files, each with its weight, folded into --sd_model and written to --save_to."""

    sd_model: str = opt(None, "the model to merge into: diffusers folder, .safetensors/.ckpt file or hub repo id")
    models: list[str] = opt(help="LoRA files to merge (sd-scripts' LoRA/LoCon; LyCORIS LoHa/LoKr/... with pip "
                            "install lycoris-lora); FILE:WEIGHT gives one its weight (instead of --ratios)",
                            default_factory=list)
    ratios: list[float] = opt(help="one weight per LoRA of --models (default 1.0 each)", default_factory=list)
    save_to: Path = opt(None, "where to write the merged model (a file for ckpt/safetensors, a folder for diffusers)")
    save_model_as: Optional[str] = opt(None, "output format; default: from --save_to's suffix (.ckpt, .safetensors, "
                                       "else a diffusers folder)", choices=SAVE_FORMATS)
    precision: str = opt("float", "precision the weights are merged in", choices=PRECISION_CHOICES)
    save_precision: Optional[str] = opt(None, "precision of the written weights (default: --precision)",
                                        choices=PRECISION_CHOICES)
    title: Optional[str] = opt(None, "the model spec's modelspec.title (default: --save_to's file name)")


@dataclass
class ExtractLoraOptions(ModelSource):
    """``extract-lora``: a LoRA of the difference --model_org -> --model_tuned (SVD), written to --save_to."""

    model_org: str = opt(None, "the original model (diffusers folder, .safetensors/.ckpt file or hub repo id)")
    model_tuned: str = opt(None, "the fine-tuned model; the LoRA is the difference original -> tuned")
    save_to: Path = opt(None, "the LoRA file to write (.safetensors, else a torch pickle)")
    dim: int = opt(4, "rank of the LoRA's linear and 1x1 layers")
    conv_dim: Optional[int] = opt(None, "rank of the 3x3 convolutions (LoCon); default: they are left out")
    clamp_quantile: float = opt(0.99, "clamp the up/down values to this quantile of their magnitudes (1: no "
                                "clamping)")
    min_diff: float = opt(0.01, "text encoders whose weights differ by at most this are taken as the same and "
                          "left out")
    save_precision: Optional[str] = opt(None, "precision of the written LoRA (default: float)",
                                        choices=PRECISION_CHOICES)
    device: Optional[str] = opt(None, "device for the SVDs, e.g. cuda (default: cpu)")
    no_metadata: bool = opt(False, "write only sd-scripts' minimum ss_* metadata, no model spec")


def parse_lora_list(models: list[str], ratios: list[float]) -> list[tuple[str, float]]:
    """(path, weight) pairs from ``--models`` (``FILE`` or ``FILE:WEIGHT``) and ``--ratios``."""
    pairs: list[tuple[str, float | None]] = []
    for item in models:
        path, sep, tail = item.rpartition(":")
        weight: float | None = None
        if sep and path and not Path(item).exists():
            try:
                weight = float(tail)
            except ValueError:
                path = item
        else:
            path = item
        pairs.append((path, weight))
    if ratios and len(ratios) != len(pairs):
        raise SdtuneError(f"--ratios gives {len(ratios)} weight(s) for {len(pairs)} LoRA file(s); give one per file")
    if ratios and any(w is not None for _, w in pairs):
        raise SdtuneError("give the weights either as FILE:WEIGHT or with --ratios, not both")
    return [(p, ratios[i] if ratios else (1.0 if w is None else w)) for i, (p, w) in enumerate(pairs)]


def _read_merge_file(path: str) -> tuple[dict, bool]:
    """A ``--models`` file's tensors, and whether it is a LyCORIS file (else it must be a LoRA file)."""
    from sdtune.models.files import read_state_dict
    from sdtune.models.lora import read_lora
    from sdtune.models.lycoris import is_lycoris_state_dict

    sd, metadata = read_state_dict(path)
    if is_lycoris_state_dict(sd, metadata):
        return sd, True
    return read_lora(path)[0], False


def merge_lora_command(opts: MergeLoraOptions) -> int:
    """``sdtune merge-lora``: check every LoRA file, load the model, merge the files in order and save; returns 0."""
    from sdtune.models.convert import infer_format
    from sdtune.models.io import load_model
    from sdtune.models.lora import merge_lora_into
    from sdtune.models.lycoris import LycorisFileNetwork
    from sdtune.models.save import PRECISIONS, save_model

    loras = parse_lora_list(list(opts.models), list(opts.ratios))
    if not loras:
        raise SdtuneError("no LoRA to merge: give --models FILE [FILE ...]")
    save_to = Path(opts.save_to)
    if Path(opts.sd_model).exists() and save_to.resolve() == Path(opts.sd_model).resolve():
        raise SdtuneError(f"{save_to}: --save_to is --sd_model; choose another path")
    files = [(_read_merge_file(path), path, weight) for path, weight in loras]  # all read before the model loads
    model = load_model(opts.sd_model, v2=opts.v2, v_parameterization=opts.v_parameterization, vae=opts.vae,
                       tokenizer=opts.tokenizer, dtype=PRECISIONS[opts.precision])
    for (sd, lycoris), path, weight in files:
        if lycoris:  # LoHa/LoKr/...: merged by LyCORIS' own modules
            count = LycorisFileNetwork(model, sd, weight, Path(path), option="--models").merge()
        else:
            count = len(merge_lora_into(model, sd, weight))
        logger.info("merged %s (weight %g): %d modules", path, weight, count)
    fmt = opts.save_model_as or infer_format(save_to)
    save_model(model, save_to, fmt, opts.save_precision or opts.precision, title=opts.title)
    logger.info("wrote %s (%s)", save_to, fmt)
    return 0


def extract_lora_command(opts: ExtractLoraOptions) -> int:
    """``sdtune extract-lora``: load both models, extract the LoRA and write it with its metadata; returns 0."""
    from sdtune.models.io import load_model
    from sdtune.models.lora import network_metadata, save_lora_file
    from sdtune.models.lora_extract import extract_lora
    from sdtune.models.save import PRECISIONS

    kwargs = dict(v2=opts.v2, v_parameterization=opts.v_parameterization, tokenizer=opts.tokenizer)
    base = load_model(opts.model_org, **kwargs)
    tuned = load_model(opts.model_tuned, **kwargs)
    result = extract_lora(base, tuned, dim=opts.dim, conv_dim=opts.conv_dim, clamp_quantile=opts.clamp_quantile,
                          min_diff=opts.min_diff, device=opts.device)
    network_args = {} if opts.conv_dim is None else {"conv_dim": opts.conv_dim, "conv_alpha": float(opts.conv_dim)}
    save_to = Path(opts.save_to)
    metadata = network_metadata(base.family, opts.dim, float(opts.dim), network_args, title=save_to.stem)
    if opts.no_metadata:
        metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    save_lora_file(save_to, result.state_dict, metadata, PRECISIONS[opts.save_precision or "float"])
    for part, error in result.errors.items():
        logger.info("%s: relative error of the rank-%s approximation %.2f%%", part, opts.dim, 100 * error)
    logger.info("wrote %s (%d modules)", save_to, len(result.state_dict) // 3)
    return 0
