"""Optimizers and learning-rate schedules, chosen by name as sd-scripts' ``--optimizer_type`` does.

Memory per trainable parameter (fp32 weights): AdamW keeps two fp32 moments (8 bytes), AdamW8bit two uint8 moments
(2 bytes, bitsandbytes), Lion one moment (4 bytes), Adafactor factored second moments (a few bytes per row and
column), SGD with Nesterov momentum one buffer (4 bytes). For the 860M-parameter SD U-Net that is 6.9 GB of AdamW
state against 1.7 GB for AdamW8bit.
"""

from __future__ import annotations

import ast
from typing import Any, Callable, Iterable

import torch

from sdtune.errors import SdtuneError

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Adafactor", "SGDNesterov")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


def parse_optimizer_args(items: Iterable[str]) -> dict[str, Any]:
    """``--optimizer_args weight_decay=0.01 betas=0.9,0.999`` -> {"weight_decay": 0.01, "betas": (0.9, 0.999)}."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SdtuneError(f"--optimizer_args: {item!r} is not key=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word, e.g. a mode name
        out[key.strip()] = value
    return out


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2): the update is the
    sign of an interpolation of momentum and gradient; one state buffer per parameter."""

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, extra: dict[str, Any]) -> torch.optim.Optimizer:
    if name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=lr, **extra)
    if name == "AdamW8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise SdtuneError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from exc
        return bnb.optim.AdamW8bit(param_groups, lr=lr, **extra)
    if name == "Lion":
        return Lion(param_groups, lr=lr, **extra)
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate unless the user asks for Adafactor's relative step sizes.
        extra = {"scale_parameter": False, "relative_step": False, "warmup_init": False, **extra}
        return Adafactor(param_groups, lr=lr, **extra)
    if name == "SGDNesterov":
        extra = {"momentum": 0.9, **extra}
        return torch.optim.SGD(param_groups, lr=lr, nesterov=True, **extra)
    raise SdtuneError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0):
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULERS:
        raise SdtuneError(f"unknown --lr_scheduler {name!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)


class LossScaler:
    """Dynamic loss scaling for ``--full_fp16`` (fp16 weights and gradients), without patching PyTorch.

    fp16 gradients of small losses underflow to zero; the loss is multiplied by ``scale`` before backward and the
    gradients divided by it before the step. A step whose gradients overflowed (inf/nan) is skipped and the scale
    halved; after ``growth_interval`` good steps it doubles (the schedule of torch.amp.GradScaler).
    """

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000) -> None:
        self.scale = scale
        self.growth_interval = growth_interval
        self.good_steps = 0

    def unscale_and_check(self, params: list[torch.nn.Parameter]) -> bool:
        """Divide gradients by the scale in place; True when all are finite (the step may proceed)."""
        finite = True
        for p in params:
            if p.grad is None:
                continue
            p.grad.div_(self.scale)
            if not torch.isfinite(p.grad).all():
                finite = False
        return finite

    def update(self, finite: bool) -> None:
        if finite:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale *= 2.0
        else:
            self.scale /= 2.0
            self.good_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
