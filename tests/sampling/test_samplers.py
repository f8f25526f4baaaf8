"""The sampler table: sd-scripts' and other spellings of the samplers' names."""

from __future__ import annotations

import pytest

from sdtune.sampling.samplers import get_sampler

pytestmark = pytest.mark.unit


def test_sampler_aliases():
    assert get_sampler("k_euler_a").name == "euler_a"
    assert get_sampler("dpmsolver++").name == "dpm++"
    assert get_sampler("DDIM").name == "ddim"
