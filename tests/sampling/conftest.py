"""Fixtures of the sampling tests."""

from __future__ import annotations

import pytest

from sdtune.models.tiny import build_tiny


@pytest.fixture(scope="module")
def sd1():
    """The tiny SD 1.x model of seed 0."""
    return build_tiny("sd1", seed=0)
