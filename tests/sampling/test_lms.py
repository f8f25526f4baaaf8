"""The LMS sampler's SciPy-free coefficients (sdtune.sampling.lms) against exact polynomial integration and Euler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdtune.models.families import get_family
from sdtune.sampling.lms import LMSScheduler, lms_coefficient
from sdtune.sampling.samplers import get_sampler, make_scheduler

pytestmark = pytest.mark.unit


def exact_coefficient(sigmas: np.ndarray, order: int, t: int, current: int) -> float:
    """Integrate the Lagrange basis polynomial exactly, with numpy's polynomial algebra."""
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != current:
            basis *= np.polynomial.Polynomial([-sigmas[t - k], 1.0]) / (sigmas[t - current] - sigmas[t - k])
    antiderivative = basis.integ()
    return float(antiderivative(sigmas[t + 1]) - antiderivative(sigmas[t]))


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_coefficients_are_the_exact_integrals(order):
    scheduler = make_scheduler("lms", get_family("sd1"))
    scheduler.set_timesteps(20)
    sigmas = scheduler.sigmas.double().numpy()
    for t in range(order - 1, 20):
        for current in range(order):
            want = exact_coefficient(sigmas, order, t, current)
            assert lms_coefficient(sigmas, order, t, current) == pytest.approx(want, rel=1e-9, abs=1e-12)
    # The coefficients of one step sum to the step length: a constant derivative is integrated exactly.
    t = 10
    total = sum(lms_coefficient(sigmas, order, t, c) for c in range(order))
    assert total == pytest.approx(sigmas[t + 1] - sigmas[t], rel=1e-9)


def test_first_lms_step_is_an_euler_step():
    family = get_family("sd1")
    lms, euler = make_scheduler("k_lms", family), make_scheduler("euler", family)
    assert isinstance(lms, LMSScheduler) and get_sampler("k_lms").a1111_name == "LMS"
    for scheduler in (lms, euler):
        scheduler.set_timesteps(10)
    # SD's schedule reaches the subclass (diffusers reads config keys from the __init__ signature).
    torch.testing.assert_close(lms.sigmas, euler.sigmas, rtol=1e-5, atol=1e-8)
    assert lms.sigmas[0] == pytest.approx(14.6146, rel=1e-4)
    g = torch.Generator().manual_seed(0)
    sample, model_output = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)

    def step(scheduler, i, output, x):
        t = scheduler.timesteps[i]
        scheduler.scale_model_input(x, t)
        return scheduler.step(output, t, x).prev_sample

    a, b = step(lms, 0, model_output, sample), step(euler, 0, model_output, sample)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # Later steps use the stored derivatives, so they differ from Euler's.
    c, d = step(lms, 1, model_output * 0.5, a), step(euler, 1, model_output * 0.5, b)
    with pytest.raises(AssertionError, match="not close"):
        torch.testing.assert_close(c, d, rtol=1e-5, atol=1e-4)
