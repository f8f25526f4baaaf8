"""Stopping a run cleanly: Ctrl-C (SIGINT) and SIGTERM (what cluster schedulers send before they kill a job) ask
the loop to stop at the next step boundary, where the saved state is consistent (weights, optimizer and step count
of the same step), instead of raising in the middle of an optimizer update. A second Ctrl-C stops at once, without
saving. Output that cannot be written any more (``sdtune train ... 2>&1 | tee log``: the pipe's reader dies with
the same Ctrl-C) must not stop the state from being saved: :class:`TolerantStream`.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Optional, TextIO

logger = logging.getLogger(__name__)


class StopRequest:
    """While active (a context manager), SIGINT and SIGTERM set :attr:`signal_name` instead of raising; a second
    SIGINT raises KeyboardInterrupt at once. Handlers are installed only in the main thread (Python allows no other)
    and the previous ones are restored on exit."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Has a stop signal arrived (the run stops at the next step boundary)?"""
        return self.signal_name is not None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


class TrainingStopped(KeyboardInterrupt):
    """The run stopped at a step boundary on a signal (the state was saved when --save_state asked for it)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        """The shell's exit status for the signal that stopped the run (128 + its number)."""
        return 128 + int(signal.Signals[self.signal_name])


class TolerantStream:
    """A text stream that stops writing, silently, once its reader is gone (BrokenPipeError / a closed file):
    progress bars write through it so that a dead ``| tee`` cannot abort the run or its final save."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: I/O operation on closed file
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.broken = True


def report_stop(exc: KeyboardInterrupt, bar: Any, state: Path, save: Optional[Callable[[Path], Any]], step: int,
                is_main: bool, save_state: bool) -> None:
    """After a stop: ``save(state)`` first when given (the step boundary is consistent), then close the progress
    bar and say how to resume (or why there is nothing to resume from)."""
    if save is not None:
        save(state)
    bar.close()
    how = exc.signal_name if isinstance(exc, TrainingStopped) else "Ctrl-C"
    if save is not None:
        logger.info("stopped by %s after step %d: resume with --resume %s", how, step, state)
    elif is_main:
        logger.info("stopped by %s at step %d%s", how, step,
                    "" if save_state else " (no --save_state: nothing to resume from)")
