"""The start-up summary of ``sdtune train``: what the run will do, in a few lines of the log."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from sdtune.train.checkpoints import ema_name
from sdtune.train.optim import HalfWeightAdamW
from sdtune.train.options import TrainOptions, attention_kind, optimizer_name

if TYPE_CHECKING:
    from sdtune.train.loop import Trainer


def startup_lines(trainer: Trainer) -> list[str]:
    """The lines the trainer logs before the first step: data, plan, objective, device, precision, optimizer."""
    p, o = trainer.plan, trainer.opts
    lines = [
        f"images: {p.images} (x{o.dataset_repeats} repeats), in {len(trainer.data.buckets.counts())} bucket(s)",
        f"batches per epoch (per process): {p.batches_per_epoch}; optimizer steps per epoch: {p.steps_per_epoch}",
        f"steps: {p.total_steps} over {p.epochs} epoch(s); effective batch {p.effective_batch} "
        f"({o.train_batch_size} x {o.gradient_accumulation_steps} accumulation x {trainer.world} process(es))",
        f"prediction: {trainer.model.prediction_type}; clip skip {trainer.clip_skip}; max tokens "
        f"{o.max_token_length}; seed {trainer.seed}",
        f"device: {device_description(trainer.device)}; precision: {precision_description(o)}",
        f"optimizer: {optimizer_description(o, trainer.optimizer)}; attention: {attention_kind(o)}"
        + ("; gradient checkpointing" if o.gradient_checkpointing else ""),
        trainer.target.description,
    ]
    extras = [text.format(value) for text, value in (
        ("noise offset {:g}", o.noise_offset), ("min-SNR gamma {:g}", o.min_snr_gamma),
        ("caption dropout {:g}", o.caption_dropout_rate), ("tag dropout {:g}", o.caption_tag_dropout_rate),
        ("empty captions every {} epoch(s)", o.caption_dropout_every_n_epochs)) if value]
    if (o.min_timestep, o.max_timestep) != (0, 1000):
        extras.append(f"timesteps {o.min_timestep}-{o.max_timestep - 1}")
    if extras:
        lines.append("objective: " + "; ".join(extras))
    if trainer.validation is not None:
        lines.append(validation_description(trainer))
    if trainer.mask_counts is not None:
        counts = trainer.mask_counts
        lines.append(f"masked loss: {counts.with_mask} image(s) with a mask, {counts.without_mask} without (trained "
                     "whole" + (f"; {counts.encoded_on_the_fly} of them encoded at start-up, without their mask"
                                if counts.encoded_on_the_fly else "") + ")")
    if trainer.data.skipped:
        lines.append(f"not trained (no train_resolution in the metadata): {len(trainer.data.skipped)} image(s)")
    if trainer.progress.global_step:
        lines.append(f"resuming at step {trainer.progress.global_step}, epoch {trainer.progress.epoch + 1}, "
                     f"batch {trainer.progress.batch_in_epoch}")
    return lines


def closing_lines(trainer: Trainer, result: dict) -> list[str]:
    """The end-of-run summary: steps and speed, the final file, the state folder and the logs."""
    last = trainer.checkpoints.policy.name("last")
    lines = [f"done: {result['global_step']} steps ({result['steps_per_second']:.2f} steps/s); saved to "
             f"{result['model']}"]
    if trainer.validation is not None and trainer.validation.history:
        lines.append(trainer.validation.summary())
        if trainer.opts.save_best:
            best = trainer.checkpoints.model_path(trainer.checkpoints.policy.name("best"))
            lines.append(f"best checkpoint: {best} (step {trainer.validation.best.step})")
    if trainer.opts.save_ema_separately:
        lines.append(f"EMA weights: {trainer.checkpoints.model_path(ema_name(last))} (the "
                     "model file holds the training weights)")
    if trainer.opts.save_state:
        lines.append(f"training state: {trainer.checkpoints.state_folder(last)}")
    if trainer.logs.folder is not None:
        lines.append(f"TensorBoard logs: {trainer.logs.folder} (tensorboard --logdir {trainer.opts.logging_dir})")
    return lines


def validation_description(trainer: Trainer) -> str:
    """The validation set and schedule, in words."""
    o, schedule = trainer.opts, trainer.validation.schedule
    source = (f"held out of the training images ({o.validation_split:g}), never trained" if o.validation_split
              else f"from {o.validation_data_dir}")
    when = [f"every {n} {unit}(s)" for n, unit in ((schedule.every_n_steps, "step"),
                                                  (schedule.every_n_epochs, "epoch")) if n]
    return (f"validation: {trainer.validation.images.images} image(s) {source}; {o.validation_timesteps} fixed "
            f"timestep(s) each; {' and '.join(when)}, at the start and at the end"
            + ("; the best kept (--save_best)" if o.save_best else ""))


def device_description(device: torch.device) -> str:
    """The device, with the GPU's name."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)

def precision_description(o: TrainOptions) -> str:
    """What runs in which precision, in words."""
    if o.full_fp16:
        return "fp16 weights and gradients, dynamic loss scaling"
    if o.full_bf16:
        return "bf16 weights and gradients"
    if o.mixed_precision == "fp16":
        return "fp16 autocast, fp32 weights, dynamic loss scaling"
    if o.mixed_precision == "bf16":
        return "bf16 autocast, fp32 weights"
    return "fp32"

def optimizer_description(o: TrainOptions, optimizer: torch.optim.Optimizer) -> str:
    """The optimizer, its learning rate and schedule, in words."""
    name = optimizer_name(o)
    if isinstance(optimizer, HalfWeightAdamW):
        name += f" (fp32 moments, {optimizer.rounding} rounding of the half-precision weights)"
    schedule = o.lr_scheduler + (f" after {o.lr_warmup_steps} warm-up steps" if o.lr_warmup_steps else "")
    return f"{name}, learning rate {o.learning_rate:g}, {schedule}"
