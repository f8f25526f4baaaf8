"""Atomic writes give the modes of an ordinary write, keep an overwritten file's mode, and fsync before renaming.

The reference for "an ordinary write" is what the operating system gives ``open(path, "w")`` and ``mkdir`` under
the same umask, not a mode sdtune computes.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from sdtune import atomic
from sdtune.atomic import atomic_dir, atomic_path, write_json_atomic, write_text_atomic

pytestmark = pytest.mark.unit

posix_modes = pytest.mark.skipif(os.name == "nt", reason="Windows has no permission bits beyond read-only")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@posix_modes
def test_new_files_and_folders_get_an_ordinary_writes_mode(tmp_path, umask):
    (tmp_path / "plain.txt").write_text("x")  # the reference
    (tmp_path / "plain-dir").mkdir()
    write_json_atomic(tmp_path / "meta.json", {"a": 1})
    with atomic_path(tmp_path / "lat.npz", suffix=".npz") as tmp:
        np.savez(tmp, latents=np.zeros(2))
    with atomic_dir(tmp_path / "model") as folder:
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text("{}")
    expected = mode(tmp_path / "plain.txt")
    assert expected == 0o666 & ~umask
    assert mode(tmp_path / "meta.json") == expected
    assert mode(tmp_path / "lat.npz") == expected
    assert mode(tmp_path / "model") == mode(tmp_path / "plain-dir") == 0o777 & ~umask
    assert mode(tmp_path / "model" / "unet" / "config.json") == expected


@posix_modes
def test_an_overwritten_file_keeps_its_mode(tmp_path, umask):
    for m in (0o644, 0o640, 0o664, 0o600):
        path = tmp_path / f"caption-{m:o}.txt"
        path.write_text("old")
        path.chmod(m)
        write_text_atomic(path, "new")
        assert path.read_text() == "new"
        assert mode(path) == m, f"{m:o} became {mode(path):o}"
    folder = tmp_path / "model"
    folder.mkdir()
    folder.chmod(0o750)
    with atomic_dir(folder) as tmp:
        (tmp / "f").write_text("x")
    assert mode(folder) == 0o750 and (folder / "f").read_text() == "x"


def test_fsync_comes_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (events.append(("fsync", "")), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace",
                        lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    write_text_atomic(tmp_path / "a.txt", "data")
    assert events[0] == ("fsync", "") and ("replace", "a.txt") in events
    assert events.index(("replace", "a.txt")) > 0
    events.clear()
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x").write_text("1")
        (tmp / "y").write_text("2")
    replace_at = events.index(("replace", "d"))
    assert [e for e in events[:replace_at] if e[0] == "fsync"] == [("fsync", "")] * 2


def test_failed_write_leaves_no_temporary_and_the_old_file(tmp_path):
    path = tmp_path / "m.json"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]
