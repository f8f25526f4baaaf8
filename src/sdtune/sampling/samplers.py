"""The samplers sdtune offers: diffusers scheduler classes under sdtune's, sd-scripts' and AUTOMATIC1111's names.

Importing this module imports no torch (``sdtune generate --help`` needs the names); :func:`make_scheduler` imports
diffusers when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdtune.errors import SdtuneError

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

    from sdtune.models.families import Family


@dataclass(frozen=True)
class Sampler:
    """One sampler: the diffusers scheduler behind a ``--sampler`` name and how AUTOMATIC1111 calls it."""

    name: str  # sdtune's name (--sampler)
    scheduler: str  # diffusers class
    a1111_name: str  # what AUTOMATIC1111 writes in "Sampler:", so its PNG Info and image sites recognise it
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the family's scheduler config


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddim", "DDIMScheduler", "DDIM"),
    # SD's own PNDM config skips the Runge-Kutta warm-up steps; so do diffusers' SD pipelines.
    Sampler("pndm", "PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    Sampler("lms", "LMSDiscreteScheduler", "LMS"),  # sampling.lms: diffusers' LMS with SciPy-free coefficients
    Sampler("euler", "EulerDiscreteScheduler", "Euler"),
    Sampler("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
    Sampler("heun", "HeunDiscreteScheduler", "Heun"),
    Sampler("dpm_2", "KDPM2DiscreteScheduler", "DPM2"),
    Sampler("dpm_2_a", "KDPM2AncestralDiscreteScheduler", "DPM2 a"),
    Sampler("dpm++", "DPMSolverMultistepScheduler", "DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    Sampler("dpm++_karras", "DPMSolverMultistepScheduler", "DPM++ 2M Karras",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    Sampler("unipc", "UniPCMultistepScheduler", "UniPC"),
)}
# sd-scripts' (gen_img_diffusers.py, --sample_sampler) and common spellings.
SAMPLER_ALIASES: dict[str, str] = {
    "plms": "pndm", "k_lms": "lms", "k_euler": "euler", "k_euler_a": "euler_a", "euler_ancestral": "euler_a",
    "k_heun": "heun", "k_dpm_2": "dpm_2", "k_dpm_2_a": "dpm_2_a", "dpmsolver++": "dpm++", "dpmpp_2m": "dpm++",
    "dpm++_2m": "dpm++", "dpmpp_2m_karras": "dpm++_karras", "dpm++_2m_karras": "dpm++_karras",
}
SAMPLER_CHOICES: tuple[str, ...] = (*SAMPLERS, *SAMPLER_ALIASES)


def get_sampler(name: str) -> Sampler:
    """The sampler called ``name`` (any case; sd-scripts' spellings too); :class:`SdtuneError` listing the names."""
    key = name.strip().lower()
    key = SAMPLER_ALIASES.get(key, key)
    if key not in SAMPLERS:
        raise SdtuneError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[key]


def make_scheduler(sampler: str | Sampler, family: Family) -> SchedulerMixin:
    """A fresh scheduler of ``sampler`` for ``family``: SD's training schedule and the family's prediction type
    (epsilon or v_prediction), so SD 2.x 768-v models are sampled as what they are."""
    import diffusers

    spec = sampler if isinstance(sampler, Sampler) else get_sampler(sampler)
    if spec.scheduler == "LMSDiscreteScheduler":
        from sdtune.sampling.lms import LMSScheduler as cls
    else:
        cls = getattr(diffusers, spec.scheduler)
    config = {k: v for k, v in family.scheduler_config().items() if k != "_class_name"}
    return cls.from_config({**config, **spec.config})


__all__ = ["SAMPLERS", "SAMPLER_ALIASES", "SAMPLER_CHOICES", "Sampler", "get_sampler", "make_scheduler"]
