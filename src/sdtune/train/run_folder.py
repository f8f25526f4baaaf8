"""The output folder of a run: checked before anything loads, held by one run at a time, never overwritten in
silence.

* :func:`sdtune.atomic.check_writable` creates each folder the run will write and writes a file there, before the
  model loads: a folder that cannot be written is reported in seconds, not at the first save after hours of training.
* :class:`RunLock` (``<output_dir>/.sdtune-train.lock``: pid, host, start time) keeps a second run out of the same
  folder; a lock whose process is gone (same host) is taken over with a warning.
* :func:`earlier_run_files` lists the checkpoints and states of an earlier run that this run's names would
  replace; the trainer refuses them unless ``--overwrite`` (or ``--resume``) says so.
* :func:`claim_output_folder` does all of that, in that order, for a run about to start.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, Optional

from sdtune.atomic import check_writable, clean_stale_temporaries
from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

LOCK_NAME = ".sdtune-train.lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (without signalling it: on Windows ``os.kill`` would end
    it)."""
    if pid <= 0:
        return False
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class RunLock:
    """One training run per output folder. :meth:`check` (every rank) refuses while another live run holds the
    folder; :meth:`acquire` (rank 0) writes the lock; :meth:`release` removes it (also after a failure)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / LOCK_NAME
        self.held = False

    def _read(self) -> Optional[dict]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: treated as stale below
        return data if isinstance(data, dict) else {}

    def check(self) -> None:
        """Refuse when a live run (this host) or a run on another host holds the folder."""
        owner = self._read()
        if owner is None:
            return
        host, pid = owner.get("host"), owner.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and pid_alive(pid):
            raise SdtuneError(
                f"{self.path.parent}: another sdtune train is running into this folder (pid {pid}, started "
                f"{owner.get('started', '?')}; lock file {self.path}). Two runs in one folder overwrite each "
                "other's checkpoints: wait for it, or use another --output_dir")
        if host not in (None, socket.gethostname()):
            raise SdtuneError(
                f"{self.path.parent}: a run on host {host} (pid {pid}, started {owner.get('started', '?')}) holds "
                f"this folder (lock file {self.path}); if that run is over, delete the lock file")

    def acquire(self) -> None:
        """Take the folder's lock (taking over a stale one with a warning); raises when another run holds it."""
        owner = self._read()
        if owner is not None:
            self.check()
            logger.warning("%s: taking over the lock of a run that is no longer running (pid %s, started %s)",
                           self.path.parent, owner.get("pid", "?"), owner.get("started", "?"))
            self.path.unlink(missing_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError as exc:  # another run took it between the check and now
            self.check()
            raise SdtuneError(f"{self.path}: another run took this folder just now; use another --output_dir") \
                from exc
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
        self.held = True

    def release(self) -> None:
        """Remove the lock file if this run holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def run_file_pattern(output_name: Optional[str]) -> re.Pattern[str]:
    """Names of the checkpoints and state folders a run with ``output_name`` writes (any format's extension)."""
    if output_name:
        stem = rf"{re.escape(output_name)}(-\d{{6}}|-step\d{{8}})?"
    else:
        stem = r"(last|epoch-\d{6}|step-\d{8})"
    return re.compile(rf"^(?:{stem}(-state)?(\.[A-Za-z0-9]+)?|interrupted-state)$")


def earlier_run_files(output_dir: Path, output_name: Optional[str]) -> list[Path]:
    """Files and folders in ``output_dir`` that a run named ``output_name`` would write: an earlier run's."""
    if not Path(output_dir).is_dir():
        return []
    pattern = run_file_pattern(output_name)
    return sorted(p for p in Path(output_dir).iterdir() if pattern.match(p.name))



def remove_earlier_run_files(output_dir: Path, earlier: list[Path]) -> None:
    """--overwrite: delete an earlier run's checkpoints and states (found by :func:`earlier_run_files`), saying so."""
    for path in earlier:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if earlier:
        logger.warning("--overwrite: deleted the earlier run's %s from %s", ", ".join(p.name for p in earlier),
                       output_dir)


def remove_spent_interrupted_state(output_dir: Path, resumed: Optional[str]) -> None:
    """After a finished run resumed from ``output_dir``'s ``interrupted-state``, that state is spent: removed, so
    that a later ``--resume`` of the folder does not go back to it."""
    spent = Path(output_dir) / "interrupted-state"
    if resumed and spent.is_dir() and Path(resumed).resolve() == spent.resolve():
        shutil.rmtree(spent)
        logger.info("removed %s: the run it resumed has finished", spent)


def claim_output_folder(opts: Any, lock: RunLock, is_main: bool, barrier: Callable[[], None]) -> None:
    """Before any model loads: every folder the run writes can be written, no other run holds it, and no earlier
    run's files would be replaced in silence (``opts``: ``sdtune train``'s options; ``barrier``: accelerate's
    ``wait_for_everyone``, so that no process goes on before the main one holds the folder)."""
    output_dir = Path(opts.output_dir)
    folders = [("--output_dir", output_dir)]
    if opts.logging_dir:
        folders.append(("--logging_dir", Path(opts.logging_dir)))
    if opts.sample_prompts:
        folders.append(("--sample_prompts: the samples folder", output_dir / "sample"))
    if is_main:
        check_writable(folders)
    lock.check()
    earlier = [] if opts.resume else earlier_run_files(output_dir, opts.output_name)
    if earlier and not opts.overwrite:
        names = ", ".join(p.name for p in earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
        raise SdtuneError(
            f"--output_dir {output_dir} holds an earlier run's files that this run would replace ({names}). Use "
            "another --output_dir or --output_name, --resume <its state folder> to continue that run, or "
            "--overwrite to delete them and start afresh")
    barrier()
    if is_main:
        lock.acquire()
        for folder in (output_dir, output_dir / "sample"):  # what a killed run left (issue 12 item 7)
            clean_stale_temporaries(folder)
        remove_earlier_run_files(output_dir, earlier)
    barrier()
