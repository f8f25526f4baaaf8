"""The training loss by timestep quarter in TensorBoard (``loss/q0`` .. ``loss/q3``, guided-diffusion's view):
a step whose timesteps all fall in one quarter logs that quarter, with the step's loss, and no other."""

from __future__ import annotations

import pytest
import torch

from sdtune.train.loop import train
from tests.train.test_train import options

pytestmark = pytest.mark.component


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = list(folder.iterdir())
    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.parametrize("low, high, quarter", [(0, 250, 0), (750, 1000, 3)])
def test_a_step_in_one_quarter_logs_that_quarter_with_the_steps_loss(prepared, tmp_path, low, high, quarter):
    result = train(options(prepared, tmp_path, max_train_steps=3, logging_dir=str(tmp_path / "logs"),
                           min_timestep=low, max_timestep=high))
    scalars = _scalars(tmp_path / "logs")
    assert {f"loss/q{i}" for i in range(4)} & set(scalars) == {f"loss/q{quarter}"}
    # one batch a step: the mean of its samples' errors is its mean squared error (the step's loss)
    torch.testing.assert_close(torch.tensor(scalars[f"loss/q{quarter}"]), torch.tensor(result["losses"]),
                               rtol=1e-5, atol=1e-7)


def test_the_full_schedule_logs_several_quarters(prepared, tmp_path):
    train(options(prepared, tmp_path, max_train_steps=6, train_batch_size=3, logging_dir=str(tmp_path / "logs")))
    scalars = _scalars(tmp_path / "logs")
    quarters = [tag for tag in scalars if tag.startswith("loss/q")]
    assert len(quarters) >= 3  # 18 samples drawn over the whole schedule
    assert sum(len(scalars[q]) for q in quarters) >= 6  # every step logs at least one quarter


def test_quarters_are_guided_diffusions_at_every_timestep():
    """Every timestep lands in the quarter guided-diffusion's log_loss_dict gives it (``int(4 * t /
    num_timesteps)``, written here from its train_util.py), boundaries included (249 -> 0, 250 -> 1, 999 -> 3),
    and each quarter's sum and count are those of its samples."""
    from sdtune.train.logs import TimestepQuartiles

    steps = 1000
    timesteps = torch.arange(steps)
    errors = torch.rand(steps, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    quartiles = TimestepQuartiles(steps, torch.device("cpu"))
    quartiles.add_errors(errors, timesteps)
    sums, counts = [0.0] * 4, [0] * 4
    for t, e in zip(timesteps.tolist(), errors.tolist()):
        q = int(4 * t / steps)
        sums[q] += e
        counts[q] += 1
    assert counts == [250, 250, 250, 250]
    torch.testing.assert_close(quartiles.totals[1], torch.tensor(counts, dtype=torch.float32))
    torch.testing.assert_close(quartiles.totals[0], torch.tensor(sums, dtype=torch.float32))
    figures = TimestepQuartiles.figures(quartiles.totals.flatten().tolist())
    torch.testing.assert_close(torch.tensor([figures[f"loss/q{i}"] for i in range(4)]),
                               torch.tensor([s / c for s, c in zip(sums, counts)]), rtol=1e-6, atol=1e-7)
