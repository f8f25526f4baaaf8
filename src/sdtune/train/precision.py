"""Half-precision training without silent loss: dynamic loss scaling and stochastic rounding.

Two things go wrong when training in fp16/bf16, and each has its standard cure:

* **fp16 gradients underflow.** fp16's smallest subnormal is 6e-8; gradients of SD's loss are often smaller, so
  they become exactly 0. The cure (Micikevicius et al. 2018, "Mixed Precision Training", section 3.2) is to multiply
  the loss by a large scale before backward and divide the gradients by it before the step, halving the scale and
  skipping the step when a gradient overflows, doubling it after ``growth_interval`` good steps. This is what
  ``torch.amp.GradScaler`` does; :class:`LossScaler` does the same with PyTorch's own fused kernels
  (``_amp_foreach_non_finite_check_and_unscale_``, ``_amp_update_scale_``), keeps its state on the device (no
  host-device wait per gradient tensor) and also accepts fp16 gradients (``--full_fp16``), which GradScaler refuses.
* **half-precision weights round small updates away.** An update below half a unit in the last place (ulp) of a
  weight is lost by round-to-nearest: with SD's learning rates (1e-6 .. 1e-5) and weights of 0.01 .. 0.05 that is
  nearly every update in bf16 and most in fp16. :func:`stochastic_round` rounds up or down with the probability that
  makes the result unbiased (Gupta et al. 2015, "Deep Learning with Limited Numerical Precision"), so small updates
  accumulate in expectation; OneTrainer and sd-scripts' fused Adafactor do the same for bf16.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class LossScaler:
    """Dynamic loss scaling (fp16), the schedule of ``torch.amp.GradScaler``; state kept as device tensors.

    Use: ``scale_loss(loss).backward()`` per micro-batch; then ``found_inf = unscale_(grads)`` (fp32 gradients are
    divided in place; fp16 ones are only checked and ``inv_scale`` is left for the optimizer to apply in fp32, where
    small values survive); step unless ``found_inf``; ``update(found_inf)``.
    """

    def __init__(self, device: torch.device | str = "cpu", scale: float = 2.0**16, growth_interval: int = 2000,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5) -> None:
        self._scale = torch.full((), scale, dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self.growth_interval, self.growth_factor, self.backoff_factor = growth_interval, growth_factor, backoff_factor

    @property
    def scale(self) -> float:
        """The current scale (reading it waits for the device: for logs and tests, not the hot path)."""
        return float(self._scale)

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The current scale as a device tensor (read together with a step's other values: one wait)."""
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        """1 / scale, computed in float64 as torch's GradScaler does."""
        return self._scale.double().reciprocal().float()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss times the scale, before backward."""
        return loss * self._scale.to(loss.dtype)

    def unscale_(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Divide fp32 gradients by the scale in place and check every gradient; returns a device flag (1.0 when
        some gradient is inf/NaN). fp16/bf16 gradients are checked but left scaled (see the class docstring)."""
        found_inf = torch.zeros(1, dtype=torch.float32, device=self._scale.device)
        full = [g for g in grads if g.dtype == torch.float32]
        half = [g for g in grads if g.dtype != torch.float32]
        if full:
            torch._amp_foreach_non_finite_check_and_unscale_(full, found_inf, self.inv_scale)
        if half:
            torch._amp_foreach_non_finite_check_and_unscale_(half, found_inf, torch.ones_like(self._scale))
        return found_inf

    def update(self, found_inf: torch.Tensor) -> None:
        """Grow or back off the scale after a step (torch's own update rule), on the device."""
        torch._amp_update_scale_(self._scale, self._growth_tracker, found_inf.to(self._scale.device),
                                 self.growth_factor, self.backoff_factor, self.growth_interval)

    def state_dict(self) -> dict[str, float]:
        """The scale and the count of good steps, for --save_state."""
        return {"scale": float(self._scale), "good_steps": int(self._growth_tracker)}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self._scale.fill_(float(state["scale"]))
        self._growth_tracker.fill_(int(state["good_steps"]))


def grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads``, accumulated in fp32 (an fp16 norm of scaled gradients would overflow at
    65504), as a device tensor: no host-device wait."""
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(list(grads), 2, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies gradients by: max_norm / (norm + 1e-6), at most 1."""
    return torch.clamp(max_norm / (norm + 1e-6), max=1.0)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` (float32) rounded to ``dtype`` (float16/bfloat16) up or down at random, with the probability that
    makes the result unbiased: E[round(x)] = x. Values that ``dtype`` represents exactly are returned unchanged."""
    nearest = x.to(dtype)
    back = nearest.float()
    diff = x - back  # at most half an ulp, either side
    towards = torch.where(diff >= 0, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(nearest, towards)  # the representable neighbour on diff's side
    gap = other.float() - back
    prob = torch.where(gap.isfinite() & (gap != 0), diff / gap, torch.zeros_like(diff))
    draw = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    return torch.where(draw < prob, other, nearest)


def unscale_and_clip(grads: Sequence[torch.Tensor], scaler: LossScaler | None, max_norm: float,
                     device: torch.device | str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Unscale (fp16), check for overflow and clip, without waiting for the device: returns the overflow flag and
    the factor still to apply to the gradients (None: nothing to apply). fp16/bf16 gradients stay scaled and the
    factor carries the inverse scale, for the optimizer to apply in fp32."""
    found_inf, factor = torch.zeros(1, device=device), None
    if scaler is not None:
        found_inf = scaler.unscale_(grads)
        if any(g.dtype != torch.float32 for g in grads):
            factor = scaler.inv_scale
    if max_norm > 0:
        norm = grad_norm(grads) if factor is None else grad_norm(grads) * factor
        coefficient = clip_coefficient(norm, max_norm)
        factor = coefficient if factor is None else factor * coefficient
    return found_inf, factor
