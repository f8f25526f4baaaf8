"""Training says when the metadata and the image folder do not match (issue 18, item 3)."""

from __future__ import annotations

import pytest

from sdtune.data.dataset import FineTuneData

pytestmark = pytest.mark.unit


def folder(tmp_path, make_image, names):
    for i, name in enumerate(names):
        make_image(tmp_path / f"{name}.png", 64, 64, seed=i)
    return tmp_path


def test_training_on_mostly_empty_captions_is_warned_about(tmp_path, make_image, caplog):
    train = folder(tmp_path / "train", make_image, ["a", "b", "c"])
    images = {k: {"train_resolution": [64, 64]} for k in "abc"}
    images["a"]["caption"] = "a photo"
    with caplog.at_level("WARNING", logger="sdtune"):
        data = FineTuneData.from_metadata(images, train)
    assert len(data.examples) == 3
    assert "2 of 3 images in" in caplog.text and "train with an empty prompt" in caplog.text


def test_entries_without_their_image_are_counted(tmp_path, make_image, caplog):
    train = folder(tmp_path / "train", make_image, ["a", "b"])
    images = {k: {"train_resolution": [64, 64], "caption": k} for k in ("a", "b", "c", "d", "e")}
    with caplog.at_level("WARNING", logger="sdtune"):
        FineTuneData.from_metadata(images, train)
    assert "2 of 5 images found: 3 entries" in caplog.text and "c, d, e" in caplog.text


def test_a_matching_folder_says_nothing(tmp_path, make_image, caplog):
    train = folder(tmp_path / "train", make_image, ["a", "b"])
    images = {k: {"train_resolution": [64, 64], "caption": k} for k in "ab"}
    with caplog.at_level("WARNING", logger="sdtune"):
        FineTuneData.from_metadata(images, train)
    assert caplog.text == ""
