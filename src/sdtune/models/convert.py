"""``sdtune convert SRC DST``: move a model between .ckpt, .safetensors and diffusers formats."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sdtune.errors import SdtuneError
from sdtune.models.io import SAVE_FORMATS, load_model, model_summary, save_model
from sdtune.options import opt

logger = logging.getLogger(__name__)


@dataclass
class ConvertOptions:
    src: str = opt(help="model to read: diffusers folder, .safetensors/.ckpt file or hub repo id", positional=True)
    dst: Path = opt(help="where to write (a file for ckpt/safetensors, a folder for diffusers)", positional=True)
    save_model_as: Optional[str] = opt(None, "output format; default: from DST's suffix (.ckpt, .safetensors, "
                                       "else a diffusers folder with .safetensors weights)", choices=SAVE_FORMATS)
    save_precision: str = opt("float", "precision of the written weights", choices=("float", "fp16", "bf16"))
    v2: Optional[bool] = opt(None, "the source is SD 2.x (normally detected from the weights)")
    v_parameterization: Optional[bool] = opt(None, "the source predicts velocity (SD 2.x 768-v); overrides detection")
    vae: Optional[str] = opt(None, "replace the VAE with this one (diffusers folder or single file)")
    tokenizer: Optional[str] = opt(None, "CLIP tokenizer folder for single files (default: the packaged vocabulary)")
    epoch: int = opt(0, "epoch to record in a .ckpt / metadata")
    global_step: int = opt(0, "step to record in a .ckpt / metadata")
    title: Optional[str] = opt(None, "the model spec's modelspec.title to record (default: DST's file name)")


def infer_format(dst: Path) -> str:
    suffix = dst.suffix.lower()
    if suffix == ".ckpt":
        return "ckpt"
    if suffix == ".safetensors":
        return "safetensors"
    return "diffusers_safetensors"


def convert_command(opts: ConvertOptions) -> int:
    fmt = opts.save_model_as or infer_format(Path(opts.dst))
    if Path(opts.dst).resolve() == Path(opts.src).resolve():
        raise SdtuneError(f"{opts.dst}: the destination is the source; choose another path")
    model = load_model(opts.src, v2=opts.v2, v_parameterization=opts.v_parameterization, vae=opts.vae,
                       tokenizer=opts.tokenizer)
    logger.info("loaded %s: %s", opts.src, model_summary(model))
    save_model(model, opts.dst, fmt, opts.save_precision, epoch=opts.epoch, global_step=opts.global_step,
               title=opts.title)
    logger.info("wrote %s (%s, %s)", opts.dst, fmt, opts.save_precision)
    return 0
