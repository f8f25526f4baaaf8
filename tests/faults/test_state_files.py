"""A damaged or poisoned state folder on --resume (issue 12, item 6): an error naming the file, never a traceback,
never code run from the file (the .pt files are read with weights_only=True only)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from sdtune.cli import main
from sdtune.train.loop import train
from tests.train.test_resume_checks import resume_args
from tests.train.test_train import options

pytestmark = pytest.mark.component


class _Mkdir:
    """Pickles as a call to os.mkdir: what a poisoned .pt would do, made harmless and visible."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return os.mkdir, (self.target,)


@pytest.fixture(scope="module")
def good_state(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("state-files")
    train(options(prepared, out, max_train_steps=2, save_state=True))
    return out / "out" / "last-state"


@pytest.fixture()
def state(good_state, tmp_path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(good_state, copy)
    return copy


def _resume(prepared, state: Path, out: Path, capsys) -> tuple[int, str]:
    code = main(resume_args(prepared, prepared("sd1")[0], state, out))
    err = capsys.readouterr().err
    return code, err


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize("name, damage", [
    ("optimizer.pt", _truncate),
    ("optimizer.pt", lambda p: p.write_bytes(b"\x80\x04garbage that is not a pickle")),
    ("scheduler.pt", lambda p: p.unlink()),
    ("unet.safetensors", _truncate),
    ("unet.safetensors", lambda p: p.write_bytes(b"\xff" * 64)),
    ("progress.json", lambda p: p.write_text("[1, 2]")),
    ("progress.json", lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "global_step": "many"}))),
    ("progress.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000)),
])
def test_a_damaged_state_file_is_named(prepared, state, tmp_path, capsys, name, damage):
    damage(state / name)
    code, err = _resume(prepared, state, tmp_path / "out", capsys)
    assert code != 0
    assert "Traceback" not in err
    assert "sdtune train: error:" in err and str(state / name) in err, err


def test_a_poisoned_optimizer_file_runs_no_code_and_is_named(prepared, state, tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": [], "payload": _Mkdir(marker)}, str(state / "optimizer.pt"))
    code, err = _resume(prepared, state, tmp_path / "out", capsys)
    assert not marker.exists(), "the pickle's code ran"
    assert code != 0 and "Traceback" not in err
    assert str(state / "optimizer.pt") in err and "refused" in err
    assert "weights_only=False" not in err  # never advise turning the check off
