"""Signals stop a run at the next step boundary: a Ctrl-C (SIGINT) or a scheduler's SIGTERM that arrives inside the
optimizer update must not save updated weights with the old step count (the resumed run would apply that step
twice). The state saved on the signal resumes to the uninterrupted run's weights, and the exit code is 128 + the
signal's number."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.train import optim
from sdtune.train.interrupt import TrainingStopped
from sdtune.train.loop import Trainer, train
from tests.train.test_train import options

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = """
import json, signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)
train = subprocess.Popen(json.loads(sys.argv[1]), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=default)
tee = subprocess.Popen(["tee", sys.argv[2]], stdin=train.stdout, stdout=subprocess.DEVNULL, preexec_fn=default)
train.stdout.close()
code = train.wait()
tee.wait()
sys.exit(code if code >= 0 else 128 - code)
"""


def signal_inside_the_update(monkeypatch, signum: int, at_step: int) -> None:
    """Deliver ``signum`` to this process right after the optimizer changed the weights of step ``at_step`` (of a
    run built after this call, not resumed)."""
    build = optim.build_optimizer

    def building(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        updates = []

        def after_update(optimizer, args, kwargs):
            updates.append(1)
            if len(updates) == at_step:
                signal.raise_signal(signum)

        optimizer.register_step_post_hook(after_update)
        return optimizer

    monkeypatch.setattr(optim, "build_optimizer", building)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_the_optimizer_update_stops_after_that_step_and_resumes_exactly(prepared, tmp_path,
                                                                                        monkeypatch, signum):
    straight = train(options(prepared, tmp_path / "a", max_train_steps=5, save_state=True))
    signal_inside_the_update(monkeypatch, signum, at_step=3)
    trainer = Trainer(options(prepared, tmp_path / "b", max_train_steps=5, save_state=True))
    with pytest.raises(TrainingStopped) as stopped:
        trainer.run()
    monkeypatch.undo()
    assert stopped.value.signal_name == signal.Signals(signum).name
    assert stopped.value.exit_code == 128 + signum
    assert len(trainer.saved) == 0 and not (tmp_path / "b" / "out" / "last.safetensors").exists()
    state = tmp_path / "b" / "out" / "interrupted-state"
    assert '"global_step": 3' in (state / "progress.json").read_text()  # the step the weights are at
    resumed = train(options(prepared, tmp_path / "b", max_train_steps=5, resume=str(state), save_state=True))
    assert resumed["losses"] == straight["losses"][3:]
    a = load_file(str(tmp_path / "a" / "out" / "last-state" / "unet.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "last-state" / "unet.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigterm_through_the_cli_saves_the_state_and_exits_143(prepared, tmp_path, monkeypatch, capsys, caplog):
    caplog.set_level("INFO", logger="sdtune")
    model, train_dir, meta = prepared("sd1")
    signal_inside_the_update(monkeypatch, signal.SIGTERM, at_step=2)
    out = tmp_path / "out"
    code = main(["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta),
                 "--train_data_dir", str(train_dir), "--output_dir", str(out), "--max_train_steps", "5",
                 "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--save_state"])
    assert code == 143
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    state = out / "interrupted-state"
    assert f"stopped by SIGTERM after step 2: resume with --resume {state}" in caplog.text
    assert '"global_step": 2' in (state / "progress.json").read_text()


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "killpg") or shutil.which("tee") is None, reason="needs POSIX process groups "
                    "and tee")
def test_ctrl_c_with_output_piped_through_tee_still_saves_the_state(prepared, tmp_path):
    """Issue 18: `sdtune train ... --save_state 2>&1 | tee log` and Ctrl-C. The terminal sends SIGINT to the whole
    pipeline; tee dies first, so every later write of sdtune's hits a closed pipe. The state must be saved anyway
    and the exit code must say "interrupted"."""
    model, train_dir, meta = prepared("sd1")
    out, log = tmp_path / "out", tmp_path / "train.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    train_cmd = [sys.executable, "-m", "sdtune", "train", "--pretrained_model_name_or_path", str(model),
                 "--in_json", str(meta), "--train_data_dir", str(train_dir), "--output_dir", str(out),
                 "--max_train_steps", "100000", "--train_batch_size", "2", "--max_data_loader_n_workers", "0",
                 "--save_state"]
    # A launcher plays the shell: it starts `train | tee log` in a new process group and ignores SIGINT itself.
    launcher = subprocess.Popen([sys.executable, "-c", PIPELINE, json.dumps(train_cmd), str(log)], env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not re.search(r"\b([3-9]|\d\d+)/100000", log.read_text(errors="replace") if log.exists() else ""):
            assert launcher.poll() is None and time.monotonic() < deadline, \
                log.read_text(errors="replace")[-2000:] if log.exists() else "no log"
            time.sleep(0.2)
        os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        code = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert code == 130
    state = out / "interrupted-state"
    assert (state / "progress.json").is_file() and (state / "unet.safetensors").is_file()


def test_a_signal_during_the_final_save_waits_for_it_and_the_run_completes(prepared, tmp_path, caplog):
    """The stop handler stays installed through the final save: a SIGTERM there (a scheduler's, as the job ends)
    no longer kills the process half-way through writing the last checkpoint and state."""
    caplog.set_level("INFO", logger="sdtune")
    trainer = Trainer(options(prepared, tmp_path, max_train_steps=2, save_state=True))
    save_model = trainer.save_model

    def signalled(path, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # default handler: the process would die here
        return save_model(path, *args, **kwargs)

    trainer.save_model = signalled
    trainer.checkpoints.write_model = signalled
    result = trainer.run()
    assert result["global_step"] == 2 and result["model"].exists()
    assert (tmp_path / "out" / "last-state" / "progress.json").is_file()
    assert "SIGTERM arrived during the final save, after the last step: the run is complete" in caplog.text
