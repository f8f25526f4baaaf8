"""``--use_ema``: an exponential moving average of the trained weights, saved as the model and used for samples.

The average is diffusers' ``EMAModel`` (diffusers.training_utils), kept on the training device beside the
weights (one more copy of the trained parameters: 3.2 GiB for SD 1.5's U-Net in fp32). After every optimizer step
``s = decay * s + (1 - decay) * w``; the first step copies the weights (EMAModel's decay is 0 there). The decay:

- fixed (the default): ``--ema_decay`` from the second step on (EMAModel with ``min_decay = decay``);
- with ``--ema_inv_gamma`` (and ``--ema_power``): diffusers' warm-up, ``1 - (1 + step / inv_gamma) ** -power``,
  capped at ``--ema_decay``, so early weights, far from the trained ones, fade quickly.

Checkpoints and samples are made with the average swapped into the model (:meth:`Ema.weights`; the training
weights are put back exactly after); ``--save_state`` keeps the training weights and the average (``ema.pt``), so
``--resume`` continues both bit-exactly.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

EMA_FILE = "ema.pt"


class Ema:
    """The moving average of ``parameters`` (see the module docstring for the decay)."""

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float, inv_gamma: Optional[float] = None,
                 power: float = 2 / 3) -> None:
        from diffusers.training_utils import EMAModel

        self.parameters = list(parameters)
        warmup = inv_gamma is not None
        self.average = EMAModel(self.parameters, decay=decay, min_decay=0.0 if warmup else decay,
                                use_ema_warmup=warmup, inv_gamma=inv_gamma if warmup else 1.0, power=power)

    def step(self) -> None:
        """Fold the weights of the step just taken into the average."""
        self.average.step(self.parameters)

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """Inside, the model holds the average; after, its training weights again (bit for bit)."""
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)

    def save(self, folder: Path) -> None:
        """Write the average and its step count into a state folder."""
        torch.save(self.average.state_dict(), str(Path(folder) / EMA_FILE))

    def load(self, state: dict) -> None:
        """Restore what :meth:`save` wrote (read with ``weights_only=True`` by the caller)."""
        self.average.load_state_dict(state)
        self.average.to(self.parameters[0].device if self.parameters else None)


def ema_weights(ema: Optional[Ema]) -> contextlib.AbstractContextManager:
    """:meth:`Ema.weights`, or nothing without --use_ema."""
    return ema.weights() if ema is not None else contextlib.nullcontext()


__all__ = ["EMA_FILE", "Ema", "ema_weights"]
