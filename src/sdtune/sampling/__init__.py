"""Sampling: text-to-image over diffusers' schedulers, used by ``sdtune generate`` and by training samples.

What lives where (no module here imports torch at import time except ``pipeline`` and ``lms``):

- ``samplers``: the sampler table (sdtune name, diffusers scheduler class, AUTOMATIC1111 name, config overrides),
  ``get_sampler`` and ``make_scheduler``. **A new sampler** is one ``Sampler(...)`` row in ``SAMPLERS`` (and its
  other spellings in ``SAMPLER_ALIASES``); a scheduler diffusers lacks or gets wrong goes in a module of its own
  beside ``lms.py`` and is picked in ``make_scheduler``.
- ``lms``: diffusers' LMS scheduler with SciPy-free coefficients.
- ``prompts``: prompt files and sd-scripts' inline options (``--n --w --h --d --l --s``).
- ``pipeline``: the settings of each image, the seed rule, the sampling loop (``generate_images``, ``iter_images``).
- ``png``: PNG files with AUTOMATIC1111's ``parameters`` infotext and sdtune's JSON, numbered file names.

The ``sdtune generate`` command (its options and the call) is :mod:`sdtune.generate`.
"""
