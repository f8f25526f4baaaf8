"""`python -m tests.fixtures.labelers OUT` (from a source checkout) builds labelers that `sdtune caption` and
`sdtune tag` run with (issue 18: there was no way to try them offline; docs/labeling.md shows the commands)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.cli import main
from tests.label.conftest import write_images

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_the_tiny_labelers_command_builds_models_that_caption_and_tag(tmp_path):
    run = subprocess.run([sys.executable, "-m", "tests.fixtures.labelers", str(tmp_path / "labelers")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"sdtune caption IMAGES --model {tmp_path / 'labelers' / 'blip'}" in run.stdout
    images = write_images(tmp_path / "images")
    assert main(["caption", str(images), "--model", str(tmp_path / "labelers" / "blip"), "--max_length", "12"]) == 0
    assert main(["tag", str(images), "--model_dir", str(tmp_path / "labelers" / "tagger")]) == 0
    stems = {p.stem for p in images.iterdir() if p.suffix == ".png" or p.suffix == ".jpg"}
    assert stems and all((images / f"{s}.caption").read_text(encoding="utf-8").strip() for s in stems)
    assert all((images / f"{s}.txt").is_file() for s in stems)
