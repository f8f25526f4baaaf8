"""SIGKILL during atomic writes (issue 12): a killed writer leaves the previous file whole or the new one whole,
never a part; what it leaves behind is a temporary of sdtune's name pattern, which the next run removes once stale."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtune.atomic import clean_stale_temporaries

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
WRITER = """
import sys
from sdtune.atomic import atomic_dir, write_text_atomic
target, folder = sys.argv[1], sys.argv[2]
i = 0
while True:
    letter = "AB"[i % 2]
    write_text_atomic(target, letter * 4_000_000)
    with atomic_dir(folder) as tmp:
        (tmp / "one.txt").write_text(letter * 1_000_000)
        (tmp / "two.txt").write_text(letter * 1_000_000)
    i += 1
"""


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigkill_mid_write_leaves_a_whole_file_and_only_cleanable_temporaries(tmp_path):
    target, folder = tmp_path / "meta.json", tmp_path / "state"
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(6):
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(folder)], env=env)
        deadline = time.monotonic() + 30
        while not (target.exists() and folder.exists()) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        text = target.read_text()
        assert text in ("A" * 4_000_000, "B" * 4_000_000)
        if folder.exists():  # absent only between atomic_dir's two renames; the .old folder then holds the data
            parts = {(folder / n).read_text() for n in ("one.txt", "two.txt")}
            assert parts in ({"A" * 1_000_000}, {"B" * 1_000_000})
    left = [p for p in tmp_path.iterdir() if p.name not in ("meta.json", "state")]
    temporaries = [p for p in left if re.fullmatch(r"\..+\.tmp-[0-9a-f]{8}(\..*)?", p.name)]
    assert all(p.name.startswith((".meta.json.", ".state.")) for p in left), left
    assert set(clean_stale_temporaries(tmp_path, older_than_s=0)) == set(temporaries)
    assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in tmp_path.iterdir())
