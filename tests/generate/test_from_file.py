"""sdtune generate --from_file: a prompt file's inline options reach the images; a bad line is named."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sdtune.cli import main

pytestmark = pytest.mark.unit


def test_cli_from_file_with_inline_options(tmp_path, saved_model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na red circle --w 48 --h 32 --d 42 --s 2 --l 1 --n blurry\n\n"
                       "a blue square\n", encoding="utf-8")
    out = tmp_path / "out"
    assert main(["generate", "--pretrained_model_name_or_path", str(saved_model("sd1", "diffusers")),
                 "--from_file", str(prompts), "--W", "32", "--H", "32", "--steps", "1", "--seed", "5",
                 "--sampler", "ddim", "--outdir", str(out)]) == 0
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["00000-42.png", "00001-6.png"]
    with Image.open(files[0]) as first, Image.open(files[1]) as second:
        assert first.size == (48, 32) and second.size == (32, 32)
        meta = json.loads(first.text["sdtune"])
        assert first.text["parameters"].startswith("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: DDIM, "
                                                   "CFG scale: 1.0, Seed: 42, Size: 48x32")
        assert json.loads(second.text["sdtune"])["prompt"] == "a blue square"
    assert (meta["steps"], meta["scale"], meta["seed"]) == (2, 1.0, 42)


def test_cli_names_a_bad_prompt_file_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --q 1\n", encoding="utf-8")
    assert main(["generate", "--ckpt", str(tmp_path / "unread.ckpt"), "--from_file", str(prompts)]) == 2
    assert f"{prompts}:1: unknown option --q" in capsys.readouterr().err
