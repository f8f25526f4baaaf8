"""``--use_ema``: an exponential moving average of the trained weights, saved as the model (or beside it, as
``<name>-ema``, with ``--save_ema_separately``: :mod:`sdtune.train.checkpoints`) and used for samples.

The average is diffusers' ``EMAModel`` (diffusers.training_utils): one more copy of the trained parameters (3.2 GiB
for SD 1.5's U-Net in fp32, 860 M parameters x 4 bytes). After every optimizer step ``s = decay * s + (1 - decay) *
w``; the first step copies the weights (EMAModel's decay is 0 there). The decay:

- fixed (the default): ``--ema_decay`` from the second step on (EMAModel with ``min_decay = decay``);
- with ``--ema_inv_gamma`` (and ``--ema_power``): diffusers' warm-up, ``1 - (1 + step / inv_gamma) ** -power``,
  capped at ``--ema_decay``, so early weights, far from the trained ones, fade quickly.

Where it lives: beside the weights on the training device (``EMAModel.step`` does the update), or with
``--ema_device cpu`` in host memory, off the GPU. EMAModel cannot update across devices (its ``step`` needs the
average and the weights on one device, and it copies, not averages, a tensor without ``requires_grad``, which rules
out handing it host copies of the weights), so there :meth:`Ema.step` does the update itself, one parameter at a
time, with EMAModel's own arithmetic (``s.sub_((1 - decay) * (s - w))``: the same operations in the same order,
so the same bits as EMAModel's where both run on the CPU, which the tests check; each operation is elementwise and
correctly rounded in fp32 on a GPU too, so a CUDA run should agree bit for bit as well, not yet checked on one) and
EMAModel's decay schedule and counters (``get_decay``, ``optimization_step``, ``cur_decay_value``), so ``ema.pt``
is EMAModel's ``state_dict`` either way. From a CUDA parameter the host copy is asynchronous into pinned memory and one
parameter ahead (the next parameter travels while the host averages this one); an event per copy says when it has
landed. At most two parameters' host copies (and the arithmetic's temporaries of one) exist at a time.

Checkpoints and samples are made with the average swapped into the model (:meth:`Ema.weights`; the training
weights are put back exactly after); ``--save_state`` keeps the training weights and the average (``ema.pt``), so
``--resume`` continues both bit-exactly (``ema.pt`` is read to the CPU, then moved to where the average lives).
"""

from __future__ import annotations

import collections
import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from sdtune.atomic import atomic_path
from sdtune.errors import SdtuneError

EMA_FILE = "ema.pt"


class Ema:
    """The moving average of ``parameters`` (see the module docstring for the decay); ``device``: where the average
    lives (``"cpu"`` for ``--ema_device cpu``; None: beside each parameter)."""

    def __init__(self, parameters: Sequence[nn.Parameter], decay: float, inv_gamma: Optional[float] = None,
                 power: float = 2 / 3, device: Optional[str | torch.device] = None) -> None:
        from diffusers.training_utils import EMAModel

        self.parameters = list(parameters)
        self.device = torch.device(device) if device is not None else None
        warmup = inv_gamma is not None
        # With a device of its own the copy is made there, parameter by parameter: EMAModel's constructor would
        # clone every parameter where it is first (the whole copy on the GPU, what --ema_device cpu is to avoid).
        self.average = EMAModel(self.parameters if self.device is None else [], decay=decay,
                                min_decay=0.0 if warmup else decay, use_ema_warmup=warmup,
                                inv_gamma=inv_gamma if warmup else 1.0, power=power)
        if self.device is not None:
            self.average.shadow_params = [p.detach().to(self.device, copy=True) for p in self.parameters]

    def step(self) -> None:
        """Fold the weights of the step just taken into the average."""
        if self.device is None:
            self.average.step(self.parameters)
        else:
            self._step_elsewhere()

    @torch.no_grad()
    def _step_elsewhere(self) -> None:
        """``EMAModel.step`` (diffusers 0.3x-0.4x, ``foreach=False``) for an average on another device than the
        weights: the same counters, decay and arithmetic, on copies of the weights brought over one at a time."""
        average = self.average
        average.optimization_step += 1
        decay = average.get_decay(average.optimization_step)
        average.cur_decay_value = decay
        one_minus_decay = 1 - decay
        assert self.device is not None
        for s_param, (param, value) in zip(average.shadow_params, copies_to(self.parameters, self.device)):
            if param.requires_grad:
                s_param.sub_(one_minus_decay * (s_param - value))
            else:  # as EMAModel: a frozen tensor is copied, not averaged
                s_param.copy_(value)

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        """Inside, the model holds the average; after, its training weights again (bit for bit). EMAModel's
        ``store`` keeps the training weights in host memory meanwhile, and its ``copy_to`` brings each averaged
        tensor to its parameter's device (one at a time), wherever the average lives."""
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)

    def save(self, folder: Path) -> None:
        """Write the average and its step count (EMAModel's ``state_dict``) into a state folder, atomically."""
        with atomic_path(Path(folder) / EMA_FILE) as tmp:
            torch.save(self.average.state_dict(), str(tmp))

    def load(self, state: dict) -> None:
        """Restore what :meth:`save` wrote (read with ``weights_only=True`` to the CPU by the caller), each tensor
        moved where the average lives. The fresh average made by the constructor is dropped first, so the device
        never holds two; EMAModel's ``load_state_dict`` reads the counters and decay settings (and checks them)."""
        shadow = state.get("shadow_params") if isinstance(state, dict) else None
        if not isinstance(shadow, list) or not all(isinstance(t, torch.Tensor) for t in shadow) \
                or [tuple(t.shape) for t in shadow] != [tuple(p.shape) for p in self.parameters]:
            raise SdtuneError(f"the --resume state folder's {EMA_FILE} does not hold an average of this run's trained "
                              "weights (other tensors or shapes); resume with the options of the run that saved it")
        self.average.shadow_params = []
        self.average.load_state_dict({k: v for k, v in state.items() if k != "shadow_params"})
        self.average.shadow_params = [t.to(self.device if self.device is not None else p.device)
                                      for t, p in zip(shadow, self.parameters)]

    @property
    def storage_devices(self) -> set[torch.device]:
        """The devices the average's tensors are on."""
        return {t.device for t in self.average.shadow_params}


def copies_to(parameters: Sequence[nn.Parameter], device: torch.device) -> Iterator[tuple[nn.Parameter,
                                                                                          torch.Tensor]]:
    """Each parameter with its values on ``device``, in order (a parameter already there is not copied: it is only
    read). From CUDA to the host each copy is launched one parameter ahead, non-blocking: PyTorch then puts the
    destination in pinned memory (its caching host allocator reuses the blocks), and the event recorded after the
    copy on the parameter's stream is waited on before the values are handed out, never read before they landed."""
    pending: collections.deque = collections.deque()
    for param in parameters:
        ahead = param.is_cuda and device.type == "cpu"
        value = param.detach().to(device, non_blocking=ahead)
        landed = None
        if ahead:
            landed = torch.cuda.Event()
            landed.record(torch.cuda.current_stream(param.device))
        pending.append((param, value, landed))
        if len(pending) > 1:
            yield _landed(*pending.popleft())
    while pending:
        yield _landed(*pending.popleft())


def _landed(param: nn.Parameter, value: torch.Tensor,
            landed: Optional[torch.cuda.Event]) -> tuple[nn.Parameter, torch.Tensor]:
    """(param, value) once ``value``'s copy has completed."""
    if landed is not None:
        landed.synchronize()
    return param, value


def ema_weights(ema: Optional[Ema]) -> contextlib.AbstractContextManager:
    """:meth:`Ema.weights`, or nothing without --use_ema."""
    return ema.weights() if ema is not None else contextlib.nullcontext()


__all__ = ["EMA_FILE", "Ema", "copies_to", "ema_weights"]
