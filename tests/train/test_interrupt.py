"""Signals stop a run at the next step boundary: a Ctrl-C (SIGINT) or a scheduler's SIGTERM that arrives inside the
optimizer update must not save updated weights with the old step count (the resumed run would apply that step
twice). The state saved on the signal resumes to the uninterrupted run's weights, and the exit code is 128 + the
signal's number."""

from __future__ import annotations

import signal

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.train.interrupt import TrainingStopped
from sdtune.train.loop import Trainer, train
from tests.train.test_train import options


def signal_inside_the_update(monkeypatch, signum: int, at_step: int) -> None:
    """Deliver ``signum`` to this process right after the optimizer changed the weights of step ``at_step``."""
    setup = Trainer.setup

    def patched(trainer):
        setup(trainer)

        def after_update(optimizer, args, kwargs):
            if trainer.progress.global_step + 1 == at_step:
                signal.raise_signal(signum)

        trainer.optimizer.register_step_post_hook(after_update)

    monkeypatch.setattr(Trainer, "setup", patched)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_the_optimizer_update_stops_after_that_step_and_resumes_exactly(prepared, tmp_path,
                                                                                        monkeypatch, signum):
    straight = train(options(prepared, tmp_path / "a", max_train_steps=5, save_state=True))
    trainer = Trainer(options(prepared, tmp_path / "b", max_train_steps=5, save_state=True))
    signal_inside_the_update(monkeypatch, signum, at_step=3)
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
