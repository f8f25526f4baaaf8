"""A file that is not a model says so, names the file and never passes on advice to disable torch.load's safety
check (issue 18, item 6)."""

from __future__ import annotations

import os
import pickle

import pytest

from sdtune.cli import main

pytestmark = pytest.mark.unit

ADVICE = ("weights_only", "will likely succeed", "Re-running")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_a_text_file_is_not_a_checkpoint(tmp_path, capsys, suffix):
    model = tmp_path / f"notes{suffix}"
    model.write_text("model: stable-diffusion-v1-5\nsee the README\n", encoding="utf-8")
    assert main(["convert", str(model), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and "not a model checkpoint" in err and "a text file" in err
    assert "'model: stable-diffusion-v1-5'" in err
    assert not any(phrase in err for phrase in ADVICE), err
    assert "(101)" not in err and "Traceback" not in err


def test_garbage_bytes_are_described_not_numbered(tmp_path, capsys):
    model = tmp_path / "random.ckpt"
    model.write_bytes(bytes(range(7, 250)))
    assert main(["convert", str(model), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "random.ckpt" in err and "neither a zip archive nor a pickle" in err


def test_a_code_carrying_pickle_is_refused_without_the_advice_to_allow_it(tmp_path, capsys):
    model = tmp_path / "evil.ckpt"
    with open(model, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": os.system}, f, protocol=2)
    assert main(["convert", str(model), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "evil.ckpt" in err and "refused to load" in err and "system" in err
    assert not any(phrase in err for phrase in ADVICE), err
