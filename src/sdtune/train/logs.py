"""What a run shows while it trains: the progress bar on the console and the TensorBoard scalars.

**Loss by timestep quartile** (``loss/q0`` .. ``loss/q3``, as guided-diffusion logs its loss terms): the diffusion
loss depends mostly on the timestep drawn (near 0 the noise is easy to see, near 1000 hard), so the per-step loss
is too noisy to follow; the mean squared error of each quarter of the schedule is not. Each optimizer step's
samples (all ranks', all micro-batches) are summed per quarter on the device, and read with the step's other
figures in its one host wait; a quarter without a sample that step is not logged for it.

Only the main process shows or writes anything; on other ranks, and without ``--logging_dir``, the calls do nothing.
TensorBoard is imported when a log is opened, not before (it is slow to import and most runs never log).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from sdtune.train.interrupt import TolerantStream
from sdtune.train.noise import per_sample_errors


class RunLogs:
    """The run's TensorBoard folder ``<logging_dir>/<log_prefix><start time>``, opened by :meth:`open`."""

    def __init__(self, logging_dir: Optional[str], prefix: str, is_main: bool) -> None:
        self.logging_dir, self.prefix, self.is_main = logging_dir, prefix, is_main
        self.writer: Any = None
        self.folder: Optional[Path] = None

    def open(self) -> None:
        """Start writing (main process with --logging_dir only)."""
        if self.logging_dir and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.folder = Path(self.logging_dir) / f"{self.prefix}{time.strftime('%Y%m%d%H%M%S')}"
            self.writer = SummaryWriter(str(self.folder))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log each ``{tag: value}`` at ``step``."""
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flush and close the log."""
        if self.writer is not None:
            self.writer.close()


class TimestepQuartiles:
    """Per-quarter sums and counts of the unweighted per-sample loss of one optimizer step, on the device."""

    def __init__(self, num_train_timesteps: int, device: torch.device) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.totals = torch.zeros(2, 4, device=device)  # row 0: loss sums, row 1: sample counts

    def reset(self) -> None:
        """A new step."""
        self.totals.zero_()

    def add(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor,
            mask: Optional[torch.Tensor] = None) -> None:
        """Add a micro-batch's per-sample mean squared errors (weighted by ``mask``, --masked_loss) to their
        timesteps' quarters."""
        with torch.no_grad():
            self.add_errors(per_sample_errors(pred.detach(), target, mask), timesteps)

    def add_errors(self, per_sample: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Add per-sample errors (shaped (B,)) to their timesteps' quarters."""
        quarter = (timesteps.long() * 4 // self.num_train_timesteps).clamp(0, 3)
        self.totals[0].index_add_(0, quarter, per_sample.float())
        self.totals[1].index_add_(0, quarter, torch.ones_like(per_sample, dtype=torch.float32))

    @staticmethod
    def figures(values: list[float], prefix: str = "loss/q") -> dict[str, float]:
        """``<prefix><i>`` for each quarter that had samples, from the 8 values of :attr:`totals` (read)."""
        sums, counts = values[:4], values[4:]
        return {f"{prefix}{i}": s / c for i, (s, c) in enumerate(zip(sums, counts)) if c > 0}


def progress_bar(total: int, done: int, is_main: bool) -> tqdm:
    """The training steps' progress bar (main process only); it survives a console that went away (Ctrl-C)."""
    return tqdm(total=total, initial=done, desc="train", unit="step", disable=not is_main, dynamic_ncols=True,
                file=TolerantStream(sys.stderr))
