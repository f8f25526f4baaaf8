"""Prompt files: one prompt a line, comments, sd-scripts' inline options, errors naming the line."""

from __future__ import annotations

import pytest

from sdtune.sampling.pipeline import plan_images
from sdtune.sampling.prompts import PromptFileError, PromptSpec, parse_prompt_line, read_prompt_file

pytestmark = pytest.mark.unit


def test_inline_options():
    spec = parse_prompt_line("a cat, sitting --n low quality, blurry --w 512 --h 768 --d 42 --l 5.5 --s 28")
    assert spec == PromptSpec("a cat, sitting", negative_prompt="low quality, blurry", width=512, height=768,
                              seed=42, scale=5.5, steps=28)
    assert parse_prompt_line("  just a prompt  ") == PromptSpec("just a prompt")
    assert parse_prompt_line("x --N neg").negative_prompt == "neg"  # option letters are case-insensitive
    assert parse_prompt_line("a--b c").prompt == "a--b c"  # only " --" starts an option


def test_prompt_file_skips_blank_and_comment_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeff# samples\n\na cat --d 1\n   \n  # indented comment\na dog\n".encode("utf-8"))
    assert read_prompt_file(path) == [PromptSpec("a cat", seed=1), PromptSpec("a dog")]


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", "unknown option --x"),
    ("a cat --w wide", "--w needs a whole number"),
    ("a cat --l high", "--l needs a number"),
    ("a cat --w 500 --h 512", "multiples of 8"),
    ("a cat --s 0", "at least 1"),
    ("--n only negative", "no prompt"),
])
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# first\na fine prompt\n{line}\n", encoding="utf-8")
    with pytest.raises(PromptFileError) as info:
        read_prompt_file(path)
    assert f"{path}:3" in str(info.value) and message in str(info.value)


def test_empty_missing_and_non_utf8_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(PromptFileError, match="holds no prompts"):
        read_prompt_file(empty)
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompt_file(tmp_path / "missing.txt")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PromptFileError, match="not UTF-8"):
        read_prompt_file(latin)


def test_plan_applies_line_overrides_and_seeds():
    specs = [PromptSpec("a", seed=100), PromptSpec("b", negative_prompt="x", width=32, steps=5, scale=1.0),
             PromptSpec("c")]
    plan = plan_images(specs, width=64, height=64, seed=7, images_per_prompt=2, negative_prompt="run negative")
    assert [s.seed for s in plan] == [100, 101, 9, 10, 11, 12]
    assert [s.negative_prompt for s in plan] == ["run negative"] * 2 + ["x"] * 2 + ["run negative"] * 2
    assert (plan[2].width, plan[2].height, plan[2].steps, plan[2].scale) == (32, 64, 5, 1.0)
    assert (plan[4].width, plan[4].steps, plan[4].scale) == (64, 30, 7.5)


def test_prompt_lines_end_only_where_sd_scripts_ends_them(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\u2028on a mat\x0cwith a hat\r\nsecond --d 2\rthird\n".encode("utf-8"))
    specs = read_prompt_file(path)
    assert [s.prompt for s in specs] == ["a cat\u2028on a mat\x0cwith a hat", "second", "third"]
    # the reference: the lines sd-scripts gets from a text-mode open(...).readlines() (universal newlines)
    with open(path, encoding="utf-8") as f:
        reference = [line.rstrip("\n") for line in f.readlines()]
    assert len(reference) == len(specs) and specs[0].prompt == reference[0]
