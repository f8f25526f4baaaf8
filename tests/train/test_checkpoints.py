"""Checkpoint names, "save now?" and rotation, without a model (sdtune.train.checkpoints; issue 13).

The rotation is checked against what the options promise (``--save_last_n_steps N``: the step saves of the last N
steps remain; ``--save_last_n_epochs N``: the last N epoch saves remain), by simulating a whole run's saves.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from sdtune.errors import SdtuneError
from sdtune.train.checkpoints import Checkpoints, SavePolicy
from sdtune.train.options import TrainOptions

pytestmark = pytest.mark.unit


def test_names_follow_sd_scripts():
    named, plain = SavePolicy(output_name="cat"), SavePolicy()
    assert (named.name("last"), named.name("epoch", 3), named.name("step", 500)) == (
        "cat", "cat-000003", "cat-step00000500")
    assert (plain.name("last"), plain.name("epoch", 3), plain.name("step", 500)) == (
        "last", "epoch-000003", "step-00000500")
    assert (named.name("best"), plain.name("best")) == ("cat-best", "best")  # --save_best
    with pytest.raises(ValueError):
        plain.name("bestest")


def test_no_step_or_epoch_save_at_the_end_of_the_run():
    policy = SavePolicy(total_steps=10, every_n_steps=5, every_n_epochs=1)
    assert [s for s in range(1, 11) if policy.step_save_due(s)] == [5]  # step 10 is the final save
    assert policy.epoch_save_due(2, 6) and not policy.epoch_save_due(3, 10)
    assert not any(SavePolicy(total_steps=10).step_save_due(s) for s in range(1, 11))


def test_save_n_epoch_ratio_spreads_the_saves_over_the_run():
    opts = TrainOptions(save_n_epoch_ratio=3)
    assert SavePolicy.from_options(opts, total_steps=100, epochs=10).every_n_epochs == 3
    assert SavePolicy.from_options(opts, total_steps=100, epochs=2).every_n_epochs == 1


def simulate(policy: SavePolicy, tmp_path: Path, epochs: int, steps_per_epoch: int) -> Checkpoints:
    written: list[Path] = []
    checkpoints = Checkpoints(tmp_path, policy, model_path=lambda name: tmp_path / f"{name}.safetensors",
                              write_model=lambda path: (path.write_bytes(b"x"), written.append(path)))
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            checkpoints.after_step(step)
            kept = sorted(int(p.stem.split("-")[-1]) for p in tmp_path.glob("step-*.safetensors"))
            due = [s for s in range(1, step + 1) if policy.step_save_due(s)]
            if policy.last_n_steps and policy.step_save_due(step):  # after a save: those of the last N steps
                assert kept == [s for s in due if s >= step - policy.last_n_steps], (step, kept)
            elif not policy.last_n_steps:
                assert kept == due
        checkpoints.after_epoch(epoch, step)
    assert checkpoints.saved == written
    return checkpoints


@pytest.mark.parametrize("every,keep", [(2, 4), (3, 4), (5, 5), (1, 1), (4, None)])
def test_save_last_n_steps_keeps_the_saves_of_the_last_n_steps(tmp_path, every, keep):
    simulate(SavePolicy(total_steps=30, every_n_steps=every, last_n_steps=keep), tmp_path, 1, 30)


@pytest.mark.parametrize("every,keep", [(1, 2), (2, 3), (3, 1)])
def test_save_last_n_epochs_keeps_the_last_n_epoch_saves(tmp_path, every, keep):
    simulate(SavePolicy(total_steps=100, every_n_epochs=every, last_n_epochs=keep), tmp_path, 10, 3)
    kept = sorted(int(p.stem.split("-")[-1]) for p in tmp_path.glob("epoch-*.safetensors"))
    assert kept == [e for e in range(1, 11) if e % every == 0][-keep:]


def test_a_state_folder_goes_with_its_save_and_with_its_rotation(tmp_path):
    def write_state(folder: Path) -> None:
        folder.mkdir()
        (folder / "progress.json").write_text("{}", encoding="utf-8")

    checkpoints = Checkpoints(tmp_path, SavePolicy(total_steps=10, every_n_steps=2, last_n_steps=2),
                              model_path=lambda name: tmp_path / f"{name}.ckpt",
                              write_model=lambda path: path.write_bytes(b"x"), write_state=write_state)
    for step in range(1, 7):
        checkpoints.after_step(step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004-state", "step-00000004.ckpt",
                                                          "step-00000006-state", "step-00000006.ckpt"]


def test_an_ema_copy_is_written_beside_each_save_listed_after_it_and_rotated_with_it(tmp_path):
    """--save_ema_separately: ``<name>-ema`` in the model's format (here a folder, as the diffusers formats)."""
    def write(path: Path, what: bytes) -> None:
        path.mkdir()
        (path / "weights").write_bytes(what)

    checkpoints = Checkpoints(tmp_path, SavePolicy(total_steps=10, every_n_steps=2, last_n_steps=2),
                              model_path=lambda name: tmp_path / name, write_model=lambda path: write(path, b"w"),
                              write_ema=lambda path: write(path, b"ema"))
    for step in range(1, 7):
        checkpoints.after_step(step)
    assert checkpoints.save("last") == tmp_path / "last"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "last-ema", "step-00000004", "step-00000004-ema",
                                                          "step-00000006", "step-00000006-ema"]
    assert (tmp_path / "last-ema" / "weights").read_bytes() == b"ema"
    assert (tmp_path / "last" / "weights").read_bytes() == b"w"
    assert [p.name for p in checkpoints.saved] == [f"{n}{e}" for n in ("step-00000002", "step-00000004",
                                                                       "step-00000006", "last") for e in ("", "-ema")]


def test_only_the_main_process_writes_and_every_process_waits_twice(tmp_path):
    waits: list[int] = []
    other = Checkpoints(tmp_path, SavePolicy(), model_path=lambda name: tmp_path / name,
                        write_model=lambda path: pytest.fail("a non-main process wrote"), is_main=False,
                        barrier=lambda: waits.append(1))
    assert other.save("last") == tmp_path / "last" and waits == [1, 1] and other.saved == []
    (tmp_path / "last").write_bytes(b"x")
    other.remove("last")
    assert (tmp_path / "last").exists()


def test_a_full_disk_names_the_checkpoint_that_is_intact(tmp_path):
    def write(path: Path) -> None:
        if path.name == "second":
            raise OSError(errno.ENOSPC, "No space left on device")
        path.write_bytes(b"x")

    checkpoints = Checkpoints(tmp_path, SavePolicy(), model_path=lambda name: tmp_path / name, write_model=write)
    checkpoints.save("first")
    with pytest.raises(SdtuneError, match=f"no space left on {tmp_path} while saving second; .* the previous "
                                          f"checkpoint {tmp_path / 'first'} is intact"):
        checkpoints.save("second")
    with pytest.raises(OSError, match="Permission"):  # other errors pass through unchanged
        Checkpoints(tmp_path, SavePolicy(), model_path=lambda name: tmp_path / name,
                    write_model=lambda path: (_ for _ in ()).throw(PermissionError("Permission denied"))).save("x")
