"""sdtune generate's options: --help imports no torch, and the choices are the ones the model code checks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from sdtune import generate
from sdtune.models.text import ALLOWED_TOKEN_LENGTHS, check_max_token_length

pytestmark = pytest.mark.unit


def test_token_length_choices_are_the_ones_the_text_encoder_takes():
    fields = {f.name: f for f in dataclasses.fields(generate.GenerateOptions)}
    assert tuple(fields["max_token_length"].metadata["choices"]) == ALLOWED_TOKEN_LENGTHS == (75, 150, 225)
    for length in ALLOWED_TOKEN_LENGTHS:
        assert check_max_token_length(length) == length
    with pytest.raises(ValueError, match="75, 150, 225"):
        check_max_token_length(100)


def test_help_imports_no_torch():
    code = ("import sys\n"
            "from sdtune.cli import main\n"
            "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
            "assert 'diffusers' not in sys.modules, 'diffusers imported for --help'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--sampler" in result.stdout and "--hypernetwork_multiplier" in result.stdout
