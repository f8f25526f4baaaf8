"""The LMS sampler (k-diffusion's ``sample_lms``, AUTOMATIC1111's "LMS") without SciPy.

diffusers' ``LMSDiscreteScheduler`` integrates its multistep coefficients with ``scipy.integrate.quad`` and is
unavailable where SciPy is not installed (it is not one of sdtune's dependencies). Each coefficient is the integral,
from sigma_t to sigma_{t+1}, of a Lagrange basis polynomial of degree ``order - 1`` (at most 3): Gauss-Legendre
quadrature with n nodes is exact for polynomials up to degree 2n - 1, so four nodes give the integral exactly (to
float rounding), where ``quad`` approximates it to a relative 1e-4.

Only the coefficient is replaced; sigmas, timesteps, scaling and the step itself are diffusers' own (its
``use_beta_sigmas`` option still needs SciPy; sdtune does not set it).
"""

from __future__ import annotations

import numpy as np
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

# Nodes and weights on [-1, 1]; exact for polynomials up to degree 7 (LMS uses degree <= order - 1 = 3).
_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(4)


def lms_coefficient(sigmas: np.ndarray, order: int, t: int, current_order: int) -> float:
    """The integral over [sigmas[t], sigmas[t + 1]] of the Lagrange basis polynomial that is 1 at
    ``sigmas[t - current_order]`` and 0 at the other ``sigmas[t - k]``, k < order."""
    lower, upper = float(sigmas[t]), float(sigmas[t + 1])
    tau = (upper - lower) / 2 * _NODES + (upper + lower) / 2
    basis = np.ones_like(tau)
    own = float(sigmas[t - current_order])
    for k in range(order):
        if k != current_order:
            other = float(sigmas[t - k])
            basis *= (tau - other) / (own - other)
    return float((upper - lower) / 2 * np.dot(_WEIGHTS, basis))


class LMSScheduler(LMSDiscreteScheduler):
    """diffusers' LMS scheduler with the coefficients computed by :func:`lms_coefficient`."""

    # No __init__ here: diffusers reads the accepted config keys from the signature of the parent's __init__.

    def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
        """diffusers' hook for the multistep coefficient, answered by :func:`lms_coefficient` (no SciPy)."""
        return lms_coefficient(np.asarray(self.sigmas, dtype=np.float64), order, t, current_order)
