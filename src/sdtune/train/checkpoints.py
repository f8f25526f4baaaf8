"""Which checkpoints a run writes, when, under which names, and which it removes again.

:class:`SavePolicy` is the arithmetic (names, "save now?", "which save is too old now?"), pure and testable without a
model. :class:`Checkpoints` writes and removes saves through the callables the trainer gives it (the target's
checkpoint writer, the training-state writer), remembers what it saved, and turns a full disk into a message that
says what is safe. Names follow sd-scripts: ``last``, ``epoch-000003`` / ``<name>-000003``, ``step-00000500`` /
``<name>-step00000500``; a state folder is ``<save name>-state``; ``--save_best`` keeps ``best`` / ``<name>-best``.
With ``--save_ema_separately`` every save is two models: ``<save name>`` (the training weights) and
``<save name>-ema`` beside it in the same format (the EMA weights: ``last.safetensors`` + ``last-ema.safetensors``,
``step-00000004/`` + ``step-00000004-ema/``); both are listed in :attr:`Checkpoints.saved` (the run's
``result["saved"]``), the ``-ema`` one after its model, and rotation removes both (the state folder is one, of the
save name).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

EMA_SUFFIX = "-ema"


def ema_name(name: str) -> str:
    """The name of the EMA copy of the save ``name`` (``--save_ema_separately``)."""
    return f"{name}{EMA_SUFFIX}"


@dataclass(frozen=True)
class SavePolicy:
    """When a run saves and which saves it keeps (``--save_every_n_*``, ``--save_last_n_*``, ``--output_name``)."""

    output_name: Optional[str] = None
    total_steps: int = 0
    every_n_steps: Optional[int] = None
    every_n_epochs: Optional[int] = None
    last_n_steps: Optional[int] = None
    last_n_epochs: Optional[int] = None

    @classmethod
    def from_options(cls, opts, total_steps: int, epochs: int) -> SavePolicy:
        """The policy of ``sdtune train``'s options; ``--save_n_epoch_ratio N`` saves every max(1, epochs // N)."""
        every_n_epochs = opts.save_every_n_epochs
        if opts.save_n_epoch_ratio:
            every_n_epochs = max(1, epochs // opts.save_n_epoch_ratio)
        return cls(opts.output_name, total_steps, opts.save_every_n_steps, every_n_epochs, opts.save_last_n_steps,
                   opts.save_last_n_epochs)

    def name(self, kind: str, number: Optional[int] = None) -> str:
        """The save called ``kind`` ("last", "epoch" or "step") at ``number``."""
        base = self.output_name
        if kind == "last":
            return base or "last"
        if kind == "epoch":
            return f"{base}-{number:06d}" if base else f"epoch-{number:06d}"
        if kind == "step":
            return f"{base}-step{number:08d}" if base else f"step-{number:08d}"
        if kind == "best":  # --save_best: the lowest validation loss so far, replaced when beaten
            return f"{base}-best" if base else "best"
        raise ValueError(f"no save kind {kind!r}")

    def step_save_due(self, step: int) -> bool:
        """Save after optimizer step ``step``? Not at the last step: the final save covers it."""
        every = self.every_n_steps
        return bool(every) and step % every == 0 and step < self.total_steps

    def epoch_save_due(self, epoch: int, step: int) -> bool:
        """Save after epoch ``epoch`` (counting from 1), reached at ``step``? Not when the run ends there."""
        every = self.every_n_epochs
        return bool(every) and epoch % every == 0 and step < self.total_steps

    def expired_epoch_save(self, epoch: int) -> Optional[str]:
        """With ``--save_last_n_epochs N``: the epoch save that is one too many after saving epoch ``epoch``."""
        keep, every = self.last_n_epochs, self.every_n_epochs
        if keep and every and epoch - keep * every >= 1:
            return self.name("epoch", epoch - keep * every)
        return None

    def expired_step_save(self, step: int) -> Optional[str]:
        """With ``--save_last_n_steps N``: the newest step save more than N steps old after saving step ``step`` (as
        sd-scripts; names are deterministic, so the saves of a session before ``--resume`` are found too)."""
        keep, every = self.last_n_steps, self.every_n_steps
        if not keep or not every:
            return None
        old = step - keep - 1
        old -= old % every
        return self.name("step", old) if old >= 1 else None


def _no_barrier() -> None:
    """One process: nothing to wait for."""


@dataclass
class Checkpoints:
    """Writes a run's saves into ``output_dir`` and removes the expired ones.

    ``model_path(name)`` is where the save ``name`` goes (a file or folder, by the target's format); ``write_model``
    writes it; ``write_ema`` (with ``--save_ema_separately``) writes the EMA copy to ``model_path(ema_name(name))``;
    ``write_state`` (with ``--save_state``) writes the training state folder beside it. Every process
    calls :meth:`save`; only the main one writes or removes files, and ``barrier`` (accelerate's
    ``wait_for_everyone``) keeps the others from running ahead of a save or reading a half-written one.
    """

    output_dir: Path
    policy: SavePolicy
    model_path: Callable[[str], Path]
    write_model: Callable[[Path], None]
    write_state: Optional[Callable[[Path], None]] = None
    is_main: bool = True
    barrier: Callable[[], None] = _no_barrier
    write_ema: Optional[Callable[[Path], None]] = None
    saved: list[Path] = field(default_factory=list)

    def state_folder(self, name: str) -> Path:
        """The training-state folder of the save ``name``."""
        return self.output_dir / f"{name}-state"

    def save(self, name: str, with_state: bool = True) -> Path:
        """Write the save ``name`` (and its state, unless ``with_state`` is false); returns the model's path."""
        self.barrier()
        path = self.model_path(name)
        if self.is_main:
            with self.disk_full_reported(path):
                self.write_model(path)
            self.saved.append(path)
            if self.write_ema is not None:
                self.save_ema_copy(name)
            if self.write_state is not None and with_state:
                self.save_state(self.state_folder(name))
        self.barrier()
        return path

    def save_ema_copy(self, name: str) -> Path:
        """Write the EMA weights of the save ``name`` beside it, as ``<name>-ema`` (``--save_ema_separately``)."""
        assert self.write_ema is not None
        path = self.model_path(ema_name(name))
        with self.disk_full_reported(path):
            self.write_ema(path)
        self.saved.append(path)
        logger.info("saved the EMA weights to %s", path)
        return path

    def save_state(self, folder: Path) -> None:
        """Write the training state (also the ``interrupted-state`` of a stopped run)."""
        assert self.write_state is not None
        with self.disk_full_reported(folder):
            self.write_state(folder)
        logger.info("saved training state to %s", folder)

    def remove(self, name: Optional[str]) -> None:
        """Remove the save ``name``, its EMA copy and its state folder, where they exist."""
        if name is None or not self.is_main:
            return
        paths = [self.model_path(name), self.state_folder(name)]
        if self.write_ema is not None:
            paths.append(self.model_path(ema_name(name)))
        for path in paths:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def after_step(self, step: int) -> None:
        """The step save that is due after ``step``, and the rotation it triggers."""
        if self.policy.step_save_due(step):
            self.save(self.policy.name("step", step))
            self.remove(self.policy.expired_step_save(step))

    def after_epoch(self, epoch: int, step: int) -> None:
        """The epoch save that is due after ``epoch``, and the rotation it triggers."""
        if self.policy.epoch_save_due(epoch, step):
            self.save(self.policy.name("epoch", epoch))
            self.remove(self.policy.expired_epoch_save(epoch))

    @contextlib.contextmanager
    def disk_full_reported(self, path: Path) -> Iterator[None]:
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
