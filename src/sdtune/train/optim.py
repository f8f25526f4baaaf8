"""Optimizers and learning-rate schedules, chosen by name as sd-scripts' ``--optimizer_type`` does.

Memory per trainable parameter (fp32 weights): AdamW keeps two fp32 moments (8 bytes), AdamW8bit two uint8 moments
(2 bytes, bitsandbytes), Lion one moment (4 bytes), Adafactor factored second moments (a few bytes per row and
column), SGD with Nesterov momentum one buffer (4 bytes). For the 860M-parameter SD U-Net that is 6.9 GB of AdamW
state against 1.7 GB for AdamW8bit. From the optional packages (their state as their code allocates it): Prodigy
four fp32 values (16 bytes: the moments, its ``s`` and the starting weights ``p0``), DAdaptAdam three (12 bytes),
AdamWScheduleFree two (8 bytes: ``z`` and the second moment).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import logging
import math
from typing import Any, Callable, Iterable, Iterator

import torch

from sdtune.errors import SdtuneError
from sdtune.seeds import derived_seed
from sdtune.train.options import (
    ADAPTIVE_LR_OPTIMIZERS,
    DADAPT_OPTIMIZERS,
    LR_SCHEDULERS,
    OPTIMIZER_PACKAGES,
    OPTIMIZERS,
    SCHEDULE_FREE_OPTIMIZERS,
    TrainOptions,
    optimizer_name,
)
from sdtune.train.precision import stochastic_round

logger = logging.getLogger(__name__)


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


class HalfWeightAdamW(torch.optim.Optimizer):
    """AdamW (Loshchilov & Hutter 2019; the update of ``torch.optim.AdamW``) for fp16/bf16 weights
    (``--full_fp16`` / ``--full_bf16``): the moments are kept in fp32, where the second moment of small gradients
    does not underflow (in fp16 it is 0 below |g| ~ 2e-4, and Adam becomes a scaled SGD), and the update is computed
    in fp32. Writing it into a half-precision weight rounds away any update below half an ulp (most of SD's updates
    at learning rates of 1e-6 .. 1e-5), so it is written back with one of:

    * ``rounding="kahan"`` (compensated summation, Kahan 1965): the rounding error of each weight is kept in a
      buffer of the weight's dtype and added to the next update, so the weight is always the exact fp32 trajectory
      rounded to nearest; +2 bytes a parameter.
    * ``rounding="stochastic"``: :func:`sdtune.train.precision.stochastic_round`, unbiased in expectation, no
      memory, but each weight random-walks by up to an ulp.

    State costs 8 bytes a parameter (fp32 moments), as fp32 AdamW.

    ``step(grad_multiplier=t)`` multiplies each gradient by the device tensor ``t`` in fp32 first: the inverse loss
    scale and the clipping factor, applied where small values survive. The rounding draws come from a generator
    derived from ``seed`` and the step count (the same on every rank, restored with the state): runs and resumes
    are exact.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, seed: int = 0, rounding: str = "kahan") -> None:
        if rounding not in ("kahan", "stochastic"):
            raise SdtuneError(f"unknown rounding {rounding!r}: kahan or stochastic")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.seed, self.rounding = seed, rounding
        self.steps = 0

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, grad_multiplier: torch.Tensor | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        generators: dict[torch.device, torch.Generator] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.device not in generators and self.rounding == "stochastic":
                    generators[p.device] = torch.Generator(p.device).manual_seed(
                        derived_seed(self.seed, self.steps, p.device.index or 0))
                self._update(p, group, grad_multiplier, generators.get(p.device))
        return loss

    def _update(self, p: torch.Tensor, group: dict[str, Any], grad_multiplier: torch.Tensor | None,
                generator: torch.Generator | None) -> None:
        beta1, beta2 = group["betas"]
        grad = p.grad.float()
        if grad_multiplier is not None:
            grad.mul_(grad_multiplier)
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if self.rounding == "kahan":
                state["compensation"] = torch.zeros_like(p)
        state["step"] += 1
        exp_avg, exp_avg_sq, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        weight = p.float()
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        update = weight * (-group["lr"] * group["weight_decay"])
        update.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1**t))
        if self.rounding == "stochastic":
            p.copy_(stochastic_round(weight.add_(update), p.dtype, generator))
            return
        compensation = state["compensation"]
        update.sub_(compensation.float())  # what earlier roundings left out
        new = (weight + update).to(p.dtype)
        compensation.copy_((new.float() - weight) - update)  # what this rounding leaves out
        p.copy_(new)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["rounding"] = {"seed": self.seed, "steps": self.steps, "mode": self.rounding}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch's own loader casts floating-point state to the parameter's dtype; the moments must stay fp32, so
        # the per-parameter state is put back here, matched by position as torch matches it.
        state_dict = dict(state_dict)
        rounding = state_dict.pop("rounding", {"seed": self.seed, "steps": 0})
        saved = state_dict.pop("state")
        super().load_state_dict({**state_dict, "state": {}})
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        by_id = dict(zip(ids, params))
        for index, value in saved.items():
            p = by_id[index]
            self.state[p] = {k: v.to(p.device, p.dtype if k == "compensation" else torch.float32)
                             if torch.is_tensor(v) else v for k, v in value.items()}
        self.seed, self.steps = int(rounding["seed"]), int(rounding["steps"])


def step_with_factor(optimizer: torch.optim.Optimizer, grads: list[torch.Tensor],
                     factor: torch.Tensor | None) -> None:
    """``optimizer.step()`` with the gradients multiplied by ``factor`` (inverse loss scale x clipping; None: 1):
    :class:`HalfWeightAdamW` applies it in fp32 inside its update, other optimizers get it multiplied in place."""
    if isinstance(optimizer, HalfWeightAdamW):
        optimizer.step(grad_multiplier=factor)
        return
    if factor is not None:
        torch._foreach_mul_(grads, factor)
    optimizer.step()


def is_schedule_free(optimizer: torch.optim.Optimizer) -> bool:
    """A schedule-free optimizer (``train()``/``eval()`` switch its parameters between the point it trains at and
    the average it returns); torch's own optimizers have neither method."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


@contextlib.contextmanager
def evaluation_weights(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Inside, the parameters are a schedule-free optimizer's evaluation weights (its average ``x``, what a
    checkpoint and a sample must use, as sd-scripts' ``optimizer_eval_fn``); after, the training weights ``y`` again,
    copied back exactly: ``train()`` recomputes them from ``x`` with rounding, and a run must not depend on when it
    saved or sampled. The copy of the trainable weights lives in host memory meanwhile. Other optimizers: nothing."""
    if not is_schedule_free(optimizer):
        yield
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    kept = [p.detach().to("cpu", copy=True) for p in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, value in zip(params, kept):
                p.copy_(value)


def _package(name: str) -> Any:
    """The optional package ``name`` comes from, imported; an error naming the pip package when it is missing."""
    package = OPTIMIZER_PACKAGES[name]
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise SdtuneError(f"--optimizer_type {name} needs the {package} package: pip install {package}") from exc


def _adaptive_lr_warnings(name: str, param_groups: list[dict[str, Any]], lr: float) -> None:
    """sd-scripts' advice for Prodigy and D-Adaptation: the learning rate multiplies the step size they estimate."""
    lrs = {group.get("lr", lr) for group in param_groups}
    if min(lrs) <= 0.1:
        logger.warning("--optimizer_type %s estimates its own step size and the learning rate multiplies it: "
                       "use --learning_rate 1.0 (got %s)", name, ", ".join(f"{x:g}" for x in sorted(lrs)))
    if len(lrs) > 1 and name in DADAPT_OPTIMIZERS:
        logger.warning("--optimizer_type %s with several learning rates (%s): D-Adaptation estimates one step size "
                       "for all groups; the rates only scale it per group", name,
                       ", ".join(f"{x:g}" for x in sorted(lrs)))


def _fast_adamw(param_groups: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    """torch AdamW's fused kernel (one kernel per device and dtype for the whole update) where every parameter is a
    floating-point tensor on the CPU or on CUDA, unless ``--optimizer_args`` chose ``fused`` or ``foreach``. On the
    CPU it is the fastest of torch's three AdamW steps: 9.2 ms against 30 ms for the per-tensor loop (torch's CPU
    default) and 55 ms for the multi-tensor (foreach) kernel, for the 12.7M parameters of bench_train.py's U-Net,
    one thread (bench/bench_options.py, ``adamw_step_alone``). The update is AdamW's, equal to the loop's within
    float rounding (tests/train/test_optimizers.py)."""
    if "fused" in extra or "foreach" in extra:
        return extra
    params = [p for group in param_groups for p in group["params"]]
    device_types = {p.device.type for p in params}
    fusable = len(device_types) == 1 and device_types <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)
    return {"fused": True, **extra} if fusable else extra


def run_optimizer(opts: TrainOptions, param_groups: list[dict[str, Any]], seed: int,
                  is_main: bool) -> torch.optim.Optimizer:
    """The optimizer of a ``sdtune train`` run (:func:`build_optimizer` with the options' name, rate and
    arguments); with half-precision weights and another optimizer than AdamW, a warning that small updates are
    lost."""
    name = optimizer_name(opts)
    half_weights = opts.full_fp16 or opts.full_bf16
    if half_weights and name != "AdamW" and is_main:
        logger.warning("--full_fp16/--full_bf16 with %s: the optimizer writes its updates into the half-precision "
                       "weights rounded to nearest, and updates below half an ulp are lost; AdamW (the default) "
                       "keeps them (--half_weight_rounding)", name)
    return build_optimizer(name, param_groups, opts.learning_rate, parse_optimizer_args(opts.optimizer_args),
                           half_weights=half_weights, seed=derived_seed(seed, 0x5352),
                           rounding=opts.half_weight_rounding, warn=is_main)


def build_optimizer(name: str, param_groups: list[dict[str, Any]], lr: float, extra: dict[str, Any],
                    half_weights: bool = False, seed: int = 0, rounding: str = "kahan",
                    warn: bool = True) -> torch.optim.Optimizer:
    """The optimizer called ``name``; with ``half_weights`` (fp16/bf16 parameters) AdamW is
    :class:`HalfWeightAdamW`. A schedule-free one is returned in training mode. ``warn``: log advice on the
    options (the main process)."""
    if name == "AdamW":
        if half_weights:
            return HalfWeightAdamW(param_groups, lr=lr, seed=seed, rounding=rounding, **extra)
        return torch.optim.AdamW(param_groups, lr=lr, **_fast_adamw(param_groups, extra))
    if name in ADAPTIVE_LR_OPTIMIZERS:
        if warn:
            _adaptive_lr_warnings(name, param_groups, lr)
        if name == "Prodigy":
            return _package(name).Prodigy(param_groups, lr=lr, **extra)
        # as sd-scripts: DAdaptation is the preprint's Adam, from dadaptation.experimental with DAdaptAdanIP
        module = _package(name)
        if name in ("DAdaptation", "DAdaptAdamPreprint", "DAdaptAdanIP"):
            module = importlib.import_module("dadaptation.experimental")
        cls = getattr(module, "DAdaptAdamPreprint" if name == "DAdaptation" else name)
        return cls(param_groups, lr=lr, **extra)
    if name in SCHEDULE_FREE_OPTIMIZERS:
        optimizer = getattr(_package(name), name)(param_groups, lr=lr, **extra)
        optimizer.train()  # steps are refused in eval mode; evaluation_weights switches around saves and samples
        return optimizer
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
    """The ``--lr_scheduler`` schedule (diffusers' ``get_scheduler``), refused by name when unknown."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULERS:
        raise SdtuneError(f"unknown --lr_scheduler {name!r}; choose one of {', '.join(LR_SCHEDULERS)}")
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)
