"""--recursive and symbolic links (issue 12, item 7): a linked sub-folder is followed once; a loop is named."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from sdtune.data.images import list_images

pytestmark = [pytest.mark.unit, pytest.mark.skipif(os.name == "nt", reason="symbolic links need privileges on Windows")]


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)
    return path


def test_a_linked_sub_folder_is_followed(tmp_path):
    train = tmp_path / "train"
    _image(train / "own.png")
    _image(tmp_path / "elsewhere" / "linked.png")
    (train / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    assert [p.relative_to(train) for p in list_images(train, recursive=True)] == [Path("more/linked.png"),
                                                                                  Path("own.png")]


def test_a_link_loop_ends_and_is_named(tmp_path, caplog):
    train = tmp_path / "train"
    _image(train / "sub" / "a.png")
    (train / "sub" / "back").symlink_to(train, target_is_directory=True)  # a loop
    with caplog.at_level(logging.WARNING):
        images = list_images(train, recursive=True)
    assert images == [train / "sub" / "a.png"]
    assert any(str(train / "sub" / "back") in r.getMessage() and "listed already" in r.getMessage()
               for r in caplog.records)


def test_two_links_to_one_folder_list_its_images_once(tmp_path, caplog):
    train = tmp_path / "train"
    _image(train / "real" / "a.png")
    (train / "zlink").symlink_to(train / "real", target_is_directory=True)
    with caplog.at_level(logging.WARNING):
        assert list_images(train, recursive=True) == [train / "real" / "a.png"]
    assert any(str(train / "zlink") in r.getMessage() for r in caplog.records)
