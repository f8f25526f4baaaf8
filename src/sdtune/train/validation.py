"""The validation loss: how well the model predicts images it never trains on, with noise and timesteps that never
change, so that two evaluations differ only because the weights did.

The training loss cannot say whether a run still learns or already over-fits: each step draws new timesteps, and
the loss depends mostly on them (near t = 0 the noise is easy to see, near 999 it is not), so it jumps by more than
it falls. A validation loss removes that noise (SimpleTuner's "stable loss", EveryDream2's fixed-seed validation):

- **the set**: ``--validation_split 0.05`` holds out 5 % of the images (at least one), chosen by a hash of each
  image's metadata key, so the same images whatever the seed, and never trained; or ``--validation_data_dir`` with
  ``--validation_in_json``, a separate folder prepared by ``sdtune prepare``;
- **fixed draws**: each image is scored at ``--validation_timesteps`` timesteps (4: one in each quarter of the
  trained range, at a place within it drawn once), each with its own noise; the draws come from the image's key
  alone, not from ``--seed``, so two runs on the same images are scored on the same problems and their curves
  compare. The caption is the plain one (no shuffle, no dropout); a ``--flip_aug`` image is always scored on the
  same one of its two latents;
- **the score**: the mean squared error of the prediction (weighted by the mask with ``--masked_loss``), without
  min-SNR weights, over every (image, timestep); also per quarter of the schedule (``loss/validation_q0..q3``,
  the quarters of the training loss's ``loss/q0..q3``);
- **how**: no gradients, every module in eval mode (dropout off) and then back as it was, with the weights a
  checkpoint would hold (the EMA average with ``--use_ema``, a schedule-free optimizer's evaluation weights);
  under DDP each process scores every N-th image and the sums are added, so the mean is that of one process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch
from torch import nn

from sdtune.atomic import write_json_atomic
from sdtune.data.dataset import FineTuneData
from sdtune.data.metadata import load_metadata
from sdtune.errors import SdtuneError
from sdtune.seeds import derived_rng, derived_seed
from sdtune.train.logs import TimestepQuartiles

if TYPE_CHECKING:
    from sdtune.train.options import TrainOptions

logger = logging.getLogger(__name__)

SALT = "sdtune-validation-1"  # the draws' only other input (change it and every curve starts again)


def held_out_keys(keys: list[str], share: float) -> set[str]:
    """The ``share`` of ``keys`` (rounded, at least one) first in the order of their SHA-256: the same keys for
    every seed and every order of the metadata, and mostly the same when images are added."""
    count = max(1, round(share * len(keys)))
    if count >= len(keys):
        raise SdtuneError(f"--validation_split {share:g} of {len(keys)} image(s) leaves none to train on; use a "
                          "smaller share, more images, or a separate --validation_data_dir")
    ranked = sorted(keys, key=lambda key: hashlib.sha256(key.encode("utf-8")).hexdigest())
    return set(ranked[:count])


def validation_set(opts: TrainOptions, data: FineTuneData) -> tuple[FineTuneData, Optional[FineTuneData]]:
    """(the images to train on, the validation images or None) as the options say."""
    if opts.validation_split > 0:
        return data.split(held_out_keys(sorted(data.examples), opts.validation_split))
    if opts.validation_data_dir:
        try:
            held = FineTuneData.from_metadata(load_metadata(opts.validation_in_json), opts.validation_data_dir,
                                              full_path=opts.full_path, recursive=opts.recursive,
                                              masks=opts.masked_loss, require_masks=False)
        except SdtuneError as exc:  # its messages speak of the training options
            raise SdtuneError(f"the validation set (--validation_data_dir {opts.validation_data_dir}, "
                              f"--validation_in_json {opts.validation_in_json}): {exc}") from exc
        both = sorted(set(held.examples) & set(data.examples))
        images = {ex.image.resolve() for ex in data.examples.values()}
        same = [key for key, ex in held.examples.items() if ex.image.resolve() in images]
        if same:
            raise SdtuneError(f"--validation_data_dir {opts.validation_data_dir}: {len(same)} of its images are "
                              f"training images too (e.g. {same[0]}); a validation image must never be trained")
        if both:
            logger.warning("%d validation image(s) share a metadata key with training images (e.g. %s): other "
                           "files, so they are scored, but check they are not copies", len(both), both[0])
        return data, held
    return data, None


@dataclass(frozen=True)
class ValidationSchedule:
    """When to validate: ``--validate_every_n_steps`` / ``--validate_every_n_epochs`` (neither: every epoch)."""

    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None

    @classmethod
    def from_options(cls, opts: TrainOptions) -> ValidationSchedule:
        """The schedule of the options."""
        if opts.validate_every_n_steps is None and opts.validate_every_n_epochs is None:
            return cls(None, 1)
        return cls(opts.validate_every_n_steps, opts.validate_every_n_epochs)

    def after_step(self, step: int) -> bool:
        """Validate after optimizer step ``step``?"""
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def after_epoch(self, epoch: int) -> bool:
        """Validate after epoch ``epoch`` (counting from 1)?"""
        return bool(self.every_n_epochs) and epoch % self.every_n_epochs == 0


def draw_timesteps(key: str, count: int, low: int, high: int) -> list[int]:
    """``count`` timesteps for image ``key``: one in each of ``count`` equal shares of ``[low, high)``, at a place
    within its share drawn once from the key."""
    places = derived_rng(SALT, "timesteps", key).random(count)
    width = (high - low) / count
    return [min(high - 1, low + int(math.floor((k + u) * width))) for k, u in enumerate(places)]


def draw_noise(key: str, k: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The noise of image ``key`` at its ``k``-th timestep (float32, on the CPU: the same on every device)."""
    generator = torch.Generator().manual_seed(derived_seed(SALT, "noise", key, k))
    return torch.randn(shape, generator=generator, dtype=torch.float32)


@contextlib.contextmanager
def eval_mode(modules: list[nn.Module]) -> Iterator[None]:
    """Every module (and sub-module) in eval mode inside; after, each back in its own mode."""
    modes = {m: m.training for root in modules for m in root.modules()}
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, training in modes.items():
            module.training = training


# Scores one batch: (batch, noise, timesteps) -> per-sample squared errors, float32, on the device
Scorer = Callable[[dict[str, Any], torch.Tensor, torch.Tensor], torch.Tensor]


class Validation:
    """The validation images, their fixed draws, and the evaluation (:meth:`totals`)."""

    def __init__(self, data: FineTuneData, batch_size: int, timesteps: int, low: int, high: int,
                 num_train_timesteps: int, world: int = 1, rank: int = 0) -> None:
        self.data, self.num_train_timesteps = data, num_train_timesteps
        keys = sorted(data.examples)
        self.images = len(keys)
        self.timesteps = {key: draw_timesteps(key, timesteps, low, high) for key in keys}
        mine = keys[rank::world]  # this process's share; the sums of all shares are the whole set's
        by_bucket: dict[tuple[int, int], list[str]] = {}
        for key in mine:
            by_bucket.setdefault(data.examples[key].bucket, []).append(key)
        self.batches = [group[i:i + batch_size] for _, group in sorted(by_bucket.items())
                        for i in range(0, len(group), batch_size)]

    def totals(self, score: Scorer, device: torch.device) -> torch.Tensor:
        """This process's sums per quarter of the schedule (:class:`TimestepQuartiles`' totals: row 0 the squared
        errors, row 1 their counts)."""
        quarters = TimestepQuartiles(self.num_train_timesteps, device)
        for keys in self.batches:
            batch = self.data.load_batch(keys, 0, derived_seed(SALT, "flip"))
            shape = tuple(batch["latents"].shape[1:])
            for k in range(len(self.timesteps[keys[0]])):
                noise = torch.stack([draw_noise(key, k, shape) for key in keys]).to(device)
                timesteps = torch.tensor([self.timesteps[key][k] for key in keys], device=device)
                quarters.add_errors(score(batch, noise, timesteps), timesteps)
        return quarters.totals

    @staticmethod
    def figures(totals: list[float]) -> dict[str, float]:
        """``loss/validation`` (every score) and ``loss/validation_q<i>`` (quarters with scores) from the 8 summed
        totals."""
        sums, counts = totals[:4], totals[4:]
        return {"loss/validation": sum(sums) / sum(counts),
                **TimestepQuartiles.figures(totals, prefix="loss/validation_q")}


@dataclass
class BestCheckpoint:
    """``--save_best``: the lowest validation loss so far and the step it was reached at."""

    loss: float = math.inf
    step: int = 0

    def improved(self, loss: float, step: int) -> bool:
        """Record ``loss`` at ``step``; True when it is the lowest yet (a tie keeps the earlier checkpoint)."""
        if not loss < self.loss:
            return False
        self.loss, self.step = loss, step
        return True

    def state_dict(self) -> dict[str, float]:
        """For the state folder (``validation.json``), so a resumed run only replaces a better checkpoint."""
        return {"loss": self.loss if math.isfinite(self.loss) else None, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values."""
        loss = state.get("loss")
        self.loss = math.inf if loss is None else float(loss)
        self.step = int(state.get("step", 0))


class ValidationRuns:
    """A run's validations: the set, when (the schedule), the losses so far and the best one (``--save_best``)."""

    def __init__(self, images: Validation, schedule: ValidationSchedule, is_main: bool) -> None:
        self.images, self.schedule, self.is_main = images, schedule, is_main
        self.best = BestCheckpoint()
        self.history: list[tuple[int, float]] = []  # (step, loss) of each validation of this session

    @classmethod
    def from_options(cls, opts: TrainOptions, held_out: FineTuneData, num_train_timesteps: int, world: int,
                     rank: int, is_main: bool) -> ValidationRuns:
        """The validations of a run with the validation images ``held_out``."""
        images = Validation(held_out, opts.train_batch_size, opts.validation_timesteps, opts.min_timestep,
                            opts.max_timestep, num_train_timesteps, world, rank)
        return cls(images, ValidationSchedule.from_options(opts), is_main)

    @property
    def last_step(self) -> Optional[int]:
        """The step of the latest validation of this session (None before the first)."""
        return self.history[-1][0] if self.history else None

    def record(self, step: int, loss: float) -> bool:
        """Note the loss of the validation at ``step`` and say it in the log; True when it is the best yet."""
        self.history.append((step, loss))
        best = self.best.improved(loss, step)
        if self.is_main:
            logger.info("step %d: validation loss %.6f (%s)", step, loss,
                        "the best so far" if best else f"best {self.best.loss:.6f} at step {self.best.step}")
        return best

    def summary(self) -> str:
        """The closing summary's line: first, last and best validation loss."""
        (first_step, first), (last_step, last) = self.history[0], self.history[-1]
        return (f"validation loss ({self.images.images} image(s)): {first:.6f} at step {first_step}, {last:.6f} at "
                f"step {last_step}; best {self.best.loss:.6f} at step {self.best.step}")


VALIDATION_FILE = "validation.json"  # in a --save_state folder: the best validation loss so far


def write_validation_state(folder: Path, best: BestCheckpoint) -> None:
    """Write the best loss into a state folder."""
    write_json_atomic(Path(folder) / VALIDATION_FILE, best.state_dict())


def read_validation_state(folder: Path) -> dict[str, Any]:
    """The best loss a state folder recorded (nothing when the run that wrote it had no validation set)."""
    path = Path(folder) / VALIDATION_FILE
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SdtuneError(f"{path}: damaged ({exc}); delete it to resume without the best loss so far (the next "
                          "validation then counts as the best)") from exc
    if not isinstance(state, dict):
        raise SdtuneError(f"{path}: damaged (not a JSON object); delete it to resume without the best loss so far")
    return state


__all__ = ["BestCheckpoint", "SALT", "Validation", "ValidationRuns", "ValidationSchedule", "draw_noise",
           "VALIDATION_FILE", "draw_timesteps", "eval_mode", "held_out_keys", "read_validation_state",
           "validation_set", "write_validation_state"]
