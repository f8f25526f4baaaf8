"""Captions are not cut at Unicode line separators (issue 12, item 8): lines end at "\\n" only, as in sd-scripts."""

from __future__ import annotations

import pytest

from sdtune.data.metadata import load_metadata, read_sidecar, save_metadata

pytestmark = pytest.mark.unit

SEPARATORS = ["\u2028", "\u2029", "\x0c", "\x0b", "\x1c", "\x85"]


@pytest.mark.parametrize("sep", SEPARATORS, ids=[f"U+{ord(c):04X}" for c in SEPARATORS])
def test_a_caption_with_a_line_separator_survives_a_jsonl_round_trip(tmp_path, sep):
    images = {"img00": {"caption": f"a red{sep}square", "tags": "red, square"},
              "img01": {"caption": "a blue square"}}
    path = tmp_path / "meta.jsonl"
    save_metadata(path, images)
    assert load_metadata(path) == images


def test_windows_line_endings_still_separate_jsonl_lines(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_bytes(b'{"image_path": "a", "caption": "one"}\r\n{"image_path": "b", "caption": "two"}\r\n')
    assert load_metadata(path) == {"a": {"caption": "one"}, "b": {"caption": "two"}}


def test_a_sidecar_keeps_its_separator(tmp_path):
    path = tmp_path / "img00.caption"
    path.write_text("a red\u2028square\n", encoding="utf-8")
    assert read_sidecar(path) == "a red\u2028square"
