"""The model a run starts from: loaded once for training, fingerprinted, and the clip skip it conditions with.

The fingerprint (of the U-Net, text encoder and VAE weights) goes into every training state, so ``--resume`` on a
different base model fails before a step trains on it. Attention, gradient checkpointing, channels-last and
torch.compile are set here, before the target wraps or freezes any module.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from sdtune.models.attention import set_attention
from sdtune.models.compile import compile_blocks, to_channels_last
from sdtune.models.families import Family
from sdtune.models.io import load_model, model_summary
from sdtune.train.options import TrainOptions, attention_kind
from sdtune.train.provenance import check_base_model, model_fingerprint

logger = logging.getLogger(__name__)


def load_base_model(opts: TrainOptions, accelerator: Any, provenance: Optional[dict[str, Any]]) -> tuple[Any, str]:
    """The base model (rank 0 first: it fills the download cache), with ``opts``' attention and gradient
    checkpointing; (model, fingerprint). With ``--resume``, a base model other than the state's fails here."""
    with accelerator.main_process_first():
        model = load_model(opts.pretrained_model_name_or_path, v2=opts.v2,
                           v_parameterization=opts.v_parameterization, vae=opts.vae, tokenizer=opts.tokenizer)
    if accelerator.is_main_process:
        logger.info("model: %s", model_summary(model))
    fingerprint = model_fingerprint({"unet": model.unet, "text_encoder": model.text_encoder, "vae": model.vae})
    if opts.resume:
        check_base_model(Path(opts.resume), provenance, opts.pretrained_model_name_or_path, fingerprint)
    set_attention(model.unet, attention_kind(opts))
    if opts.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        trains_te_lora = opts.network_module is not None and not opts.network_train_unet_only
        if opts.train_text_encoder or trains_te_lora:  # as sd-scripts: a text-encoder LoRA too
            model.text_encoder.gradient_checkpointing_enable()
    if opts.channels_last:
        to_channels_last(model.unet)
    if opts.torch_compile:
        compile_blocks(model.unet, opts.dynamo_backend, opts.dynamo_mode)
    return model, fingerprint


def resolve_clip_skip(opts: TrainOptions, family: Family, provenance: Optional[dict[str, Any]],
                      is_main: bool) -> int:
    """``--clip_skip``, or the family's default; warns where it goes past SD 2.x's own penultimate layer and, on
    ``--resume``, where it (or ``--max_token_length``) differs from what the state was trained with."""
    clip_skip = opts.clip_skip if opts.clip_skip is not None else family.default_clip_skip
    if family.is_v2 and clip_skip > 1:
        logger.warning("SD 2.x already conditions on OpenCLIP's penultimate layer; --clip_skip %d goes %d "
                       "layer(s) further", clip_skip, clip_skip - 1)
    if opts.resume and provenance is not None and is_main:
        for name, value in (("clip_skip", clip_skip), ("max_token_length", opts.max_token_length)):
            if name in provenance and provenance[name] != value:
                logger.warning("--%s %s: the state was trained with --%s %s; the text conditioning changes "
                               "from here on", name, value, name, provenance[name])
    return clip_skip
