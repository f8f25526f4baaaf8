"""Atomic writes: a crash or Ctrl-C mid-write leaves the previous file (or none) in place, never half a file.

Write to a temporary name in the same folder, flush it to disk (``os.fsync``), then ``os.replace`` it over the
target (atomic on POSIX and Windows when both are on one volume).

File modes are those of an ordinary write, so a web UI running as another user, or the host outside a container,
can read what sdtune writes:

* a new file gets ``0o666`` less the umask (0644 under the usual 022), a new folder ``0o777`` less the umask: the
  temporary is created with those requested modes and the operating system applies the umask, exactly as for
  ``open(path, "w")`` / ``mkdir``. (``tempfile.mkstemp``/``mkdtemp`` would make them 0600/0700.) The umask is never
  read or changed (``os.umask`` sets it for every thread of the process);
* an overwritten file or folder keeps its mode (``os.stat`` of the old one, ``os.chmod`` of the new).

On Windows, modes are only the read-only flag; the same calls work there and keep it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

_ATTEMPTS = 100


def _fresh_name(target: Path, suffix: str) -> Path:
    return target.with_name(f".{target.name}.tmp-{secrets.token_hex(4)}{suffix}")


def _create_file(target: Path, suffix: str) -> Path:
    """A new empty file next to ``target``, created with mode 0o666 (the umask applies)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_ATTEMPTS):
        tmp = _fresh_name(target, suffix)
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{target.parent}: could not create a temporary file for {target.name}")


def _create_dir(target: Path) -> Path:
    for _ in range(_ATTEMPTS):
        tmp = _fresh_name(target, ".tmp")
        try:
            tmp.mkdir(0o777)  # the umask applies
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{target.parent}: could not create a temporary folder for {target.name}")


def fsync_file(path: Path) -> None:
    """Flush a written file's data to the disk (opened for writing: Windows' fsync needs a writable handle)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable. POSIX only: Windows cannot open a folder (and needs no such step)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _keep_mode(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the mode of the ``target`` it is about to replace, if there is one."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


@contextlib.contextmanager
def atomic_path(target: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; on success it replaces ``target``, on error it is removed.

    ``suffix`` defaults to the target's suffix, for writers that insist on one (``numpy.savez`` adds ``.npz``).
    The new file has the mode an ordinary write would give it, or the mode of the file it replaces.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_file(target, target.suffix if suffix is None else suffix)
    try:
        yield tmp
        fsync_file(tmp)
        _keep_mode(tmp, target)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_text_atomic(target: str | Path, text: str) -> None:
    """Write ``text`` to ``target`` as UTF-8 through :func:`atomic_path`: readers see the old file or the new."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | Path, data: Any) -> None:
    """Write ``data`` to ``target`` as indented JSON (non-ASCII kept, a final newline), atomically."""
    write_text_atomic(target, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target``; on success it takes ``target``'s place.

    The previous folder is renamed aside first and deleted only after the new one is in place, so an interrupted
    save leaves either the old folder or the new one. Every file in the new folder is flushed to disk first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_dir(target)
    try:
        yield tmp
        for path in sorted(tmp.rglob("*")):
            if path.is_file() and not path.is_symlink():
                fsync_file(path)
        _keep_mode(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(folders: Iterable[tuple[str, Path]]) -> None:
    """Create each ``(option, folder)`` and write a scratch file in it; an :class:`SdtuneError` names the first
    that fails, with the reason and the fix."""
    for option, folder in folders:
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except FileExistsError as exc:
            raise SdtuneError(f"{option} {folder}: a file of that name is in the way ({exc.filename}); choose a "
                              "folder path") from exc
        except OSError as exc:
            raise SdtuneError(f"{option} {folder}: cannot write there ({exc.strerror or exc}); choose a folder you "
                              "can write to, or fix its permissions") from exc


# A temporary of this module: ".{target name}.tmp-{8 hex digits}{suffix}" (see _fresh_name); nothing else matches.
_TEMP_NAME = re.compile(r"^\..+\.tmp-[0-9a-f]{8}(\.[^/]*)?$")
STALE_AFTER_S = 3600.0


def clean_stale_temporaries(folder: str | Path, older_than_s: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporaries an atomic write left in ``folder`` when its process was killed (SIGKILL, power cut):
    only names of this module's pattern, and only those not modified for ``older_than_s`` seconds, so a write in
    progress by another run is never touched. Returns what was removed; a temporary that cannot be removed is
    left and not counted (the run does not depend on it)."""
    removed: list[Path] = []
    folder = Path(folder)
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed  # a folder that cannot be listed is reported by whatever reads it next
    for entry in entries:
        if not _TEMP_NAME.match(entry.name):
            continue
        try:
            info = entry.lstat()
            if now - info.st_mtime < older_than_s:
                continue
            if stat.S_ISDIR(info.st_mode):
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue  # in use, or removed by another run meanwhile: nothing of this run depends on it
        removed.append(entry)
    if removed:
        logger.warning("%s: removed %d temporary file(s) left by an interrupted run (e.g. %s)", folder, len(removed),
                       removed[0].name)
    return removed
