"""``--fused_backward_pass``: the optimizer steps each parameter as soon as its gradient is ready, and frees it.

A plain step keeps every gradient until backward ends: for a full SD 1.5 fine-tune that is 3.2 GiB in fp32 (1.6 in
bf16), as much as the weights. Here each trainable parameter gets a post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``): when backward has written its gradient, the hook clips it, runs
the run's own optimizer on that one parameter, and drops the gradient. At most the gradients backward is working
on at that moment are alive, so the saving is nearly all of the gradient memory (estimated from the sizes; measured
on a GPU by ``bench/bench_gpu.py``'s "fused backward" recipe when a GPU is lent). sd-scripts' SDXL trainer does
the same for Adafactor; here AdamW and Adafactor.

The optimizer is the run's own object: its state, learning-rate schedule, ``--save_state`` and ``--resume`` are
unchanged. One parameter is stepped by giving the optimizer, for that call, param groups that hold only it (the
group dicts themselves, with their learning rates, stay); both optimizers update each tensor on its own, so the
update is the one the whole step would make.

What it cannot do, refused by :func:`sdtune.train.options.validate_fused_backward`: gradient accumulation (the
step comes before the next micro-batch's gradient), fp16 loss scaling (a step cannot be skipped after half the
parameters moved), several processes (DDP averages gradients after backward) and optimizers other than AdamW and
Adafactor. ``--max_grad_norm`` clips each parameter's gradient to that norm, as sd-scripts does here: the global
norm is not known until backward ends.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class FusedBackward:
    """The hooks that step ``optimizer`` parameter by parameter during backward; :meth:`remove` takes them off."""

    def __init__(self, optimizer: torch.optim.Optimizer, parameters: Sequence[nn.Parameter],
                 max_grad_norm: float = 0.0) -> None:
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        # the group's place, not the dict: load_state_dict (--resume) puts new group dicts in the optimizer
        self.group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.stepped = 0  # parameters stepped since the last :meth:`take_count`
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in parameters]

    def _step(self, parameter: torch.Tensor) -> None:
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([parameter], self.max_grad_norm, foreach=True)
        groups = self.optimizer.param_groups
        saved = [group["params"] for group in groups]
        try:
            for group in groups:
                group["params"] = []
            groups[self.group_of[id(parameter)]]["params"] = [parameter]
            self.optimizer.step()
        finally:
            for group, params in zip(groups, saved):
                group["params"] = params
        parameter.grad = None
        self.stepped += 1

    def take_count(self) -> int:
        """How many parameters were stepped since the last call (what tests and benchmarks read; the loop does not)."""
        count, self.stepped = self.stepped, 0
        return count

    def remove(self) -> None:
        """Take the hooks off (a plain backward again)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []


__all__ = ["FusedBackward"]
