"""The ``ss_*`` training metadata of a LoRA file, as sd-scripts' train_network.py writes it.

Kohya's GUIs, AUTOMATIC1111's additional-networks extension and civitai read these keys to show how a LoRA was
trained (dataset folders, tag frequencies, rank, learning rates, the base model). sd-scripts stores every value as
``str(value)`` (``None`` -> ``"None"``, ``True`` -> ``"True"``) and JSON for the dataset keys; so does sdtune. A
run's metadata is made once at start-up; each save adds ``ss_steps``, ``ss_epoch`` and
``ss_training_finished_at``. The base model's own hash (``ss_new_sd_model_hash``, minutes for a 4 GB file on a slow
disk) is not computed.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sdtune.data.dataset import FineTuneData
from sdtune.train.options import Plan, TrainOptions, optimizer_name


def tag_frequency(data: FineTuneData) -> dict[str, int]:
    """How many images' captions carry each comma-separated tag (lower case, as sd-scripts' set_tag_frequency)."""
    counts: Counter[str] = Counter()
    for example in data.examples.values():
        counts.update({tag.strip().lower() for tag in example.caption.split(",") if tag.strip()})
    return dict(counts.most_common())


def training_resolution(data: FineTuneData) -> int:
    """The side of the square whose area the largest bucket has, rounded to 64 px: the run's ``--resolution``."""
    largest = max((w * h for w, h in data.buckets.counts()), default=512 * 512)
    return max(64, round(math.sqrt(largest) / 64) * 64)


def training_metadata(opts: TrainOptions, data: FineTuneData, plan: Plan, seed: int, clip_skip: int,
                      world_size: int, started_at: float | None = None) -> dict[str, str]:
    """The run's ``ss_*`` keys (sd-scripts' names and formats); the network and model-spec keys come from
    :func:`sdtune.models.lora.network_metadata`."""
    dataset = Path(opts.in_json).name  # sd-scripts keys a metadata-file dataset by its file name
    resolution = training_resolution(data)
    buckets = {str(i): {"resolution": [w, h], "count": n}
               for i, ((w, h), n) in enumerate(data.buckets.counts().items())}
    values: dict[str, Any] = {
        "ss_session_id": secrets.randbelow(2**32),  # which group of epochs (sessions) a file came from
        "ss_training_started_at": time.time() if started_at is None else started_at,
        "ss_output_name": opts.output_name,
        "ss_learning_rate": opts.learning_rate,
        "ss_text_encoder_lr": opts.text_encoder_lr,
        "ss_unet_lr": opts.unet_lr,
        "ss_num_train_images": plan.images,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": plan.batches_per_epoch,
        "ss_num_epochs": plan.epochs,
        "ss_gradient_checkpointing": opts.gradient_checkpointing,
        "ss_gradient_accumulation_steps": opts.gradient_accumulation_steps,
        "ss_max_train_steps": plan.total_steps,
        "ss_lr_warmup_steps": opts.lr_warmup_steps,
        "ss_lr_scheduler": opts.lr_scheduler,
        "ss_network_dropout": opts.network_dropout,
        "ss_mixed_precision": opts.mixed_precision,
        "ss_full_fp16": opts.full_fp16,
        "ss_clip_skip": clip_skip,
        "ss_max_token_length": opts.max_token_length,
        "ss_cache_latents": True,
        "ss_seed": seed,
        "ss_noise_offset": opts.noise_offset or None,
        "ss_min_snr_gamma": opts.min_snr_gamma,
        "ss_scale_weight_norms": opts.scale_weight_norms,
        "ss_optimizer": optimizer_name(opts) + (f"({','.join(opts.optimizer_args)})" if opts.optimizer_args else ""),
        "ss_max_grad_norm": opts.max_grad_norm,
        "ss_caption_dropout_rate": opts.caption_dropout_rate,
        "ss_caption_dropout_every_n_epochs": opts.caption_dropout_every_n_epochs,
        "ss_caption_tag_dropout_rate": opts.caption_tag_dropout_rate,
        "ss_batch_size_per_device": opts.train_batch_size,
        "ss_total_batch_size": plan.effective_batch,
        "ss_resolution": (resolution, resolution),
        "ss_shuffle_caption": opts.shuffle_caption,
        "ss_keep_tokens": opts.keep_tokens,
        "ss_enable_bucket": True,
        "ss_flip_aug": False,
        "ss_color_aug": False,
        "ss_random_crop": False,
        "ss_dataset_dirs": json.dumps({dataset: {"n_repeats": opts.dataset_repeats, "img_count": plan.images}}),
        "ss_tag_frequency": json.dumps({dataset: tag_frequency(data)}),
        "ss_bucket_info": json.dumps({"buckets": buckets, "mean_img_ar_error": data.buckets.mean_aspect_error()}),
        "ss_sd_model_name": Path(str(opts.pretrained_model_name_or_path)).name,
        "ss_vae_name": Path(opts.vae).name if opts.vae else None,
        "ss_training_comment": None,
    }
    if world_size > 1:
        values["ss_num_processes"] = world_size
    return {key: str(value) for key, value in values.items()}
