"""The output folder of a run (issue 12 items 1-2, issue 18 item 2): checked before the model loads, one run at a
time, an earlier run's files never replaced in silence."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.cli import main
from sdtune.train import base_model
from sdtune.train.loop import train
from sdtune.train.run_folder import LOCK_NAME, pid_alive
from tests.train.test_train import options

pytestmark = pytest.mark.component

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model is loaded: every check here must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(base_model, "load_model", refuse)


def train_args(prepared, out: Path, *extra: str) -> list[str]:
    model, train_dir, meta = prepared("sd1")
    return ["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta), "--train_data_dir",
            str(train_dir), "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "2",
            "--max_data_loader_n_workers", "0", *extra]


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_loads(prepared, tmp_path, capsys,
                                                                        no_model_load):
    blocker = tmp_path / "out"
    blocker.write_text("my notes", encoding="utf-8")
    assert main(train_args(prepared, blocker)) == 2
    err = capsys.readouterr().err
    assert f"--output_dir {blocker}: a file of that name is in the way" in err
    assert blocker.read_text(encoding="utf-8") == "my notes"  # untouched


def test_a_logging_dir_below_a_file_is_refused_naming_it(prepared, tmp_path, capsys, no_model_load):
    (tmp_path / "logs").write_text("x", encoding="utf-8")
    assert main(train_args(prepared, tmp_path / "out", "--logging_dir", str(tmp_path / "logs" / "tb"))) == 2
    assert f"--logging_dir {tmp_path / 'logs' / 'tb'}" in capsys.readouterr().err


@pytest.mark.skipif(os.name == "nt" or (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv")
                                        is None), reason="needs POSIX permissions (as root: setpriv to drop the "
                    "capabilities that override them)")
def test_a_read_only_output_dir_is_refused_in_seconds_not_at_the_first_save(prepared, tmp_path):
    """As a user without write permission (root runs with its capabilities dropped: root would write anyway)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
        run = subprocess.run([*prefix, sys.executable, "-m", "sdtune", *train_args(prepared, folder / "out")],
                             capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        folder.chmod(stat.S_IRWXU)
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"--output_dir {folder / 'out'}: cannot write there (Permission denied)" in run.stderr
    assert "model:" not in run.stderr  # refused before the model loaded
    assert "Traceback" not in run.stderr


def test_a_second_run_into_a_folder_held_by_a_live_run_is_refused(prepared, tmp_path, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                 "started": "2026-12-02T10:00:00+00:00"}), encoding="utf-8")
        assert main(train_args(prepared, out)) == 2
    finally:
        other.kill()
        other.wait()
    err = capsys.readouterr().err
    assert f"another sdtune train is running into this folder (pid {other.pid}" in err
    assert (out / LOCK_NAME).is_file()  # the other run's lock is not touched


def test_a_stale_lock_is_taken_over_with_a_warning_and_released_at_the_end(prepared, tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert not pid_alive(gone.pid)
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "earlier"}),
                                 encoding="utf-8")
    held = []
    original = base_model.load_model

    def load_model(*args, **kwargs):
        held.append(json.loads((out / LOCK_NAME).read_text(encoding="utf-8")))
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(base_model, "load_model", load_model)
        train(options(prepared, tmp_path, max_train_steps=2))
    assert held[0]["pid"] == os.getpid()  # this run held the folder while it trained
    assert f"taking over the lock of a run that is no longer running (pid {gone.pid}" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_a_finished_run_is_not_overwritten_without_a_word(prepared, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(train_args(prepared, out, "--save_every_n_steps", "1", "--save_state")) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(train_args(prepared, out)) == 2
    err = capsys.readouterr().err
    assert "holds an earlier run's files that this run would replace (last-state, last.safetensors, " in err
    assert "--overwrite" in err and "--resume" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched
    # another --output_name in the same folder is another run's files: allowed
    assert main(train_args(prepared, out, "--output_name", "second")) == 0
    assert (out / "second.safetensors").is_file() and (out / "last.safetensors").is_file()


def test_overwrite_starts_afresh_and_resume_continues(prepared, tmp_path, caplog):
    out = tmp_path / "out"
    assert main(train_args(prepared, out, "--save_every_n_steps", "1", "--save_state")) == 0
    assert (out / "step-00000001.safetensors").is_file()
    assert main(train_args(prepared, out, "--overwrite")) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["last.safetensors"]  # the earlier run's step saves and states are gone: one run's files
    assert "--overwrite: deleted the earlier run's" in caplog.text
    assert main(train_args(prepared, out, "--save_state")) == 2  # refused again: a finished run is there
    assert main(train_args(prepared, out, "--save_state", "--overwrite")) == 0
    args = train_args(prepared, out, "--resume", str(out / "last-state"))
    args[args.index("--max_train_steps") + 1] = "4"
    assert main(args) == 0  # continuing the run in its own folder


def test_generate_checks_its_outdir_before_the_model_loads(prepared, tmp_path, capsys, monkeypatch):
    import sdtune.models.io as io

    monkeypatch.setattr(io, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    (tmp_path / "pictures").write_text("x", encoding="utf-8")
    code = main(["generate", "--ckpt", str(prepared("sd1")[0]), "--prompt", "x", "--W", "64", "--H", "64",
                 "--steps", "1", "--outdir", str(tmp_path / "pictures")])
    assert code == 2
    assert f"--outdir {tmp_path / 'pictures'}: a file of that name is in the way" in capsys.readouterr().err
