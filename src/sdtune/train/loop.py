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
import functools
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm import tqdm

from sdtune.data.dataset import CaptionRules, FineTuneData, RunBatches, run_loader
from sdtune.data.metadata import load_metadata
from sdtune.errors import SdtuneError
from sdtune.models.compile import recompile_limit, recompile_room
from sdtune.models.text import encode, tokenize
from sdtune.precision_names import autocast_dtype_of
from sdtune.seeds import derived_seed
from sdtune.train import noise as noise_lib
from sdtune.train.accelerator import make_accelerator
from sdtune.train.base_model import load_base_model, resolve_clip_skip
from sdtune.train.checkpoints import Checkpoints, SavePolicy
from sdtune.train.ema import EMA_FILE, Ema, ema_weights
from sdtune.train.fused_backward import FusedBackward
from sdtune.train.interrupt import StopRequest, TrainingStopped, report_stop
from sdtune.train.logs import RunLogs, TimestepQuartiles, progress_bar
from sdtune.train.lora_metadata import training_metadata
from sdtune.train.optim import build_lr_scheduler, evaluation_weights, run_optimizer, step_with_factor
from sdtune.train.options import TrainOptions, plan_run, validate
from sdtune.train.precision import LossScaler, unscale_and_clip
from sdtune.train.provenance import file_sha256, write_provenance
from sdtune.train.rng import seeded_global_rng, step_batch_index, step_generator
from sdtune.train.run_folder import RunLock, claim_output_folder, remove_spent_interrupted_state
from sdtune.train.samples import SamplePolicy, sample_during_training, sample_path
from sdtune.train.state import (
    load_optimizer_and_scheduler,
    load_pickled_state,
    resolve_resume,
    save_state,
    start_progress,
)
from sdtune.train.summary import closing_lines, startup_lines
from sdtune.train.targets import TrainTarget, make_target
from sdtune.train.text_cache import text_encoder_cache
from sdtune.train.validation import (
    Validation,
    ValidationRuns,
    eval_mode,
    read_validation_state,
    validation_set,
    write_validation_state,
)

logger = logging.getLogger(__name__)


class TrainingDiverged(SdtuneError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------------ the trainer
class Trainer:
    """One run, fully built by the constructor: options checked, output folder claimed, data read, model loaded,
    target, optimizer, schedule and loss scaler made (and restored with ``--resume``). :meth:`run` is the loop."""

    def __init__(self, opts: TrainOptions) -> None:
        if opts.resume:
            opts = dataclasses.replace(opts, resume=str(resolve_resume(Path(opts.resume))))
        validate(opts)
        self.opts = opts
        self.accelerator = make_accelerator()
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.output_dir = Path(opts.output_dir)
        self.progress, self.provenance = start_progress(opts, self.world, self.is_main,
                                                        lambda: self.metadata_sha256)
        self.seed = self.progress.seed
        self.caption_rules = CaptionRules(
            shuffle=opts.shuffle_caption, keep_tokens=opts.keep_tokens, dropout_rate=opts.caption_dropout_rate,
            dropout_every_n_epochs=opts.caption_dropout_every_n_epochs, tag_dropout_rate=opts.caption_tag_dropout_rate)
        self.logs = RunLogs(opts.logging_dir, opts.log_prefix, self.is_main)
        self.samples = SamplePolicy.from_options(opts)
        self.stop = StopRequest()
        self.in_step = False
        self.update_figures: dict[str, torch.Tensor] = {}
        self.quartile_figures: dict[str, float] = {}
        self.run_lock = RunLock(self.output_dir)
        # before any model loads: a folder that cannot be written, or another run's, fails now
        claim_output_folder(opts, self.run_lock, self.is_main, self.accelerator.wait_for_everyone)
        try:
            self._build()
        except BaseException:
            self.run_lock.release()
            raise

    def _build(self) -> None:
        """Data, model, target, optimizer, schedule, scaler: the parts the loop runs (in this order: a bad
        --in_json must not cost a full model load)."""
        opts = self.opts
        self.data = FineTuneData.from_metadata(load_metadata(opts.in_json), opts.train_data_dir,
                                               opts.dataset_repeats, opts.full_path, opts.recursive, opts.masked_loss)
        self.data, held_out = validation_set(opts, self.data)
        self.model, self.base_fingerprint = load_base_model(opts, self.accelerator, self.provenance)
        self.clip_skip = resolve_clip_skip(opts, self.model.family, self.provenance, self.is_main)
        self.encodes_on_the_fly, self.scaling_factor = self._encode_missing_latents(held_out)
        buckets = {ex.bucket for data in (self.data, held_out) if data is not None for ex in data.examples.values()}
        self.recompile_limit = recompile_limit(self.model.unet, len(buckets))  # --torch_compile: room for them all
        self.mask_counts = self.data.check_masks() if opts.masked_loss else None
        self.noise_scheduler = self.model.noise_scheduler()
        # on the device once: the noise coefficients are looked up every step without a copy
        self.noise_scheduler.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        self.validation = None if held_out is None else ValidationRuns.from_options(
            opts, held_out, self.noise_scheduler.config.num_train_timesteps, self.world, self.rank, self.is_main)
        self.quartiles = TimestepQuartiles(self.noise_scheduler.config.num_train_timesteps, self.device) \
            if opts.logging_dir else None  # on every rank: its sums join the step's one reduce
        batches = len(self.data.epoch_batches(0, self.seed, opts.train_batch_size, self.world, self.rank))
        self.plan = plan_run(opts, len(self.data.examples), batches, self.world)
        self.target = self._make_target()
        self.trainable = [p for g in self.target.param_groups for p in g["params"]]
        self.optimizer = run_optimizer(opts, self.target.param_groups, self.seed, self.is_main)
        self.fused_backward = FusedBackward(self.optimizer, self.trainable, opts.max_grad_norm) \
            if opts.fused_backward_pass else None
        self.ema = Ema(self.trainable, opts.ema_decay, opts.ema_inv_gamma, opts.ema_power,
                       opts.ema_device) if opts.use_ema else None
        self.checkpoints = self._make_checkpoints()
        self.lr_scheduler = build_lr_scheduler(opts.lr_scheduler, self.optimizer, opts.lr_warmup_steps,
                                               self.plan.total_steps, opts.lr_scheduler_num_cycles,
                                               opts.lr_scheduler_power)
        # fp16 gradients underflow without loss scaling, under autocast as with fp16 weights; bf16 has fp32's range
        self.scaler = LossScaler(self.device) if opts.mixed_precision == "fp16" else None
        if opts.resume:
            scaler_state = load_optimizer_and_scheduler(Path(opts.resume), self.optimizer, self.lr_scheduler)
            if self.ema is not None:
                self.ema.load(load_pickled_state(Path(opts.resume), EMA_FILE))
            if self.validation is not None:
                self.validation.best.load_state_dict(read_validation_state(Path(opts.resume)))
            if self.scaler is not None and scaler_state:
                self.scaler.load_state_dict(scaler_state)
        self.unet, self.text_encoder = self.target.prepare(self.accelerator)
        examples = [*self.data.examples.values(), *(held_out.examples.values() if held_out is not None else ())]
        self.text_cache = text_encoder_cache(opts, examples, self.model, self.target, self.clip_skip, self.is_main,
                                             self.encode_captions) if opts.cache_text_encoder_outputs else None
        if self.text_cache is not None:
            self.model.text_encoder.to("cpu")  # samples bring it back for their call

    # -------------------------------------------------------------------------------------------- set-up
    @functools.cached_property
    def metadata_sha256(self) -> str:
        """The --in_json file's hash, read once a run (every state records it; --resume compares it)."""
        return file_sha256(self.opts.in_json)

    def _encode_missing_latents(self, held_out: Optional[FineTuneData]) -> tuple[int, float]:
        """Encode what the latent caches (training and validation images) lack, then move the VAE off the device;
        (images encoded, scaling factor)."""
        vae = self.model.vae
        vae.to(self.device)
        encoded = sum(data.encode_missing(vae) for data in (self.data, held_out) if data is not None)
        if encoded:
            logger.info("encoded %d image(s) whose latent cache was missing or stale (run sdtune prepare to cache "
                        "them)", encoded)
        vae.to("cpu")  # not needed any more: free the GPU memory
        return encoded, float(vae.config.scaling_factor)

    def _make_target(self) -> TrainTarget:
        opts = self.opts
        weight_dtype = torch.float16 if opts.full_fp16 else torch.bfloat16 if opts.full_bf16 else torch.float32
        run_metadata = training_metadata(opts, self.data, self.plan, self.seed, self.clip_skip, self.world) \
            if opts.network_module else None
        target = make_target(opts, self.model, self.device, weight_dtype, self.seed, self.clip_skip, run_metadata)
        if opts.resume:
            target.load_state(Path(opts.resume))
        return target

    def _make_checkpoints(self) -> Checkpoints:
        target = self.target
        return Checkpoints(
            self.output_dir, SavePolicy.from_options(self.opts, self.plan.total_steps, self.plan.epochs),
            model_path=lambda name: target.checkpoint_path(self.output_dir, name),
            write_model=self.save_model,
            write_state=self.write_training_state if self.opts.save_state else None,
            is_main=self.is_main, barrier=self.accelerator.wait_for_everyone,
            write_ema=functools.partial(self.save_model, average=True) if self.opts.save_ema_separately else None)

    # -------------------------------------------------------------------------------------------- the loop
    def run(self) -> dict[str, Any]:
        """Train to the end (or to a stop request), save the final checkpoint; returns what the run did."""
        try:
            self.announce()
            self.logs.open()
            self.redo_cut_short_samples()
            if self.validation is not None and self.progress.global_step == 0:
                self.validate()  # where the curve starts
            progress = self.progress
            bar = progress_bar(self.plan.total_steps, progress.global_step, self.is_main)
            losses: list[float] = []
            epoch_losses: list[float] = []
            started = time.perf_counter()
            with self.stop:
                try:
                    for group in self.step_groups():
                        if progress.global_step >= self.plan.total_steps:
                            break
                        loss = self.step(group)
                        losses.append(loss)
                        epoch_losses.append(loss)
                        self.report(bar, loss)
                        if self.stop.requested:
                            raise TrainingStopped(self.stop.signal_name)
                        self.after_step()
                        if group[-1]["last_in_epoch"]:
                            self.end_epoch(epoch_losses)
                            epoch_losses = []
                except KeyboardInterrupt as exc:
                    self.interrupted(exc, bar)
                    raise
                bar.close()
                result = self.finish(losses, time.perf_counter() - started)  # a signal now waits for the save
            if self.stop.requested and self.is_main:
                logger.info("%s arrived during the final save, after the last step: the run is complete",
                            self.stop.signal_name)
            return result
        finally:
            self.run_lock.release()

    def step(self, group: list[dict[str, Any]]) -> float:
        """One optimizer step, counted; a stop request in the middle of it waits for its end."""
        self.in_step = True
        loss = self.optimizer_step(group)
        self.progress.global_step += 1
        self.progress.batch_in_epoch += len(group)
        self.in_step = False
        return loss

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

    def after_step(self) -> None:
        """The validation, saves and samples due after this step."""
        if self.validation is not None and self.validation.schedule.after_step(self.progress.global_step):
            self.validate()
        self.checkpoints.after_step(self.progress.global_step)
        if self.samples.after_step(self.progress.global_step):
            self.sample()

    def end_epoch(self, epoch_losses: list[float]) -> None:
        """Count the epoch; log its mean loss; the saves and samples due after it."""
        progress = self.progress
        if epoch_losses:
            self.logs.scalars({"loss/epoch": float(np.mean(epoch_losses))}, progress.epoch + 1)
        progress.epoch += 1
        progress.batch_in_epoch = 0
        if self.validation is not None and self.validation.schedule.after_epoch(progress.epoch) \
                and self.validation.last_step != progress.global_step:
            self.validate()
        self.checkpoints.after_epoch(progress.epoch, progress.global_step)
        if self.samples.after_epoch(progress.epoch):
            self.sample()

    def finish(self, losses: list[float], elapsed: float) -> dict[str, Any]:
        """The final save and the closing summary; ``elapsed`` is the training itself, not the final save."""
        progress = self.progress
        if self.validation is not None and self.validation.last_step != progress.global_step:
            self.validate()  # where the curve ends
        final = self.save(self.checkpoints.policy.name("last"))
        if self.is_main:
            remove_spent_interrupted_state(self.output_dir, self.opts.resume)
        self.logs.close()
        result = {
            "model": final, "saved": list(self.saved), "global_step": progress.global_step,
            "epoch": progress.epoch, "losses": losses,
            "steps_per_second": len(losses) / elapsed if elapsed > 0 else 0.0,
            "encoded_on_the_fly": self.encodes_on_the_fly,
            "validation": list(self.validation.history) if self.validation is not None else [],
        }
        if self.is_main:
            for line in closing_lines(self, result):
                logger.info("%s", line)
        return result

    def interrupted(self, exc: KeyboardInterrupt, bar: tqdm) -> None:
        """Save the state (first: before any output, which may have nowhere to go) when the run stopped at a step
        boundary; a second Ctrl-C in the middle of a step saves nothing, as that state would be inconsistent."""
        saves = self.opts.save_state and self.is_main and not self.in_step
        report_stop(exc, bar, self.output_dir / "interrupted-state", self.checkpoints.save_state if saves else None,
                    self.progress.global_step, self.is_main, self.opts.save_state)

    # -------------------------------------------------------------------------------------------- the step
    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to the --mixed_precision dtype on the training device; nothing for ``no``."""
        dtype = autocast_dtype_of(self.opts.mixed_precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device; from pinned memory the copy does not make the host wait."""
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def conditioning(self, captions: list[str], text_encoder: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """The text encoder's hidden states for a batch's captions (--cache_text_encoder_outputs: from the cache)."""
        if self.text_cache is not None:
            return self.to_device(self.text_cache(captions))
        return self.encode_captions(captions, text_encoder)

    def encode_captions(self, captions: list[str], text_encoder: Optional[torch.nn.Module] = None) -> torch.Tensor:
        """The text encoder's hidden states for ``captions`` (with gradients when it is trained, outside
        ``torch.no_grad``); ``text_encoder``: another call of the same encoder (the module, not its DDP wrapper)."""
        tok = self.model.tokenizer
        ids = self.to_device(tokenize(tok, captions, self.opts.max_token_length))
        with torch.set_grad_enabled(self.target.trains_text_encoder and torch.is_grad_enabled()), self.autocast():
            return encode(text_encoder or self.text_encoder, ids, self.clip_skip, tok.eos_token_id, tok.pad_token_id)

    def draw(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The noise and timesteps of one batch, from its generator."""
        return noise_lib.sample_noise_and_timesteps(
            batch["latents"], self.noise_scheduler.config.num_train_timesteps, generator, self.opts.noise_offset,
            self.opts.min_timestep, self.opts.max_timestep)

    def loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The loss of one batch, with noise and timesteps drawn from ``generator``."""
        noise, timesteps = self.draw(batch, generator)
        return self.loss_for(batch, noise.to(self.device), timesteps.to(self.device))

    def predict(self, batch: dict[str, Any], noise: torch.Tensor, timesteps: torch.Tensor,
                unwrapped: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(the U-Net's prediction, what it should predict) for one batch, the given noise and timesteps;
        ``unwrapped``: through the modules themselves, not their DDP wrappers (validation: ranks run different
        numbers of forward passes, which DDP's wrappers must not see)."""
        latents = self.to_device(batch["latents"]).float() * self.scaling_factor
        noisy = noise_lib.add_noise(self.noise_scheduler, latents, noise, timesteps)
        target = noise_lib.target(self.model.prediction_type, self.noise_scheduler, latents, noise, timesteps)
        states = self.conditioning(batch["captions"], self.model.text_encoder if unwrapped else None)
        unet_dtype = next(self.model.unet.parameters()).dtype
        with self.autocast(), recompile_room(self.opts.torch_compile, self.recompile_limit):
            pred = (self.model.unet if unwrapped else self.unet)(noisy.to(unet_dtype), timesteps,
                                                                 states.to(unet_dtype)).sample
        return pred, target

    def loss_for(self, batch: dict[str, Any], noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The loss of one batch for the given noise and timesteps (a float32 scalar on the device)."""
        pred, target = self.predict(batch, noise, timesteps)
        mask = batch.get("masks")  # --masked_loss
        mask = None if mask is None else self.to_device(mask)
        if self.quartiles is not None:
            self.quartiles.add(pred, target, timesteps, mask)
        return noise_lib.prediction_loss(self.model.prediction_type, self.noise_scheduler, pred, target, timesteps,
                                         self.opts.min_snr_gamma, mask)

    def backward(self, group: list[dict[str, Any]]) -> torch.Tensor:
        """Forward and backward of a step's micro-batches (gradient accumulation); their mean loss, on the device."""
        step, total = self.progress.global_step, torch.zeros((), device=self.device)
        if self.quartiles is not None:
            self.quartiles.reset()
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
        if self.fused_backward is not None:  # stepped, clipped and freed during backward
            return torch.zeros(1, device=self.device), None
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
        if self.quartiles is not None:  # the loss by timestep quarter, read in the same wait
            flags = torch.cat([flags, self.quartiles.totals.flatten()])
        if self.world > 1:  # the mean loss; any rank's overflow or stop; the scale (the same on every rank); sums
            divisors = torch.ones_like(flags)
            divisors[0] = divisors[3] = self.world
            flags = self.accelerator.reduce(flags, reduction="sum") / divisors
        loss_value, overflow, stop, scale_value, *quarters = flags.tolist()
        self.quartile_figures = TimestepQuartiles.figures(quarters) if quarters else {}
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"the loss became {loss_value} at step {self.progress.global_step + 1}; training stopped. The last "
                "saved checkpoint is intact. Try a lower --learning_rate, --mixed_precision bf16, or no --full_fp16.")
        if self.scaler is not None:
            self.scaler.update(found_inf)
        if overflow:
            self.skip_step(scale_value * self.scaler.backoff_factor)
        else:
            if self.fused_backward is None:
                step_with_factor(self.optimizer, [p.grad for p in self.trainable if p.grad is not None], factor)
            self.lr_scheduler.step()
            self.update_figures = self.target.after_update()
            if self.ema is not None:
                self.ema.step()
        self.optimizer.zero_grad(set_to_none=True)
        if stop and not self.stop.requested:
            self.stop.signal_name = "SIGINT"  # another rank was interrupted: stop together
        return loss_value

    def skip_step(self, new_scale: float) -> None:
        """An fp16 overflow: no update this step, but the schedule moves on; the log says the new loss scale."""
        logger.info("step %d: gradients overflowed in fp16; skipped, loss scale now %g", self.progress.global_step + 1,
                    new_scale)
        # The schedule follows the step count, skipped steps included; PyTorch warns that the optimizer has not
        # stepped yet when the very first step is the skipped one, which is intended here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.lr_scheduler.step()

    # -------------------------------------------------------------------------------------------- validation
    def validate(self) -> dict[str, float]:
        """Score the validation set (:mod:`sdtune.train.validation`) with the weights a checkpoint would hold, in
        eval mode; log the losses; with --save_best save the model when it is the best yet. Every process calls
        it at the same steps (its share is added to the others')."""
        modules = [self.model.unet, self.model.text_encoder, *self.target.modules.values()]
        with torch.no_grad(), evaluation_weights(self.optimizer), ema_weights(self.ema), eval_mode(modules):
            totals = self.validation.images.totals(self.score, self.device)
        if self.world > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        figures = Validation.figures(totals.flatten().tolist())
        step = self.progress.global_step
        self.logs.scalars(figures, step)
        if self.validation.record(step, figures["loss/validation"]) and self.opts.save_best:
            self.checkpoints.save(self.checkpoints.policy.name("best"), with_state=False)
        return figures

    def score(self, batch: dict[str, Any], noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Each validation image's mean squared error at the given noise and timesteps (weighted by its mask)."""
        pred, target = self.predict(batch, noise, timesteps, unwrapped=True)
        return noise_lib.per_sample_errors(pred, target, batch.get("masks"))

    # -------------------------------------------------------------------------------------------- saving
    @property
    def saved(self) -> list[Path]:
        """The checkpoints this run wrote, in order."""
        return self.checkpoints.saved

    def save(self, name: str) -> Path:
        """Save the checkpoint (and the state with --save_state) as ``name``; rank 0 writes, the others wait."""
        return self.checkpoints.save(name)

    def save_model(self, path: Path, average: Optional[bool] = None) -> None:
        """Write the target's checkpoint file; with a schedule-free optimizer its evaluation weights (the state
        keeps the training ones, for an exact --resume). With --use_ema the average, unless ``average`` is false
        (by default: with --save_ema_separately the model holds the training weights, its ``-ema`` copy the average)."""
        if average is None:
            average = not self.opts.save_ema_separately
        with evaluation_weights(self.optimizer), ema_weights(self.ema if average else None):
            self.target.save_checkpoint(path, self.progress)

    def write_training_state(self, folder: Path) -> None:
        """The --save_state folder: trained weights, optimizer, schedule, scaler, progress and provenance."""
        save_state(folder, self.progress, self.target.modules, self.optimizer, self.lr_scheduler,
                   self.scaler.state_dict() if self.scaler else None)
        if self.ema is not None:
            self.ema.save(folder)
        if self.validation is not None:
            write_validation_state(folder, self.validation.best)
        write_provenance(folder, {"base_model": str(self.opts.pretrained_model_name_or_path),
                                  "base_fingerprint": self.base_fingerprint,
                                  "metadata_file": str(self.opts.in_json),
                                  "metadata_sha256": self.metadata_sha256,
                                  "clip_skip": self.clip_skip, "max_token_length": self.opts.max_token_length,
                                  "validation_split": self.opts.validation_split})

    # -------------------------------------------------------------------------------------------- reports
    def announce(self) -> None:
        """The start-up summary (:func:`sdtune.train.summary.startup_lines`), on the main process."""
        if self.is_main:
            for line in startup_lines(self):
                logger.info(line)

    def report(self, bar: tqdm, loss: float) -> None:
        """The step's loss and learning rates: on the progress bar and in TensorBoard."""
        step = self.progress.global_step
        lrs = self.lr_scheduler.get_last_lr()
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}", epoch=self.progress.epoch + 1)
        figures = {f"lr/{name}": lr for name, lr in zip(self.target.group_names, lrs)} | self.quartile_figures
        if self.update_figures and self.logs.writer is not None:  # one more wait, only when they are logged
            figures.update({f"network/{k}": float(v) for k, v in self.update_figures.items()})
        self.logs.scalars({"loss/step": loss, **figures}, step)

    # -------------------------------------------------------------------------------------------- samples
    def sample(self) -> list[Path]:
        """Sample the prompt file with the model as it is now (rank 0; the others wait)."""
        paths: list[Path] = []
        if self.is_main:
            # lines without --w/--h: the size most of the data trained at, not the family's 512/768 px
            (width, height), _ = max(self.data.buckets.counts().items(), key=lambda item: item[1])
            with evaluation_weights(self.optimizer), ema_weights(self.ema):  # what a checkpoint would hold
                paths = sample_during_training(
                    self.model, self.opts.sample_prompts, self.output_dir / "sample", self.progress.global_step,
                    self.progress.epoch, self.opts.sample_sampler, clip_skip=self.clip_skip,
                    max_token_length=self.opts.max_token_length, device=self.device, seed=self.seed,
                    writer=self.logs.writer, output_name=self.opts.output_name, width=width, height=height,
                    **self.target.sample_options())
        self.accelerator.wait_for_everyone()
        return paths

    def redo_cut_short_samples(self) -> None:
        """On --resume: the samples due at the step the state was saved (a Ctrl-C during sampling saves the state of
        that step boundary, with none of its sample images written) are made now, so no sample step is missing."""
        p = self.progress
        if not (self.opts.resume and self.samples.due_at(p.global_step, p.epoch, p.batch_in_epoch)):
            return
        if not sample_path(self.output_dir / "sample", self.opts.output_name, p.global_step, 0).exists():
            if self.is_main:
                logger.info("step %d: its samples were cut short when the run stopped; making them now", p.global_step)
            self.sample()


def train(opts: TrainOptions) -> dict[str, Any]:
    """Train as ``opts`` say; returns what the run did (the final model, saves, steps, losses, speed)."""
    return Trainer(opts).run()


def train_command(opts: TrainOptions) -> int:
    """``sdtune train``: exit code 0 after a finished run (errors raise)."""
    train(opts)
    return 0
