"""``sdtune convert SRC DST``: move a model between .ckpt, .safetensors and diffusers formats."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdtune.errors import SdtuneError
from sdtune.models.choices import SAVE_FORMATS
from sdtune.option_groups import ModelSource
from sdtune.options import opt

logger = logging.getLogger(__name__)


@dataclass
class ConvertOptions(ModelSource):
    """``convert``: SRC, in any format sdtune loads, written to DST in the format asked for."""

    src: str = opt(help="model to read: diffusers folder, .safetensors/.ckpt file or hub repo id", positional=True)
    dst: Path = opt(help="where to write (a file for ckpt/safetensors, a folder for diffusers)", positional=True)
    save_model_as: Optional[str] = opt(None, "output format; default: from DST's suffix (.ckpt, .safetensors, "
                                       "else a diffusers folder with .safetensors weights)", choices=SAVE_FORMATS)
    save_precision: str = opt("float", "precision of the written weights", choices=("float", "fp16", "bf16"))
    epoch: Optional[int] = opt(None, "epoch to record in a .ckpt / metadata (default: the one SRC records, else 0)")
    global_step: Optional[int] = opt(None, "step to record in a .ckpt / metadata (default: the one SRC records, "
                                     "else 0)")
    title: Optional[str] = opt(None, "the model spec's modelspec.title to record (default: DST's file name)")


def infer_format(dst: Path) -> str:
    """The ``--save_model_as`` format ``dst``'s suffix implies: .ckpt, .safetensors, else a diffusers folder."""
    suffix = dst.suffix.lower()
    if suffix == ".ckpt":
        return "ckpt"
    if suffix == ".safetensors":
        return "safetensors"
    return "diffusers_safetensors"


def _whole_number(value: object) -> int | None:
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.isdigit() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value == int(value):
        return int(value)
    return None


def recorded_progress(src: Path) -> dict[str, int]:
    """The epoch and step a single file records: a .safetensors' ``epoch`` / ``global_step`` metadata (sdtune's),
    a .ckpt's top-level ``epoch`` / ``global_step`` (LDM's, sd-scripts' and sdtune's layout). A diffusers folder
    records neither. Read after the model loaded, so the file is known to be readable."""
    import torch  # heavy imports only when the command runs: --help stays instant

    if not src.is_file():
        return {}
    if src.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(src), framework="pt", device="cpu") as f:
            found = dict(f.metadata() or {})
    else:
        try:  # memory-mapped: the tensors are not read a second time
            found = torch.load(str(src), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a legacy (pre-zip) .ckpt cannot be memory-mapped: read it again
            found = torch.load(str(src), map_location="cpu", weights_only=True)
        if not isinstance(found, dict):
            return {}
    values = {name: _whole_number(found.get(name)) for name in ("epoch", "global_step")}
    return {name: value for name, value in values.items() if value is not None}


def convert_command(opts: ConvertOptions) -> int:
    """``sdtune convert``: load SRC, keep the epoch and step it records unless told otherwise, write DST; returns 0."""
    from sdtune.models.io import load_model, model_summary  # heavy imports only when the command runs
    from sdtune.models.save import save_model

    fmt = opts.save_model_as or infer_format(Path(opts.dst))
    if Path(opts.dst).resolve() == Path(opts.src).resolve():
        raise SdtuneError(f"{opts.dst}: the destination is the source; choose another path")
    model = load_model(opts.src, v2=opts.v2, v_parameterization=opts.v_parameterization, vae=opts.vae,
                       tokenizer=opts.tokenizer)
    logger.info("loaded %s: %s", opts.src, model_summary(model))
    recorded = recorded_progress(Path(opts.src))
    epoch = opts.epoch if opts.epoch is not None else recorded.get("epoch", 0)
    global_step = opts.global_step if opts.global_step is not None else recorded.get("global_step", 0)
    if recorded:
        logger.info("%s records %s; kept unless --epoch / --global_step say otherwise", opts.src,
                    ", ".join(f"{k} {v}" for k, v in recorded.items()))
    save_model(model, opts.dst, fmt, opts.save_precision, epoch=epoch, global_step=global_step, title=opts.title)
    logger.info("wrote %s (%s, %s)", opts.dst, fmt, opts.save_precision)
    return 0
