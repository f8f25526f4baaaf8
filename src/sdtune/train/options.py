"""``sdtune train``'s options, their validation and the run's plan, apart from the loop (:mod:`sdtune.train.loop`).

Importing this module needs no torch (``sdtune train --help`` is instant): what :func:`validate` checks with other
modules (token lengths, prompt files, hypernetwork files) is imported when it runs, before any model loads.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from sdtune.errors import SdtuneError
from sdtune.models.choices import (
    ACTIVATION_CHOICES,
    COMPILE_MODES,
    DYNAMO_BACKENDS,
    HYPERNETWORK_MODULES,
    NETWORK_MODULES,
    NOT_IN_COMFYUI,
    SAVE_FORMATS,
)
from sdtune.option_groups import ImageKeys, LoaderWorkers, ModelSource, Recursive
from sdtune.options import opt

if TYPE_CHECKING:
    from sdtune.models.hypernetwork_layout import HypernetworkConfig

logger = logging.getLogger(__name__)

LEARNING_RATE_DEFAULT = 2e-6  # sd-scripts' default, a fine-tune's
# --optimizer_type, sd-scripts' names. Schedule-free optimizers (Defazio et al. 2024) replace the learning-rate
# schedule; Prodigy and D-Adaptation estimate the step size themselves (--learning_rate ~1.0 scales it).
SCHEDULE_FREE_OPTIMIZERS = ("AdamWScheduleFree", "RAdamScheduleFree", "SGDScheduleFree")
DADAPT_OPTIMIZERS = ("DAdaptation", "DAdaptAdam", "DAdaptAdamPreprint", "DAdaptAdaGrad", "DAdaptAdan", "DAdaptAdanIP",
                     "DAdaptLion", "DAdaptSGD")
ADAPTIVE_LR_OPTIMIZERS = ("Prodigy", *DADAPT_OPTIMIZERS)
OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Adafactor", "SGDNesterov", *ADAPTIVE_LR_OPTIMIZERS,
              *SCHEDULE_FREE_OPTIMIZERS)
# the optional package (import name = pip name) an optimizer comes from; pyproject.toml has an extra for each
OPTIMIZER_PACKAGES = {"AdamW8bit": "bitsandbytes", "Prodigy": "prodigyopt",
                      **dict.fromkeys(SCHEDULE_FREE_OPTIMIZERS, "schedulefree"),
                      **dict.fromkeys(DADAPT_OPTIMIZERS, "dadaptation")}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass
class TrainOptions(ModelSource, ImageKeys, Recursive, LoaderWorkers):
    """Every option of ``sdtune train``, with sd-scripts' names (``sdtune train --help`` prints each one's help);
    checked by :func:`validate` before the model loads."""

    # model
    pretrained_model_name_or_path: str = opt(None, "base model: diffusers folder, .safetensors/.ckpt or hub repo id")
    # data
    in_json: str = opt(None, "metadata JSON written by sdtune prepare")
    train_data_dir: str = opt(None, "folder with the images and their .npz latent caches")
    dataset_repeats: int = opt(1, "how many times each image appears per epoch")
    shuffle_caption: bool = opt(False, "shuffle the comma-separated parts of each caption every time it is used")
    keep_tokens: int = opt(0, "keep the first N comma-separated parts of each caption in place: never shuffled "
                           "or dropped")
    caption_dropout_rate: float = opt(0.0, "probability of training an image with an empty caption (teaches the "
                                      "unconditional prediction that guidance uses; 0.05-0.1 typical)")
    caption_dropout_every_n_epochs: int = opt(0, "train every Nth epoch (counting from 1) with empty captions "
                                              "(0: never)")
    caption_tag_dropout_rate: float = opt(0.0, "probability of dropping each comma-separated part after "
                                          "--keep_tokens, each time a caption is used")
    max_token_length: int = opt(75, "prompt length in tokens (150/225 encode 75-token chunks and join them)",
                                choices=(75, 150, 225))
    clip_skip: Optional[int] = opt(None, "use the hidden state N layers from the end of the text encoder "
                                   "(2 = penultimate; default 1; SD 2.x already uses its penultimate layer)")
    cache_text_encoder_outputs: bool = opt(False, "encode each distinct caption once at start-up and train from the "
                                           "cache, the text encoder off the device (faster steps, less memory; "
                                           "needs a frozen text encoder and fixed captions: no shuffle, no "
                                           "dropout)")
    cache_text_encoder_outputs_to_disk: bool = opt(False, "also keep those states next to each image "
                                                   "(<stem>_te_outputs.npz), reused by later runs while the "
                                                   "caption, model, clip skip and token length are the same")
    # training
    train_batch_size: int = opt(1, "images per batch (per process)")
    learning_rate: float = opt(LEARNING_RATE_DEFAULT, "learning rate of the U-Net (of the LoRA, with --network_module)")
    learning_rate_te: Optional[float] = opt(None, "learning rate of the text encoder (default: --learning_rate)")
    train_text_encoder: bool = opt(False, "train the text encoder too (more memory: its weights, gradients and "
                                   "optimizer state)")
    max_train_steps: int = opt(1600, "optimizer steps to train (ignored when --max_train_epochs is given)")
    max_train_epochs: Optional[int] = opt(None, "epochs to train (overrides --max_train_steps)")
    gradient_accumulation_steps: int = opt(1, "batches per optimizer step (a larger effective batch at no memory)")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0: no clipping)")
    noise_offset: float = opt(0.0, "add a per-channel constant of this scale to the noise, so the model learns very "
                              "dark and bright images (0.05-0.1 typical; 0: off)")
    min_timestep: int = opt(0, "train only on timesteps from this one (0-999; higher: only coarse structure)")
    max_timestep: int = opt(1000, "train only on timesteps below this one (1-1000; lower: only detail)")
    min_snr_gamma: Optional[float] = opt(None, "weight each sample's loss by min(SNR, gamma)/SNR (Min-SNR, 5 is "
                                         "typical): faster, steadier convergence; unset: off")
    seed: Optional[int] = opt(None, "random seed (default: drawn at random and printed; saved with the state)")
    optimizer_type: Optional[str] = opt(None, "optimizer (default AdamW); Prodigy (pip install prodigyopt) and "
                                        "DAdapt* (pip install dadaptation) find their own step size: use "
                                        "--learning_rate 1.0; *ScheduleFree (pip install schedulefree) need no "
                                        "--lr_scheduler (any letter case, as sd-scripts)", choices=OPTIMIZERS,
                                        ignore_case=True)
    use_8bit_adam: bool = opt(False, "same as --optimizer_type AdamW8bit (bitsandbytes): optimizer state in "
                              "8 bits, saving about 75 % of its memory (5 GB for SD's U-Net)")
    optimizer_args: list[str] = opt(help="extra optimizer arguments, e.g. weight_decay=0.01 betas=0.9,0.99",
                                    default_factory=list)
    lr_scheduler: str = opt("constant", "learning-rate schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: int = opt(0, "steps of linear warm-up (not with the constant schedule: use "
                               "constant_with_warmup)")
    lr_scheduler_num_cycles: int = opt(1, "restarts for cosine_with_restarts")
    lr_scheduler_power: float = opt(1.0, "power for the polynomial schedule")
    # speed and memory
    sdpa: bool = opt(False, "PyTorch scaled-dot-product attention (the default)")
    xformers: bool = opt(False, "xformers attention (needs pip install xformers; GPU)",
                         aliases=("--diffusers_xformers",))
    mem_eff_attn: bool = opt(False, "sliced attention, a few heads at a time: only for devices where SDPA has "
                             "no fused kernel; next to SDPA it keeps more for backward (4.5 vs 1.7 GiB at 512 px)")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: 83 % less activation memory "
                                       "(1.74 -> 0.29 GiB at 512 px, batch 1) for about 20-30 % more time per step")
    torch_compile: bool = opt(False, "torch.compile the U-Net's transformer and ResNet blocks in place (faster steps "
                              "after slow first ones; each block layout compiles about twice across bucket shapes)")
    dynamo_backend: str = opt("inductor", "torch.compile backend (inductor generates kernels; aot_eager/eager "
                              "only trace)", choices=DYNAMO_BACKENDS)
    dynamo_mode: Optional[str] = opt(None, "inductor mode (reduce-overhead: CUDA graphs)", choices=COMPILE_MODES)
    channels_last: bool = opt(False, "keep the U-Net's weights and activations in channels-last (NHWC) order, "
                              "which NVIDIA tensor-core convolutions prefer (off: not measured on a GPU yet)")
    fused_backward_pass: bool = opt(False, "step each parameter as soon as its gradient is ready and free the "
                                    "gradient (AdamW/Adafactor): saves nearly all gradient memory (3.2 GiB for SD "
                                    "1.5 in fp32); no gradient accumulation, fp16 loss scaling or DDP; "
                                    "--max_grad_norm then clips each parameter's gradient")
    use_ema: bool = opt(False, "keep an exponential moving average of the trained weights (one more copy of them "
                        "on the device) and save and sample with it")
    ema_decay: float = opt(0.9999, "EMA decay per step (fixed from the second step; the cap with --ema_inv_gamma)")
    ema_inv_gamma: Optional[float] = opt(None, "EMA warm-up as diffusers': decay 1 - (1 + step / inv_gamma) ** "
                                         "-power, capped at --ema_decay (1.0 is diffusers' value)")
    ema_power: float = opt(2 / 3, "EMA warm-up power (with --ema_inv_gamma; 2/3 diffusers', 3/4 for short runs)")
    ema_device: Optional[str] = opt(None, "where the EMA copy lives (default: the training device); cpu keeps it "
                                    "off the GPU (saves its memory, 3.2 GiB for SD 1.5's U-Net; costs a copy of the "
                                    "trained weights to the host every step)", choices=("cpu",))
    save_ema_separately: bool = opt(False, "save the trained weights as the model and the EMA weights beside it "
                                    "(<name>-ema.<ext>), instead of the EMA weights as the model")
    # validation
    validation_split: float = opt(0.0, "hold out this share of the images for validation (0.05 = 5 %; chosen "
                                  "by a hash of each image's key, so the same images whatever the seed); they are "
                                  "never trained")
    validation_data_dir: Optional[str] = opt(None, "validate on this prepared folder instead (with "
                                             "--validation_in_json)")
    validation_in_json: Optional[str] = opt(None, "the metadata JSON of --validation_data_dir (sdtune prepare's)")
    validate_every_n_steps: Optional[int] = opt(None, "compute the validation loss every N steps")
    validate_every_n_epochs: Optional[int] = opt(None, "compute the validation loss every N epochs (default with a "
                                                 "validation set: every epoch, and at the end)")
    validation_timesteps: int = opt(4, "timesteps each validation image is scored at, one per equal share of the "
                                    "schedule (4: one in each quarter), fixed with its noise for the whole run")
    save_best: bool = opt(False, "keep the checkpoint with the lowest validation loss as <name>-best (needs a "
                          "validation set)")
    # masked loss
    masked_loss: bool = opt(False, "weight the loss by each image's mask (cached by sdtune prepare --alpha_mask / "
                            "--mask_dir): black areas are not trained; images without a mask train whole "
                            "(counted at start-up)")
    persistent_data_loader_workers: bool = opt(False, "accepted for sd-scripts' command lines: sdtune's loader "
                                               "already keeps its workers for the whole run")
    mixed_precision: str = opt("no", "autocast precision: fp16 or bf16 speed up GPUs and cut activations by a "
                               "third, but keep half-precision weight copies (+1.3 GiB for SD 1.5); weights stay "
                               "fp32; fp16 uses dynamic loss scaling", choices=("no", "fp16", "bf16"))
    full_fp16: bool = opt(False, "fp16 weights and gradients too (needs --mixed_precision fp16): halves weight "
                          "and gradient memory (3.2 GiB for SD 1.5); AdamW keeps fp32 moments and compensates "
                          "the rounding of the weights (see --half_weight_rounding); updates stay close to fp32's")
    full_bf16: bool = opt(False, "bf16 weights and gradients (needs --mixed_precision bf16): like --full_fp16 "
                          "without loss scaling; bf16's 8-bit mantissa keeps small updates only through "
                          "--half_weight_rounding")
    half_weight_rounding: str = opt(
        "kahan", "how AdamW writes updates into fp16/bf16 weights (--full_fp16/--full_bf16): kahan keeps each "
        "weight's rounding error in a half-precision buffer and adds it back (+2 bytes a parameter, closest to "
        "fp32); stochastic rounds up or down at random, unbiased (no memory, noisier)",
        choices=("kahan", "stochastic"))
    # output
    output_dir: str = opt(None, "where checkpoints, state and samples go")
    output_name: Optional[str] = opt(None, "base name of the saved model files (default: last / epoch-N / step-N)")
    save_model_as: Optional[str] = opt(None, "format of saved models (default safetensors, whatever the base "
                                       "model's format: sd-scripts follows the input's, but a .ckpt is a pickle "
                                       "that can carry code and a diffusers folder is many files per save; ask for "
                                       "ckpt or diffusers here)", choices=SAVE_FORMATS)
    use_safetensors: bool = opt(False, "save .safetensors (or diffusers with safetensors weights)")
    save_precision: Optional[str] = opt(None, "precision of saved models (default float)",
                                        choices=("float", "fp16", "bf16"))
    save_every_n_epochs: Optional[int] = opt(None, "also save a model every N epochs")
    save_every_n_steps: Optional[int] = opt(None, "also save a model every N steps")
    save_last_n_epochs: Optional[int] = opt(None, "keep only the last N epoch saves (older ones are removed)")
    save_n_epoch_ratio: Optional[int] = opt(None, "save about N times over the run, every max(1, epochs // N) "
                                            "epochs (instead of --save_every_n_epochs)")
    save_last_n_steps: Optional[int] = opt(None, "keep only the step saves of the last N steps (older ones are "
                                           "removed)")
    save_state: bool = opt(False, "save the training state (optimizer, scheduler, progress) with each model save "
                           "and on Ctrl-C, for --resume")
    resume: Optional[str] = opt(None, "continue from a state folder written by --save_state")
    overwrite: bool = opt(False, "start afresh where an earlier run left checkpoints or states under the same "
                          "--output_dir and --output_name: they are deleted first (without this, such a run is "
                          "refused, naming the files)")
    sample_prompts: Optional[str] = opt(None, "prompt file (one prompt a line, inline --n --w --h --d --l --s) to "
                                        "sample during training, into <output_dir>/sample/")
    sample_every_n_steps: Optional[int] = opt(None, "sample every N steps")
    sample_every_n_epochs: Optional[int] = opt(None, "sample every N epochs")
    sample_sampler: str = opt("ddim", "sampler for training samples (as sdtune generate --sampler)")
    logging_dir: Optional[str] = opt(None, "write TensorBoard logs under this folder")
    log_prefix: str = opt("", "prefix of the TensorBoard run folder name")
    # hypernetwork
    hypernetwork_module: Optional[str] = opt(
        None, "train a hypernetwork instead of the model (U-Net and text encoder frozen), saved as <name>.pt in "
        "AUTOMATIC1111's format: 'default' = NovelAI's layout (sd-scripts' hypernetwork_nai is the same)",
        choices=HYPERNETWORK_MODULES)
    hypernetwork_weights: Optional[str] = opt(None, "start from this hypernetwork .pt (sdtune, AUTOMATIC1111 or "
                                              "NovelAI); its layout replaces the --hypernetwork_* layout options")
    hypernetwork_layer_structure: str = opt("1,2,1", "widths of each hypernetwork MLP as multiples of the attention "
                                            "width, from 1 to 1 (1,2,1: d -> 2d -> d)")
    hypernetwork_activation: str = opt(
        "linear", "activation between the hypernetwork's layers (linear = none; swish is Hardswish, as in "
        f"AUTOMATIC1111); ComfyUI's loader refuses {' and '.join(NOT_IN_COMFYUI)}", choices=ACTIVATION_CHOICES)
    hypernetwork_layer_norm: bool = opt(False, "layer norm after each hypernetwork layer (ComfyUI's loader "
                                        "applies it as A1111 does only with --hypernetwork_activation linear)")
    hypernetwork_dropout: Optional[str] = opt(
        None, "hypernetwork dropout: one probability for every hidden layer (e.g. 0.3), or AUTOMATIC1111's dropout "
        "structure, one value per layer-structure entry, first and last 0 (e.g. 0,0.05,0.15,0)")
    # LoRA (networks)
    network_module: Optional[str] = opt(
        None, "train a LoRA instead of the model (U-Net and text encoder frozen), saved in sd-scripts' format that "
        "AUTOMATIC1111, ComfyUI, Forge and diffusers load: lora (= networks.lora); lycoris.kohya needs "
        "pip install lycoris-lora", choices=NETWORK_MODULES)
    network_dim: Optional[int] = opt(None, "LoRA rank (default 4; 8-32 typical for a character or style)")
    network_alpha: float = opt(1.0, "LoRA alpha: updates are scaled by alpha / rank (1 is sd-scripts' default; "
                               "alpha = rank means no scaling)")
    network_dropout: Optional[float] = opt(None, "dropout on the LoRA's rank activations while training (0.1 "
                                           "typical; default none)")
    network_args: list[str] = opt(help="more network options as key=value: conv_dim=N conv_alpha=A (LoCon: the "
                                  "ResNet, down- and up-sample 3x3 convolutions too), rank_dropout=P, "
                                  "module_dropout=P; for lycoris.kohya its own (algo=locon/loha/lokr, ...)",
                                  default_factory=list)
    network_weights: Optional[str] = opt(None, "start from this LoRA file (same rank and layers)")
    network_train_unet_only: bool = opt(False, "LoRA on the U-Net only (less memory; no text-encoder LoRA)")
    network_train_text_encoder_only: bool = opt(False, "LoRA on the text encoder only")
    unet_lr: Optional[float] = opt(None, "learning rate of the U-Net's LoRA (default --learning_rate)")
    text_encoder_lr: Optional[float] = opt(None, "learning rate of the text encoder's LoRA (default "
                                           "--learning_rate; 0: not trained)")
    scale_weight_norms: Optional[float] = opt(None, "after each step, scale down any LoRA module whose update "
                                              "(alpha/rank * up @ down) has a norm above this (1 typical; "
                                              "sd-scripts' max-norm regularisation)")


# ------------------------------------------------------------------------------------------------ validation
def validate(opts: TrainOptions) -> None:
    """Option errors, before any model is loaded."""
    if attention_kind(opts) == "xformers" and importlib.util.find_spec("xformers") is None:
        raise SdtuneError("--xformers needs the xformers package, which is not installed: pip install xformers "
                          "(GPU only), or drop the option (the default SDPA attention is as memory-efficient)")
    from sdtune.models.text import check_max_token_length

    check_max_token_length(opts.max_token_length)
    if opts.train_batch_size < 1 or opts.gradient_accumulation_steps < 1:
        raise SdtuneError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    if opts.full_fp16 and opts.mixed_precision != "fp16":
        raise SdtuneError("--full_fp16 needs --mixed_precision fp16")
    if opts.full_bf16 and opts.mixed_precision != "bf16":
        raise SdtuneError("--full_bf16 needs --mixed_precision bf16")
    validate_numbers(opts)
    validate_text_cache(opts)
    if opts.dynamo_mode is not None and not opts.torch_compile:
        raise SdtuneError(f"--dynamo_mode {opts.dynamo_mode} needs --torch_compile")
    if opts.lr_warmup_steps and opts.lr_scheduler == "constant":
        raise SdtuneError(f"--lr_warmup_steps {opts.lr_warmup_steps} does nothing with --lr_scheduler constant; use "
                          "--lr_scheduler constant_with_warmup (or another schedule), or drop --lr_warmup_steps")
    if opts.lr_warmup_steps < 0:
        raise SdtuneError(f"--lr_warmup_steps must be 0 or more, got {opts.lr_warmup_steps}")
    if opts.use_8bit_adam and opts.optimizer_type not in (None, "AdamW8bit"):
        raise SdtuneError(f"--use_8bit_adam and --optimizer_type {opts.optimizer_type} name two optimizers; drop "
                          "--use_8bit_adam, or use --optimizer_type AdamW8bit alone")
    validate_optimizer(opts)
    validate_fused_backward(opts)
    if opts.use_ema and not 0.0 < opts.ema_decay < 1.0:
        raise SdtuneError(f"--ema_decay is a factor between 0 and 1 (0.999-0.9999 typical), got {opts.ema_decay}")
    if (opts.ema_inv_gamma is not None or opts.ema_decay != 0.9999 or opts.ema_device or opts.save_ema_separately) \
            and not opts.use_ema:
        raise SdtuneError("--ema_decay / --ema_inv_gamma / --ema_device / --save_ema_separately need --use_ema")
    validate_validation(opts)
    if opts.clip_skip is not None and opts.clip_skip < 1:
        raise SdtuneError("--clip_skip must be 1 or more")
    if sum([opts.xformers, opts.mem_eff_attn, opts.sdpa]) > 1:
        raise SdtuneError("choose one attention: --sdpa, --xformers or --mem_eff_attn")
    if opts.resume and not (Path(opts.resume) / "progress.json").is_file():
        raise SdtuneError(f"--resume {opts.resume}: not a state folder written by --save_state (no progress.json)")
    if opts.sample_prompts:
        from sdtune.sampling.prompts import read_prompt_file
        from sdtune.sampling.samplers import get_sampler

        read_prompt_file(opts.sample_prompts)  # a bad prompt file fails now, not after an hour of training
        get_sampler(opts.sample_sampler)
        if not (opts.sample_every_n_steps or opts.sample_every_n_epochs):
            raise SdtuneError("--sample_prompts needs --sample_every_n_steps or --sample_every_n_epochs")
    if not Path(opts.in_json).is_file():
        raise SdtuneError(f"--in_json {opts.in_json}: no such file; run sdtune prepare to write it")
    if not Path(opts.train_data_dir).is_dir():
        raise SdtuneError(f"--train_data_dir {opts.train_data_dir}: no such folder")
    validate_hypernetwork_options(opts)
    from sdtune.train.network_options import validate_network_options

    validate_network_options(opts)


def validate_numbers(opts: TrainOptions) -> None:
    """The ranges of the caption, save-schedule and noise numbers."""
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(opts, name) <= 1.0:
            raise SdtuneError(f"--{name} is a probability, between 0 and 1; got {getattr(opts, name)}")
    if opts.caption_dropout_every_n_epochs < 0 or opts.keep_tokens < 0:
        raise SdtuneError("--caption_dropout_every_n_epochs and --keep_tokens must be 0 or more")
    if opts.save_n_epoch_ratio is not None and opts.save_every_n_epochs is not None:
        raise SdtuneError("--save_n_epoch_ratio and --save_every_n_epochs both set how often to save; pick one")
    for name in ("save_every_n_epochs", "save_every_n_steps", "save_last_n_epochs", "save_n_epoch_ratio",
                 "save_last_n_steps"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise SdtuneError(f"--{name} must be 1 or more, got {getattr(opts, name)}")
    if not 0 <= opts.min_timestep < opts.max_timestep <= 1000:
        raise SdtuneError(f"--min_timestep {opts.min_timestep} and --max_timestep {opts.max_timestep}: need "
                          "0 <= min < max <= 1000 (SD's schedule has timesteps 0-999)")
    if opts.noise_offset < 0:
        raise SdtuneError(f"--noise_offset must be 0 (off) or positive, got {opts.noise_offset}")
    if opts.min_snr_gamma is not None and opts.min_snr_gamma <= 0:
        raise SdtuneError(f"--min_snr_gamma must be positive (5 is typical), got {opts.min_snr_gamma}")


def validate_validation(opts: TrainOptions) -> None:
    """The validation set and its schedule: one source, a share below 1, a schedule only with a set."""
    has_split = opts.validation_split > 0
    if not 0.0 <= opts.validation_split < 1.0:
        raise SdtuneError(f"--validation_split is a share of the images, from 0 to below 1 (0.05 typical); got "
                          f"{opts.validation_split}")
    if bool(opts.validation_data_dir) != bool(opts.validation_in_json):
        raise SdtuneError("--validation_data_dir and --validation_in_json go together: the prepared folder and its "
                          "metadata JSON (sdtune prepare writes both)")
    if has_split and opts.validation_data_dir:
        raise SdtuneError("--validation_split and --validation_data_dir both name a validation set; pick one")
    if opts.validation_data_dir:
        if not Path(opts.validation_in_json).is_file():
            raise SdtuneError(f"--validation_in_json {opts.validation_in_json}: no such file; run sdtune prepare on "
                              "the validation folder to write it")
        if not Path(opts.validation_data_dir).is_dir():
            raise SdtuneError(f"--validation_data_dir {opts.validation_data_dir}: no such folder")
    for name in ("validate_every_n_steps", "validate_every_n_epochs"):
        if getattr(opts, name) is not None and getattr(opts, name) < 1:
            raise SdtuneError(f"--{name} must be 1 or more, got {getattr(opts, name)}")
    if opts.validation_timesteps < 1:
        raise SdtuneError(f"--validation_timesteps must be 1 or more, got {opts.validation_timesteps}")
    given = [name for name in ("validate_every_n_steps", "validate_every_n_epochs", "save_best")
             if getattr(opts, name)]
    if given and not (has_split or opts.validation_data_dir):
        raise SdtuneError(f"--{given[0]} needs a validation set: --validation_split 0.05 (held out of the training "
                          "images) or --validation_data_dir with --validation_in_json")


def validate_fused_backward(opts: TrainOptions) -> None:
    """--fused_backward_pass only where a step per parameter during backward is the step the run would make."""
    if not opts.fused_backward_pass:
        return
    name = optimizer_name(opts)
    if name not in ("AdamW", "Adafactor"):
        raise SdtuneError(f"--fused_backward_pass works with --optimizer_type AdamW or Adafactor, not {name}")
    if opts.gradient_accumulation_steps > 1:
        raise SdtuneError("--fused_backward_pass with --gradient_accumulation_steps: each parameter is stepped during "
                          "backward, before the next micro-batch adds its gradient; drop one of the two")
    if opts.mixed_precision == "fp16":
        raise SdtuneError("--fused_backward_pass with --mixed_precision fp16: a step that overflows cannot be skipped "
                          "once some parameters have moved; use --mixed_precision bf16 (or no)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SdtuneError("--fused_backward_pass with several processes: DDP averages the gradients after backward, "
                          "but this steps them during it; train on one process, or drop the option")


def validate_optimizer(opts: TrainOptions) -> None:
    """The optimizer's package is installed; a schedule-free optimizer gets no schedule on top of its own."""
    name = optimizer_name(opts)
    package = OPTIMIZER_PACKAGES.get(name)
    if package is not None and importlib.util.find_spec(package) is None:
        spelled = "--use_8bit_adam" if opts.use_8bit_adam else f"--optimizer_type {name}"
        raise SdtuneError(f"{spelled} needs the {package} package, which is not installed: pip install {package} "
                          "(or choose another --optimizer_type)")
    if name in SCHEDULE_FREE_OPTIMIZERS and opts.lr_scheduler != "constant":
        raise SdtuneError(f"--optimizer_type {name} is schedule-free: it replaces the learning-rate schedule, and "
                          f"--lr_scheduler {opts.lr_scheduler} would scale its steps again; drop --lr_scheduler "
                          "(constant) and warm up with --optimizer_args warmup_steps=N")


def validate_hypernetwork_options(opts: TrainOptions) -> None:
    """The --hypernetwork_* options, and the --hypernetwork_weights file, checked before the model loads."""
    if opts.hypernetwork_module is None:
        if opts.hypernetwork_weights:
            raise SdtuneError("--hypernetwork_weights needs --hypernetwork_module default: without it the model is "
                              "fine-tuned and no hypernetwork is trained")
        return
    if opts.train_text_encoder:
        raise SdtuneError("--train_text_encoder with --hypernetwork_module: a hypernetwork run trains only the "
                          "hypernetwork (the U-Net and text encoder stay frozen); drop one of the two")
    if opts.hypernetwork_weights:
        if not Path(opts.hypernetwork_weights).is_file():
            raise SdtuneError(f"--hypernetwork_weights {opts.hypernetwork_weights}: no such file")
        from sdtune.models.hypernetwork import Hypernetwork

        Hypernetwork.load(opts.hypernetwork_weights)  # a bad file fails now, not after the model loaded (<0.5 s)
    hypernetwork_config(opts)  # a bad layout fails now, before the model loads
    if opts.save_model_as or opts.use_safetensors:
        logger.warning("--save_model_as / --use_safetensors are ignored: a hypernetwork is saved as .pt, the format "
                       "AUTOMATIC1111 and ComfyUI load")


def validate_text_cache(opts: TrainOptions) -> None:
    """--cache_text_encoder_outputs only where the cached states are the ones each step would compute: a frozen
    text encoder and captions that never change between uses."""
    if opts.cache_text_encoder_outputs_to_disk and not opts.cache_text_encoder_outputs:
        raise SdtuneError("--cache_text_encoder_outputs_to_disk needs --cache_text_encoder_outputs")
    if not opts.cache_text_encoder_outputs:
        return
    varying = [name for name in ("shuffle_caption", "caption_dropout_rate", "caption_dropout_every_n_epochs",
                                 "caption_tag_dropout_rate") if getattr(opts, name)]
    if varying:
        raise SdtuneError(f"--cache_text_encoder_outputs with --{varying[0]}: the caption changes between uses, so "
                          "its encoding cannot be cached; drop one of the two")
    trains_te_lora = (opts.network_module is not None and not opts.network_train_unet_only
                      and opts.text_encoder_lr != 0)
    if opts.train_text_encoder or trains_te_lora:
        which = "--train_text_encoder" if opts.train_text_encoder else "a LoRA that trains the text encoder"
        raise SdtuneError(f"--cache_text_encoder_outputs with {which}: the text encoder changes every step, so its "
                          "outputs cannot be cached; drop the option" + ("" if opts.train_text_encoder else
                                                                          " or add --network_train_unet_only"))


def hypernetwork_config(opts: TrainOptions) -> HypernetworkConfig:
    """The layout the --hypernetwork_* options ask for (imports torch: call it after parsing, not at import)."""
    from sdtune.models.hypernetwork_layout import HypernetworkConfig

    return HypernetworkConfig.from_options(opts.hypernetwork_layer_structure, opts.hypernetwork_activation,
                                           opts.hypernetwork_layer_norm, opts.hypernetwork_dropout)


def attention_kind(opts: TrainOptions) -> str:
    """The attention backend the options ask for: xformers, mem_eff (sliced) or sdpa (the default)."""
    if opts.xformers:
        return "xformers"
    return "mem_eff" if opts.mem_eff_attn else "sdpa"


def optimizer_name(opts: TrainOptions) -> str:
    """The optimizer the options ask for (--use_8bit_adam is sd-scripts' spelling of AdamW8bit)."""
    return "AdamW8bit" if opts.use_8bit_adam else opts.optimizer_type or "AdamW"


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """Numbers derived from the options and the data, shown at the start."""

    images: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    effective_batch: int


def plan_run(opts: TrainOptions, images: int, batches_per_epoch: int, world_size: int) -> Plan:
    """How many steps and epochs the run takes, from this process's batches per epoch."""
    steps_per_epoch = math.ceil(batches_per_epoch / opts.gradient_accumulation_steps)
    total = steps_per_epoch * opts.max_train_epochs if opts.max_train_epochs is not None else opts.max_train_steps
    return Plan(images, batches_per_epoch, steps_per_epoch, total, math.ceil(total / steps_per_epoch),
                opts.train_batch_size * opts.gradient_accumulation_steps * world_size)
