"""sdtune generate's options: --help imports no torch, and the values written out for that equal their sources."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from sdtune import generate
from sdtune.devices import HALF_ON_CPU_HELP
from sdtune.models.text import ALLOWED_TOKEN_LENGTHS

pytestmark = pytest.mark.unit


def test_written_out_values_equal_their_sources():
    assert generate._TOKEN_LENGTHS == ALLOWED_TOKEN_LENGTHS
    assert generate._HALF_ON_CPU_HELP == HALF_ON_CPU_HELP
    fields = {f.name: f for f in dataclasses.fields(generate.GenerateOptions)}
    assert tuple(fields["max_token_length"].metadata["choices"]) == ALLOWED_TOKEN_LENGTHS


def test_help_imports_no_torch():
    code = ("import sys\n"
            "from sdtune.cli import main\n"
            "try:\n    main(['generate', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported for --help'\n"
            "assert 'diffusers' not in sys.modules, 'diffusers imported for --help'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--sampler" in result.stdout and "--hypernetwork_multiplier" in result.stdout
