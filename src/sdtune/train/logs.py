"""What a run shows while it trains: the progress bar on the console and the TensorBoard scalars.

Only the main process shows or writes anything; on other ranks, and without ``--logging_dir``, the calls do nothing.
TensorBoard is imported when a log is opened, not before (it is slow to import and most runs never log).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Optional

from tqdm import tqdm

from sdtune.train.interrupt import TolerantStream


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


def progress_bar(total: int, done: int, is_main: bool) -> tqdm:
    """The training steps' progress bar (main process only); it survives a console that went away (Ctrl-C)."""
    return tqdm(total=total, initial=done, desc="train", unit="step", disable=not is_main, dynamic_ncols=True,
                file=TolerantStream(sys.stderr))
