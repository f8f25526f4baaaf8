"""``sdtune train``: fine-tune the U-Net (and optionally the text encoder), or train a hypernetwork, from the
metadata JSON and cached latents.

What a run trains is a :class:`TrainTarget`: the full model (:class:`FineTuneTarget`) or a hypernetwork with the
model frozen (:class:`HypernetworkTarget`). It names the trained modules (saved in state folders, restored by
``--resume``), the optimizer's parameter groups and how a checkpoint is written; the loop is the same for both.

The step body: batch -> text conditioning -> noise and timesteps -> prediction -> loss -> backward -> step. All
randomness is derived from ``(seed, step, batch index)`` or ``(seed, epoch, item)``, so ``--resume`` continues
bit-exactly and N processes train as one process with N-fold gradient accumulation. Mixed precision is
``torch.autocast`` itself (on the CPU too, so the tests run the half-precision path a GPU runs), with dynamic loss
scaling for fp16; the host waits for the device once per optimizer step (the loss, overflow and stop flags are read
together). Under ``accelerate launch`` / ``torchrun`` each rank trains on its own share of every epoch's
batches; only rank 0 writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import importlib.util
import logging
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from sdtune.atomic import clean_stale_temporaries
from sdtune.data.dataset import CaptionRules, FineTuneData, RunBatches, run_loader
from sdtune.data.metadata import load_metadata
from sdtune.errors import SdtuneError
from sdtune.models.attention import set_attention
from sdtune.models.io import load_model, model_summary
from sdtune.models.text import check_max_token_length, encode, tokenize
from sdtune.train import noise as noise_lib
from sdtune.train.interrupt import StopRequest, TolerantStream, TrainingStopped
from sdtune.train.optim import (
    HalfWeightAdamW,
    build_lr_scheduler,
    build_optimizer,
    parse_optimizer_args,
    step_with_factor,
)
from sdtune.train.precision import LossScaler, unscale_and_clip
from sdtune.train.provenance import (
    check_base_model,
    file_sha256,
    metadata_changed,
    model_fingerprint,
    read_provenance,
    write_provenance,
)
from sdtune.train.run_folder import RunLock, check_writable, earlier_run_files
from sdtune.train.rng import derived_seed, seeded_global_rng, step_batch_index, step_generator
from sdtune.train.state import Progress, load_optimizer_and_scheduler, read_progress, save_state
from sdtune.train.targets import hypernetwork_config, make_target
from sdtune.train.options import TrainOptions  # declared apart so that --help needs no torch


logger = logging.getLogger(__name__)


class TrainingDiverged(SdtuneError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------ validation
@dataclass
class Plan:
    """Numbers derived from the options and the data, shown at the start."""

    images: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int
    effective_batch: int


def resolve_resume(path: Path) -> Path:
    """The state folder ``--resume PATH`` means: PATH itself, or, for an output folder holding state folders, the
    one furthest along (said in the log)."""
    if not path.exists():
        raise SdtuneError(f"--resume {path}: no such folder")
    if (path / "progress.json").is_file() or not path.is_dir():
        return path
    states = []
    for candidate in path.iterdir():
        if (candidate / "progress.json").is_file():
            states.append((read_progress(candidate).global_step, candidate.stat().st_mtime, candidate))
    if not states:
        raise SdtuneError(f"--resume {path}: no state folder in it (those are written by --save_state, e.g. "
                          f"{path / 'last-state'})")
    step, _, newest = max(states, key=lambda s: (s[0], s[1]))
    logger.info("--resume %s: resuming from the state furthest along in it, %s (step %d)%s", path, newest, step,
                f"; the others: {', '.join(sorted(s[2].name for s in states if s[2] != newest))}"
                if len(states) > 1 else "")
    return newest


def validate(opts: TrainOptions) -> None:
    """Option errors, before any model is loaded."""
    if attention_kind(opts) == "xformers" and importlib.util.find_spec("xformers") is None:
        raise SdtuneError("--xformers needs the xformers package, which is not installed: pip install xformers "
                          "(GPU only), or drop the option (the default SDPA attention is as memory-efficient)")
    check_max_token_length(opts.max_token_length)
    if opts.train_batch_size < 1 or opts.gradient_accumulation_steps < 1:
        raise SdtuneError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    if opts.full_fp16 and opts.mixed_precision != "fp16":
        raise SdtuneError("--full_fp16 needs --mixed_precision fp16")
    if opts.full_bf16 and opts.mixed_precision != "bf16":
        raise SdtuneError("--full_bf16 needs --mixed_precision bf16")
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
    if opts.lr_warmup_steps and opts.lr_scheduler == "constant":
        raise SdtuneError(f"--lr_warmup_steps {opts.lr_warmup_steps} does nothing with --lr_scheduler constant; use "
                          "--lr_scheduler constant_with_warmup (or another schedule), or drop --lr_warmup_steps")
    if opts.lr_warmup_steps < 0:
        raise SdtuneError(f"--lr_warmup_steps must be 0 or more, got {opts.lr_warmup_steps}")
    if opts.use_8bit_adam and opts.optimizer_type not in (None, "AdamW8bit"):
        raise SdtuneError(f"--use_8bit_adam and --optimizer_type {opts.optimizer_type} name two optimizers; drop "
                          "--use_8bit_adam, or use --optimizer_type AdamW8bit alone")
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


def validate_hypernetwork_options(opts: TrainOptions) -> None:
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


def attention_kind(opts: TrainOptions) -> str:
    if opts.xformers:
        return "xformers"
    return "mem_eff" if opts.mem_eff_attn else "sdpa"


def optimizer_name(opts: TrainOptions) -> str:
    return "AdamW8bit" if opts.use_8bit_adam else opts.optimizer_type or "AdamW"


def autocast_dtype(opts: TrainOptions) -> Optional[torch.dtype]:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(opts.mixed_precision)


def check_distributed_type(accelerator: Any) -> None:
    """Refuse accelerate's sharded modes before any work: sdtune's optimizer, loss scaler, gradient reduction and
    checkpoint writer work on whole (unsharded) modules, so under FSDP or DeepSpeed they would train shards they
    do not see and save shards as if they were the model. A clear refusal beats a checkpoint that is silently
    wrong."""
    from accelerate.utils import DistributedType

    sharded = {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed",
               DistributedType.MEGATRON_LM: "Megatron-LM"}
    name = sharded.get(accelerator.distributed_type)
    if name is not None:
        raise SdtuneError(
            f"sdtune train does not support accelerate's {name} mode yet (it would save sharded weights as if they "
            "were the model). Run with a plain multi-GPU config instead (accelerate config -> multi-GPU, no "
            "FSDP/DeepSpeed; or torchrun --nproc_per_node N -m sdtune train ...): DDP, where each GPU holds the "
            "whole model. On 12 GB cards see the README's memory recipes (--gradient_checkpointing, "
            "--use_8bit_adam, --mixed_precision, --full_fp16).")


# ------------------------------------------------------------------------------------------------ the trainer
class Trainer:
    """Holds the pieces of one run; :meth:`run` is the loop."""

    def __init__(self, opts: TrainOptions) -> None:
        from accelerate import Accelerator

        if opts.resume:
            opts = dataclasses.replace(opts, resume=str(resolve_resume(Path(opts.resume))))
        validate(opts)
        self.opts = opts
        # Under torchrun on a machine without a GPU, accelerate joins the processes (gloo) only when told cpu=True.
        cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        # Mixed precision is torch.autocast, entered by the loop itself: accelerate's autocast under fp16 on a CPU
        # computes in float32, which would make every CPU test of the fp16 path a test of fp32.
        self.accelerator = Accelerator(mixed_precision="no", cpu=cpu_ranks)
        check_distributed_type(self.accelerator)
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.output_dir = Path(opts.output_dir)
        self.progress = Progress(train_batch_size=opts.train_batch_size, world_size=self.world,
                                 gradient_accumulation_steps=opts.gradient_accumulation_steps)
        self.provenance: Optional[dict[str, Any]] = None
        if opts.resume:
            self.progress = read_progress(Path(opts.resume))
            self._check_resume_compatible()
            self.provenance = read_provenance(Path(opts.resume))
            changed = metadata_changed(self.provenance, opts.in_json, self.metadata_sha256)
            if changed and self.is_main:
                logger.warning("%s", changed)
        else:
            self.progress.seed = opts.seed if opts.seed is not None else random.randint(0, 2**31 - 1)
        self.seed = self.progress.seed
        self.caption_rules = CaptionRules(
            shuffle=opts.shuffle_caption, keep_tokens=opts.keep_tokens, dropout_rate=opts.caption_dropout_rate,
            dropout_every_n_epochs=opts.caption_dropout_every_n_epochs, tag_dropout_rate=opts.caption_tag_dropout_rate)
        self.encodes_on_the_fly = 0
        self.writer = None
        self.saved: list[Path] = []
        self.stop = StopRequest()
        self.in_step = False
        self.run_lock = RunLock(self.output_dir)

    @functools.cached_property
    def metadata_sha256(self) -> str:
        """The --in_json file's hash, read once a run (every state records it; --resume compares it)."""
        return file_sha256(self.opts.in_json)

    def _check_resume_compatible(self) -> None:
        p, o = self.progress, self.opts
        if (p.world_size, p.train_batch_size, p.gradient_accumulation_steps) != (
                self.world, o.train_batch_size, o.gradient_accumulation_steps):
            raise SdtuneError(
                f"--resume {o.resume}: that run used {p.world_size} process(es), batch size {p.train_batch_size} and "
                f"gradient accumulation {p.gradient_accumulation_steps}; resume with the same values so the epoch "
                "continues where it stopped"
            )
        if o.seed is not None and o.seed != p.seed:
            logger.warning("--seed %d ignored: resuming with the saved seed %d", o.seed, p.seed)

    # -------------------------------------------------------------------------------------------- set-up
    def setup(self) -> None:
        opts = self.opts
        weight_dtype = torch.float16 if opts.full_fp16 else torch.bfloat16 if opts.full_bf16 else torch.float32
        # the metadata and the folder first: a bad --in_json must not cost a full model load (issue 12 item 7)
        self.data = FineTuneData.from_metadata(load_metadata(opts.in_json), opts.train_data_dir,
                                               opts.dataset_repeats, opts.full_path, opts.recursive)
        with self.accelerator.main_process_first():
            self.model = load_model(opts.pretrained_model_name_or_path, v2=opts.v2,
                                    v_parameterization=opts.v_parameterization, vae=opts.vae,
                                    tokenizer=opts.tokenizer)
        model = self.model
        if self.is_main:
            logger.info("model: %s", model_summary(model))
        self.base_fingerprint = model_fingerprint({"unet": model.unet, "text_encoder": model.text_encoder,
                                                   "vae": model.vae})
        if opts.resume:
            check_base_model(Path(opts.resume), self.provenance, opts.pretrained_model_name_or_path,
                             self.base_fingerprint)
        self.clip_skip = opts.clip_skip if opts.clip_skip is not None else model.family.default_clip_skip
        if model.family.is_v2 and self.clip_skip > 1:
            logger.warning("SD 2.x already conditions on OpenCLIP's penultimate layer; --clip_skip %d goes %d "
                           "layer(s) further", self.clip_skip, self.clip_skip - 1)
        if opts.resume and self.provenance is not None and self.is_main:
            for name, value in (("clip_skip", self.clip_skip), ("max_token_length", opts.max_token_length)):
                if name in self.provenance and self.provenance[name] != value:
                    logger.warning("--%s %s: the state was trained with --%s %s; the text conditioning changes "
                                   "from here on", name, value, name, self.provenance[name])
        model.vae.to(self.device)
        self.encodes_on_the_fly = self.data.encode_missing(model.vae)
        if self.encodes_on_the_fly:
            logger.info("encoded %d image(s) whose latent cache was missing or stale (run sdtune prepare to cache "
                        "them)", self.encodes_on_the_fly)
        self.scaling_factor = float(model.vae.config.scaling_factor)
        model.vae.to("cpu")  # not needed any more: free the GPU memory
        self.noise_scheduler = model.noise_scheduler()
        # on the device once: the noise coefficients are looked up every step without a copy
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)

        set_attention(model.unet, attention_kind(opts))
        if opts.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if opts.train_text_encoder:
                model.text_encoder.gradient_checkpointing_enable()
        self.target = make_target(opts, model, self.device, weight_dtype, self.seed, self.clip_skip)
        if opts.resume:
            self.target.load_state(Path(opts.resume))

        groups = self.target.param_groups
        self.trainable = [p for g in groups for p in g["params"]]
        extra = parse_optimizer_args(opts.optimizer_args)
        half_weights = weight_dtype != torch.float32
        if half_weights and optimizer_name(opts) != "AdamW" and self.is_main:
            logger.warning("--full_fp16/--full_bf16 with %s: the optimizer writes its updates into the half-precision "
                           "weights rounded to nearest, and updates below half an ulp are lost; AdamW (the default) "
                           "keeps them (--half_weight_rounding)", optimizer_name(opts))
        self.optimizer = build_optimizer(optimizer_name(opts), groups, opts.learning_rate, extra,
                                         half_weights=half_weights, seed=derived_seed(self.seed, 0x5352),
                                         rounding=opts.half_weight_rounding)
        self.plan = self._plan()
        self.save_every_n_epochs = opts.save_every_n_epochs
        if opts.save_n_epoch_ratio:
            self.save_every_n_epochs = max(1, self.plan.epochs // opts.save_n_epoch_ratio)
        self.lr_scheduler = build_lr_scheduler(opts.lr_scheduler, self.optimizer, opts.lr_warmup_steps,
                                               self.plan.total_steps, opts.lr_scheduler_num_cycles,
                                               opts.lr_scheduler_power)
        # fp16 gradients underflow without loss scaling, under autocast as with fp16 weights; bf16 has fp32's range
        self.scaler = LossScaler(self.device) if opts.mixed_precision == "fp16" else None
        if opts.resume:
            scaler_state = load_optimizer_and_scheduler(Path(opts.resume), self.optimizer, self.lr_scheduler)
            if self.scaler is not None and scaler_state:
                self.scaler.load_state_dict(scaler_state)
        self.unet, self.text_encoder = self.target.prepare(self.accelerator)

    def _plan(self) -> Plan:
        opts = self.opts
        batches = len(self.data.epoch_batches(0, self.seed, opts.train_batch_size, self.world, self.rank))
        steps_per_epoch = math.ceil(batches / opts.gradient_accumulation_steps)
        if opts.max_train_epochs is not None:
            total = steps_per_epoch * opts.max_train_epochs
        else:
            total = opts.max_train_steps
        epochs = math.ceil(total / steps_per_epoch)
        return Plan(len(self.data.examples), batches, steps_per_epoch, total, epochs,
                    opts.train_batch_size * opts.gradient_accumulation_steps * self.world)

    # -------------------------------------------------------------------------------------------- the step
    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = autocast_dtype(self.opts)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device; from pinned memory the copy does not make the host wait."""
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def conditioning(self, captions: list[str]) -> torch.Tensor:
        tok = self.model.tokenizer
        ids = self.to_device(tokenize(tok, captions, self.opts.max_token_length))
        with torch.set_grad_enabled(self.opts.train_text_encoder), self.autocast():
            return encode(self.text_encoder, ids, self.clip_skip, tok.eos_token_id, tok.pad_token_id)

    def draw(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise and timesteps of one batch, from its generator."""
        return noise_lib.sample_noise_and_timesteps(
            batch["latents"], self.noise_scheduler.config.num_train_timesteps, generator, self.opts.noise_offset,
            self.opts.min_timestep, self.opts.max_timestep)

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        noise, timesteps = self.draw(batch, generator)
        return self.loss_for(batch, noise.to(self.device), timesteps.to(self.device))

    def loss_for(self, batch: dict[str, Any], noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The loss of one batch for the given noise and timesteps (a float32 scalar on the device)."""
        latents = self.to_device(batch["latents"]).float() * self.scaling_factor
        noisy = noise_lib.add_noise(self.noise_scheduler, latents, noise, timesteps)
        target = noise_lib.target(self.model.prediction_type, self.noise_scheduler, latents, noise, timesteps)
        states = self.conditioning(batch["captions"])
        unet_dtype = next(self.model.unet.parameters()).dtype
        with self.autocast():
            pred = self.unet(noisy.to(unet_dtype), timesteps, states.to(unet_dtype)).sample
        if self.opts.min_snr_gamma is None:
            return torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="mean")
        per_sample = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none").mean(
            dim=tuple(range(1, pred.dim())))
        weights = noise_lib.min_snr_weights(self.model.prediction_type, self.noise_scheduler, timesteps,
                                            self.opts.min_snr_gamma)
        return (per_sample * weights).mean()

    def backward(self, group: list[dict[str, Any]]) -> torch.Tensor:
        """Forward and backward of a step's micro-batches (gradient accumulation); their mean loss, on the device."""
        step, total = self.progress.global_step, torch.zeros((), device=self.device)
        for i, batch in enumerate(group):
            index = step_batch_index(i, self.world, self.rank)
            no_sync = i < len(group) - 1 and self.world > 1 and self.unet is not self.model.unet
            with self.accelerator.no_sync(self.unet) if no_sync else contextlib.nullcontext(), \
                    seeded_global_rng(derived_seed(self.seed, step, index, 1), self.device) \
                    if self.target.uses_global_rng else contextlib.nullcontext():
                loss = self.loss(batch, step_generator(self.seed, step, index, self.device))
                scaled = loss * (batch["weight"] / len(group))
                (self.scaler.scale_loss(scaled) if self.scaler is not None else scaled).backward()
            total += loss.detach()
        return total / len(group)

    def finish_gradients(self) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """:func:`sdtune.train.precision.unscale_and_clip` of the trainable gradients."""
        grads = [p.grad for p in self.trainable if p.grad is not None]
        return unscale_and_clip(grads, self.scaler, self.opts.max_grad_norm, self.device)

    def optimizer_step(self, group: list[dict[str, Any]]) -> float:
        """One optimizer step over a group of micro-batches; returns the mean loss (of all ranks). The host waits
        for the device once: to read the loss, the overflow flag, the loss scale and whether any rank was asked to
        stop (tests/train/test_syncs.py counts it)."""
        loss = self.backward(group)
        self.target.reduce_gradients(self.accelerator)
        found_inf, factor = self.finish_gradients()
        scale = self.scaler.scale_tensor if self.scaler is not None else torch.ones((), device=self.device)
        flags = torch.stack([loss, found_inf.reshape(()), torch.tensor(float(self.stop.requested),
                                                                        device=self.device), scale.float()])
        if self.world > 1:  # the mean loss; any rank's overflow or stop; the scale (the same on every rank)
            flags = self.accelerator.reduce(flags, reduction="sum") / torch.tensor([self.world, 1, 1, self.world],
                                                                                   device=self.device)
        loss_value, overflow, stop, scale_value = flags.tolist()
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"the loss became {loss_value} at step {self.progress.global_step + 1}; training stopped. The last "
                "saved checkpoint is intact. Try a lower --learning_rate, --mixed_precision bf16, or no --full_fp16.")
        if self.scaler is not None:
            self.scaler.update(found_inf)
        if overflow:
            self.skip_step(scale_value * self.scaler.backoff_factor)
        else:
            step_with_factor(self.optimizer, [p.grad for p in self.trainable if p.grad is not None], factor)
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stop and not self.stop.requested:
            self.stop.signal_name = "SIGINT"  # another rank was interrupted: stop together
        return loss_value

    def skip_step(self, new_scale: float) -> None:
        logger.info("step %d: gradients overflowed in fp16; skipped, loss scale now %g", self.progress.global_step + 1,
                    new_scale)
        # The schedule follows the step count, skipped steps included; PyTorch warns that the optimizer has not
        # stepped yet when the very first step is the skipped one, which is intended here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.lr_scheduler.step()

    # -------------------------------------------------------------------------------------------- saving
    def _name(self, kind: str, number: int | None = None) -> str:
        base = self.opts.output_name
        if kind == "last":
            return base or "last"
        if kind == "epoch":
            return f"{base}-{number:06d}" if base else f"epoch-{number:06d}"
        return f"{base}-step{number:08d}" if base else f"step-{number:08d}"

    def _model_path(self, name: str) -> Path:
        return self.target.checkpoint_path(self.output_dir, name)

    def save(self, name: str) -> Path:
        """Save the checkpoint (and the state with --save_state) as ``name``; rank 0 only."""
        self.accelerator.wait_for_everyone()
        path = self._model_path(name)
        if self.is_main:
            with self._disk_full_reported(path):
                self.target.save_checkpoint(path, self.progress)
            self.saved.append(path)
            if self.opts.save_state:
                self.save_training_state(self.output_dir / f"{name}-state")
        self.accelerator.wait_for_everyone()
        return path

    @contextlib.contextmanager
    def _disk_full_reported(self, path: Path):
        """A full disk during a save is said as such (torch's own message is "unexpected pos"), with what is safe."""
        try:
            yield
        except Exception as exc:  # torch: RuntimeError, safetensors: SafetensorError, Python: OSError
            text = str(exc)
            if getattr(exc, "errno", None) != errno.ENOSPC and "No space left" not in text \
                    and "unexpected pos" not in text:
                raise
            earlier = [p for p in self.saved if p.exists()]
            kept = (f"the previous checkpoint {earlier[-1]} is intact" if earlier
                    else "no earlier checkpoint of this run was saved")
            raise SdtuneError(f"no space left on {path.parent} while saving {path.name}; nothing half-written was "
                              f"left, {kept}. Free some space (or use another --output_dir) and resume from the last "
                              "saved state with --resume") from exc

    def save_training_state(self, folder: Path) -> None:
        with self._disk_full_reported(folder):
            save_state(folder, self.progress, self.target.modules, self.optimizer, self.lr_scheduler,
                       self.scaler.state_dict() if self.scaler else None)
            write_provenance(folder, {"base_model": str(self.opts.pretrained_model_name_or_path),
                                      "base_fingerprint": self.base_fingerprint,
                                      "metadata_file": str(self.opts.in_json),
                                      "metadata_sha256": self.metadata_sha256,
                                      "clip_skip": self.clip_skip, "max_token_length": self.opts.max_token_length})
        logger.info("saved training state to %s", folder)

    def remove_resumed_interrupted_state(self) -> None:
        """After a finished run resumed from this folder's ``interrupted-state``, that state is spent: removed, so
        that a later ``--resume`` of the folder does not go back to it."""
        resumed = Path(self.opts.resume) if self.opts.resume else None
        spent = self.output_dir / "interrupted-state"
        if self.is_main and resumed is not None and spent.is_dir() and resumed.resolve() == spent.resolve():
            shutil.rmtree(spent)
            logger.info("removed %s: the run it resumed has finished", spent)

    def remove_old_epoch_saves(self, epoch: int) -> None:
        keep, every = self.opts.save_last_n_epochs, self.save_every_n_epochs
        if keep and every and epoch - keep * every >= 1:
            self._remove_save(self._name("epoch", epoch - keep * every))

    def remove_old_step_saves(self, step: int) -> None:
        """With --save_last_n_steps N: remove the newest step save that is more than N steps old (as sd-scripts;
        names are deterministic, so saves of an earlier session before --resume are found too)."""
        keep, every = self.opts.save_last_n_steps, self.opts.save_every_n_steps
        if not keep or not every:
            return
        old = step - keep - 1
        old -= old % every
        if old >= 1:
            self._remove_save(self._name("step", old))

    def _remove_save(self, name: str) -> None:
        if not self.is_main:
            return
        for path in (self._model_path(name), self.output_dir / f"{name}-state"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    # -------------------------------------------------------------------------------------------- logging
    def open_logs(self) -> None:
        if self.opts.logging_dir and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            run = Path(self.opts.logging_dir) / f"{self.opts.log_prefix}{time.strftime('%Y%m%d%H%M%S')}"
            self.writer = SummaryWriter(str(run))
            self.log_dir = run

    def log(self, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def announce(self) -> None:
        p, o = self.plan, self.opts
        if not self.is_main:
            return
        lines = [
            f"images: {p.images} (x{o.dataset_repeats} repeats), in {len(self.data.buckets.counts())} bucket(s)",
            f"batches per epoch (per process): {p.batches_per_epoch}; optimizer steps per epoch: {p.steps_per_epoch}",
            f"steps: {p.total_steps} over {p.epochs} epoch(s); effective batch {p.effective_batch} "
            f"({o.train_batch_size} x {o.gradient_accumulation_steps} accumulation x {self.world} process(es))",
            f"prediction: {self.model.prediction_type}; clip skip {self.clip_skip}; max tokens {o.max_token_length}; "
            f"seed {self.seed}",
            f"device: {self.device_description()}; precision: {self.precision_description()}",
            f"optimizer: {self.optimizer_description()}; attention: {attention_kind(o)}"
            + ("; gradient checkpointing" if o.gradient_checkpointing else ""),
            self.target.description,
        ]
        extras = [text.format(value) for text, value in (
            ("noise offset {:g}", o.noise_offset), ("min-SNR gamma {:g}", o.min_snr_gamma),
            ("caption dropout {:g}", o.caption_dropout_rate), ("tag dropout {:g}", o.caption_tag_dropout_rate),
            ("empty captions every {} epoch(s)", o.caption_dropout_every_n_epochs)) if value]
        if (o.min_timestep, o.max_timestep) != (0, 1000):
            extras.append(f"timesteps {o.min_timestep}-{o.max_timestep - 1}")
        if extras:
            lines.append("objective: " + "; ".join(extras))
        if self.data.skipped:
            lines.append(f"not trained (no train_resolution in the metadata): {len(self.data.skipped)} image(s)")
        if self.progress.global_step:
            lines.append(f"resuming at step {self.progress.global_step}, epoch {self.progress.epoch + 1}, "
                         f"batch {self.progress.batch_in_epoch}")
        for line in lines:
            logger.info(line)

    def device_description(self) -> str:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
        return str(self.device)

    def precision_description(self) -> str:
        o = self.opts
        if o.full_fp16:
            return "fp16 weights and gradients, dynamic loss scaling"
        if o.full_bf16:
            return "bf16 weights and gradients"
        if o.mixed_precision == "fp16":
            return "fp16 autocast, fp32 weights, dynamic loss scaling"
        if o.mixed_precision == "bf16":
            return "bf16 autocast, fp32 weights"
        return "fp32"

    def optimizer_description(self) -> str:
        o = self.opts
        name = optimizer_name(o)
        if isinstance(self.optimizer, HalfWeightAdamW):
            name += f" (fp32 moments, {self.optimizer.rounding} rounding of the half-precision weights)"
        schedule = o.lr_scheduler + (f" after {o.lr_warmup_steps} warm-up steps" if o.lr_warmup_steps else "")
        return f"{name}, learning rate {o.learning_rate:g}, {schedule}"

    # -------------------------------------------------------------------------------------------- the loop
    def step_groups(self):
        """The rest of the run's batches, grouped per optimizer step (a group never spans two epochs)."""
        o, p = self.opts, self.progress
        dataset = RunBatches(self.data, self.seed, o.train_batch_size, self.world, self.rank, self.caption_rules,
                             self.plan.epochs, p.epoch, p.batch_in_epoch)
        group: list[dict[str, Any]] = []
        for batch in run_loader(dataset, o.max_data_loader_n_workers, pin_memory=self.device.type == "cuda"):
            group.append(batch)
            if len(group) == o.gradient_accumulation_steps or batch["last_in_epoch"]:
                yield group
                group = []

    def claim_output_folder(self) -> None:
        """Before any model loads: every folder the run writes can be written, no other run holds it, and no earlier
        run's files would be replaced in silence."""
        opts = self.opts
        folders = [("--output_dir", self.output_dir)]
        if opts.logging_dir:
            folders.append(("--logging_dir", Path(opts.logging_dir)))
        if opts.sample_prompts:
            folders.append(("--sample_prompts: the samples folder", self.output_dir / "sample"))
        if self.is_main:
            check_writable(folders)
        self.run_lock.check()
        earlier = [] if opts.resume else earlier_run_files(self.output_dir, opts.output_name)
        if earlier and not opts.overwrite:
            names = ", ".join(p.name for p in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4
                                                               else "")
            raise SdtuneError(
                f"--output_dir {self.output_dir} holds an earlier run's files that this run would replace ({names}). "
                "Use another --output_dir or --output_name, --resume <its state folder> to continue that run, or "
                "--overwrite to delete them and start afresh")
        self.accelerator.wait_for_everyone()
        if self.is_main:
            self.run_lock.acquire()
            for folder in (self.output_dir, self.output_dir / "sample"):  # what a killed run left (issue 12 item 7)
                clean_stale_temporaries(folder)
            for path in earlier:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            if earlier:
                logger.warning("--overwrite: deleted the earlier run's %s from %s",
                               ", ".join(p.name for p in earlier), self.output_dir)
        self.accelerator.wait_for_everyone()

    def run(self) -> dict[str, Any]:
        self.claim_output_folder()
        try:
            return self._run()
        finally:
            self.run_lock.release()

    def _run(self) -> dict[str, Any]:
        self.setup()
        self.announce()
        self.open_logs()
        self.redo_cut_short_samples()
        opts, progress, plan = self.opts, self.progress, self.plan
        bar = tqdm(total=plan.total_steps, initial=progress.global_step, desc="train", unit="step",
                   disable=not self.is_main, dynamic_ncols=True, file=TolerantStream(sys.stderr))
        losses: list[float] = []
        epoch_losses: list[float] = []
        started = time.perf_counter()
        with self.stop:
            try:
                for group in self.step_groups():
                    if progress.global_step >= plan.total_steps:
                        break
                    self.in_step = True
                    loss = self.optimizer_step(group)
                    progress.global_step += 1
                    progress.batch_in_epoch += len(group)
                    self.in_step = False
                    losses.append(loss)
                    epoch_losses.append(loss)
                    self.report(bar, loss)
                    if self.stop.requested:
                        raise TrainingStopped(self.stop.signal_name)
                    self.step_saves()
                    self.after_step()
                    if group[-1]["last_in_epoch"]:
                        self.end_epoch(epoch_losses)
                        epoch_losses = []
            except KeyboardInterrupt as exc:
                self.interrupted(exc, bar)
                raise
        bar.close()
        elapsed = time.perf_counter() - started  # the training itself, not the final save
        final = self.save(self._name("last"))
        self.remove_resumed_interrupted_state()
        if self.writer is not None:
            self.writer.close()
        result = {
            "model": final, "saved": list(self.saved), "global_step": progress.global_step,
            "epoch": progress.epoch, "losses": losses,
            "steps_per_second": len(losses) / elapsed if elapsed > 0 else 0.0,
            "encoded_on_the_fly": self.encodes_on_the_fly,
        }
        if self.is_main:
            logger.info("done: %d steps (%.2f steps/s); saved to %s", progress.global_step,
                        result["steps_per_second"], final)
            if opts.save_state:
                logger.info("training state: %s", self.output_dir / f"{self._name('last')}-state")
            if self.writer is not None:
                logger.info("TensorBoard logs: %s (tensorboard --logdir %s)", self.log_dir, opts.logging_dir)
        return result

    def report(self, bar: tqdm, loss: float) -> None:
        step = self.progress.global_step
        lrs = self.lr_scheduler.get_last_lr()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", epoch=self.progress.epoch + 1)
        self.log({"loss/step": loss, **{f"lr/{name}": lr for name, lr in zip(self.target.group_names, lrs)}}, step)

    def step_saves(self) -> None:
        step, every = self.progress.global_step, self.opts.save_every_n_steps
        if every and step % every == 0 and step < self.plan.total_steps:
            self.save(self._name("step", step))
            self.remove_old_step_saves(step)

    def end_epoch(self, epoch_losses: list[float]) -> None:
        progress = self.progress
        if epoch_losses:
            self.log({"loss/epoch": float(np.mean(epoch_losses))}, progress.epoch + 1)
        progress.epoch += 1
        progress.batch_in_epoch = 0
        if self.save_every_n_epochs and progress.epoch % self.save_every_n_epochs == 0 \
                and progress.global_step < self.plan.total_steps:
            self.save(self._name("epoch", progress.epoch))
            self.remove_old_epoch_saves(progress.epoch)
        self.after_epoch()

    def interrupted(self, exc: KeyboardInterrupt, bar: tqdm) -> None:
        """Save the state (first: before any output, which may have nowhere to go) when the run stopped at a step
        boundary; a second Ctrl-C in the middle of a step saves nothing, as that state would be inconsistent."""
        state = self.output_dir / "interrupted-state"
        saved = False
        if self.opts.save_state and self.is_main and not self.in_step:
            self.save_training_state(state)
            saved = True
        bar.close()
        how = exc.signal_name if isinstance(exc, TrainingStopped) else "Ctrl-C"
        if saved:
            logger.info("stopped by %s after step %d: resume with --resume %s", how, self.progress.global_step, state)
        elif self.is_main:
            logger.info("stopped by %s at step %d%s", how, self.progress.global_step,
                        "" if self.opts.save_state else " (no --save_state: nothing to resume from)")

    # -------------------------------------------------------------------------------------------- samples
    def sample(self) -> list[Path]:
        """Sample the prompt file with the model as it is now (rank 0; the others wait)."""
        paths: list[Path] = []
        if self.is_main:
            from sdtune.train.samples import sample_during_training

            # lines without --w/--h: the size most of the data trained at, not the family's 512/768 px
            (width, height), _ = max(self.data.buckets.counts().items(), key=lambda item: item[1])
            paths = sample_during_training(
                self.model, self.opts.sample_prompts, self.output_dir / "sample", self.progress.global_step,
                self.progress.epoch, self.opts.sample_sampler, clip_skip=self.clip_skip,
                max_token_length=self.opts.max_token_length, device=self.device, seed=self.seed,
                writer=self.writer, output_name=self.opts.output_name, width=width, height=height,
                **self.target.sample_options())
        self.accelerator.wait_for_everyone()
        return paths

    def after_step(self) -> None:
        n = self.opts.sample_every_n_steps
        if self.opts.sample_prompts and n and self.progress.global_step % n == 0:
            self.sample()

    def redo_cut_short_samples(self) -> None:
        """On --resume: the samples due at the step the state was saved (a Ctrl-C during sampling saves the state of
        that step boundary, with none of its sample images written) are made now, so no sample step is missing."""
        o, p = self.opts, self.progress
        if not (o.resume and o.sample_prompts and p.global_step):
            return
        due = bool(o.sample_every_n_steps and p.global_step % o.sample_every_n_steps == 0) or bool(
            o.sample_every_n_epochs and p.batch_in_epoch == 0 and p.epoch and p.epoch % o.sample_every_n_epochs == 0)
        from sdtune.train.samples import sample_path

        if due and not sample_path(self.output_dir / "sample", o.output_name, p.global_step, 0).exists():
            if self.is_main:
                logger.info("step %d: its samples were cut short when the run stopped; making them now", p.global_step)
            self.sample()

    def after_epoch(self) -> None:
        n = self.opts.sample_every_n_epochs
        if self.opts.sample_prompts and n and self.progress.epoch % n == 0:
            self.sample()


def train(opts: TrainOptions) -> dict[str, Any]:
    return Trainer(opts).run()


def train_command(opts: TrainOptions) -> int:
    train(opts)
    return 0
