"""Counting the places where Python waits for the device: the diagnostic behind "one host sync per step".

On a GPU, every ``.item()``, ``.tolist()``, ``float(t)``, ``bool(t)`` (an ``if`` on a tensor), ``int(t)`` and
device-to-host copy blocks the host until the device has caught up, and the GPU then idles while Python prepares
the next kernels. ``torch.cuda.set_sync_debug_mode("warn")`` reports them on a GPU; :class:`HostSyncCounter` counts
the same Python-level conversions on any device (the CPU included), so the count can be tested and benchmarked
here. It cannot see syncs that happen inside kernels' C++ code (``nonzero``, boolean-mask indexing): those need
the CUDA debug mode.
"""

from __future__ import annotations

import collections
import sys
from typing import Any, Callable, Iterable

import torch

CONVERSIONS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "cpu", "numpy")


def _caller(skip_prefixes: tuple[str, ...]) -> str | None:
    """``file:line`` of the first frame outside torch (None: torch itself converted, e.g. optimizers' CPU step
    counters)."""
    frame = sys._getframe(2)
    torch_dir = torch.__file__.rsplit("__init__", 1)[0]
    if frame.f_code.co_filename.startswith(torch_dir):
        return None
    if any(frame.f_code.co_filename.startswith(p) for p in skip_prefixes):
        return None
    return f"{frame.f_code.co_filename}:{frame.f_lineno}"


class HostSyncCounter:
    """While active, counts conversions of tensors to Python values or host memory, by calling line.

    ``counting`` (a flag the caller switches) limits the count to the code of interest, e.g. a training step."""

    def __init__(self, only_non_cpu: bool = False, skip_prefixes: Iterable[str] = ()) -> None:
        self.calls: collections.Counter[str] = collections.Counter()
        self.counting = True
        self.only_non_cpu = only_non_cpu  # on a GPU: count only tensors that live on the device
        self.skip_prefixes = tuple(skip_prefixes)
        self._saved: dict[str, Callable[..., Any]] = {}

    @property
    def total(self) -> int:
        """All host syncs counted."""
        return sum(self.calls.values())

    def __enter__(self) -> "HostSyncCounter":
        for name in CONVERSIONS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    def _wrap(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        counter = self

        def converted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter.counting and not (counter.only_non_cpu and tensor.device.type == "cpu"):
                where = _caller(counter.skip_prefixes)
                if where is not None:
                    counter.calls[f"{name} at {where}"] += 1
            return original(tensor, *args, **kwargs)

        converted.__name__ = name
        return converted

    def report(self) -> str:
        """One line per calling place, most frequent first."""
        return "\n".join(f"{n:4d}  {where}" for where, n in self.calls.most_common()) or "none"


STEP_METHODS = ("optimizer_step", "report", "after_step", "end_epoch")


def count_run_syncs(trainer: Any, only_non_cpu: bool = False) -> tuple[float, HostSyncCounter]:
    """Run ``trainer`` (a :class:`sdtune.train.loop.Trainer`) and count the host syncs of its steps only (the
    optimizer step, progress report, samples and save checks; not set-up or the final save): (syncs per optimizer
    step, the counter with each calling line). ``only_non_cpu``: as :class:`HostSyncCounter`'s."""
    counter = HostSyncCounter(only_non_cpu=only_non_cpu)
    counter.counting = False

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def method(*args: Any, **kwargs: Any) -> Any:
            was, counter.counting = counter.counting, True
            try:
                return original(*args, **kwargs)
            finally:
                counter.counting = was
        return method

    for name in STEP_METHODS:  # on the instance: the class and other trainers stay as they are
        setattr(trainer, name, counted(getattr(trainer, name)))
    try:
        with counter:
            steps = trainer.run()["global_step"]
    finally:
        for name in STEP_METHODS:
            delattr(trainer, name)
    return counter.total / steps, counter
