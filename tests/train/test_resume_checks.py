"""--resume is checked against what the state was trained from (issue 12 item 5), and a full disk during a save is
reported as such, with what is safe (issue 12 item 6)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.models.save import save_model
from sdtune.models.tiny import build_tiny
from sdtune.train.loop import train
from tests.train.test_train import options, run_with_ctrl_c_after

pytestmark = pytest.mark.component

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def state(prepared, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume-checks")
    train(options(prepared, out, max_train_steps=2, save_state=True))
    return out / "out" / "last-state"


def resume_args(prepared, model: Path, state: Path, out: Path, meta: Path | None = None) -> list[str]:
    _, train_dir, default_meta = prepared("sd1")
    return ["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta or default_meta),
            "--train_data_dir", str(train_dir), "--output_dir", str(out), "--max_train_steps", "3",
            "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--resume", str(state)]


def test_the_state_records_the_base_model_and_the_metadata(state, prepared):
    record = json.loads((state / "provenance.json").read_text(encoding="utf-8"))
    model, _, meta = prepared("sd1")
    assert record["base_model"] == str(model) and record["metadata_file"] == str(meta)
    assert len(record["base_fingerprint"]) == 16 and len(record["metadata_sha256"]) == 64


def test_the_same_model_in_another_format_resumes(state, prepared, saved_model, tmp_path):
    single_file = saved_model("sd1", "safetensors")  # the same weights as the diffusers folder trained from
    assert main(resume_args(prepared, single_file, state, tmp_path / "out")) == 0


def test_another_base_model_of_the_same_family_is_refused_naming_both(state, prepared, tmp_path, capsys):
    other = build_tiny("sd1")
    with torch.no_grad():
        other.vae.encoder.conv_in.weight.add_(0.01)  # a fine-tune of the base: same family, same shapes
    other_path = save_model(other, tmp_path / "other.safetensors", "safetensors")
    assert main(resume_args(prepared, other_path, state, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert f"--resume {state}: that state was trained from {prepared('sd1')[0]}" in err
    assert f"--pretrained_model_name_or_path {other_path} is another model" in err
    assert not (tmp_path / "out" / "last.safetensors").exists()


def test_a_base_model_of_another_family_is_refused_without_torchs_size_listing(state, prepared, saved_model,
                                                                               tmp_path, capsys):
    assert main(resume_args(prepared, saved_model("sd2", "diffusers_safetensors"), state, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "is another model" in err and "size mismatch" not in err and "Traceback" not in err


def test_changed_metadata_is_a_warning_naming_both(state, prepared, tmp_path, caplog):
    _, _, meta = prepared("sd1")
    data = json.loads(meta.read_text(encoding="utf-8"))
    changed = tmp_path / "meta_changed.json"
    changed.write_text(json.dumps(data, indent=2), encoding="utf-8")  # other bytes, as after an edit
    assert main(resume_args(prepared, prepared("sd1")[0], state, tmp_path / "out", changed)) == 0
    assert f"--in_json {changed} is not the metadata the state was trained on ({meta}" in caplog.text


@pytest.mark.skipif(os.name == "nt" or not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("mount"),
                    reason="mounting a small tmpfs needs root on Linux")
def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoint(prepared, tmp_path):
    """A real full disk: a 30 MB tmpfs holds the first checkpoint (about 20 MB) and not the second."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=30m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        model, train_dir, meta = prepared("sd1")
        run = subprocess.run(
            [sys.executable, "-m", "sdtune", "train", "--pretrained_model_name_or_path", str(model), "--in_json",
             str(meta), "--train_data_dir", str(train_dir), "--output_dir", str(disk / "out"), "--max_train_steps",
             "4", "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--save_every_n_steps", "1"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert run.returncode == 2, run.stderr[-3000:]
        assert f"no space left on {disk / 'out'} while saving step-00000002.safetensors" in run.stderr
        assert f"the previous checkpoint {disk / 'out' / 'step-00000001.safetensors'} is intact" in run.stderr
        assert "Traceback" not in run.stderr
        assert load_file(str(disk / "out" / "step-00000001.safetensors"))  # it loads
        assert sorted(p.name for p in (disk / "out").iterdir()) == ["step-00000001.safetensors"]  # no temp left
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_missing_resume_path_says_no_such_folder(prepared, tmp_path, capsys):
    assert main(resume_args(prepared, prepared("sd1")[0], tmp_path / "nope", tmp_path / "out")) == 2
    assert f"--resume {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err


def test_resume_of_an_output_folder_takes_the_state_furthest_along(prepared, tmp_path, caplog):
    caplog.set_level("INFO", logger="sdtune")
    out = tmp_path / "out"
    train(options(prepared, tmp_path, max_train_steps=2, save_state=True, save_every_n_steps=1))
    assert (out / "step-00000001-state").is_dir() and (out / "last-state").is_dir()
    caplog.clear()
    result = train(options(prepared, tmp_path, max_train_steps=3, resume=str(out)))
    assert f"resuming from the state furthest along in it, {out / 'last-state'} (step 2)" in caplog.text
    assert "the others: step-00000001-state" in caplog.text
    assert result["global_step"] == 3 and len(result["losses"]) == 1


def test_changed_text_conditioning_on_resume_is_warned(state, prepared, tmp_path, caplog):
    assert main([*resume_args(prepared, prepared("sd1")[0], state, tmp_path / "out"), "--clip_skip", "2",
                 "--max_token_length", "150"]) == 0
    assert "--clip_skip 2: the state was trained with --clip_skip 1" in caplog.text
    assert "--max_token_length 150: the state was trained with --max_token_length 75" in caplog.text


def test_the_interrupted_state_is_removed_once_its_run_has_finished(prepared, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="sdtune")
    from sdtune.train.loop import Trainer

    run_with_ctrl_c_after(Trainer(options(prepared, tmp_path, max_train_steps=4, save_state=True)), monkeypatch, 2)
    spent = tmp_path / "out" / "interrupted-state"
    assert spent.is_dir()
    train(options(prepared, tmp_path, max_train_steps=4, save_state=True, resume=str(spent)))
    assert not spent.exists() and (tmp_path / "out" / "last-state").is_dir()
    assert f"removed {spent}: the run it resumed has finished" in caplog.text


def test_samples_cut_short_by_ctrl_c_are_made_on_resume(prepared, tmp_path, monkeypatch, caplog):
    """A second Ctrl-C during sampling stops at once; the state of that step boundary is saved with none of the
    step's images. The resumed run makes them first."""
    from sdtune.train import loop  # the trainer calls its own imported name

    caplog.set_level("INFO", logger="sdtune")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square --w 32 --h 32 --s 1\n", encoding="utf-8")
    real = loop.sample_during_training
    calls = []

    def cut_short(*args, **kwargs):
        calls.append(args[3])
        if args[3] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "sample_during_training", cut_short)
    common = dict(max_train_steps=3, save_state=True, sample_prompts=str(prompts), sample_every_n_steps=2)
    with pytest.raises(KeyboardInterrupt):
        train(options(prepared, tmp_path, **common))
    sample_dir = tmp_path / "out" / "sample"
    assert not (sample_dir / "sample_000002_00.png").exists()
    monkeypatch.setattr(loop, "sample_during_training", real)
    train(options(prepared, tmp_path, resume=str(tmp_path / "out" / "interrupted-state"), **common))
    assert (sample_dir / "sample_000002_00.png").is_file()
    assert "step 2: its samples were cut short when the run stopped; making them now" in caplog.text
