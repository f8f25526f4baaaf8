"""prepare and its folders (issue 12, items 6 and 7): a read-only image folder is named before the VAE loads, and
temporaries a killed run left are cleaned at the next run (only sdtune's, only stale ones)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sdtune.cli import main
from sdtune.data.metadata import save_metadata
from tests.train.conftest import make_images

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BUCKETS = ["--max_resolution", "64,64", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
           "--bucket_reso_steps", "32", "--max_data_loader_n_workers", "0"]


@pytest.fixture()
def folder(tmp_path) -> tuple[Path, Path]:
    train = tmp_path / "train"
    meta = tmp_path / "meta.json"
    save_metadata(meta, make_images(train, count=2))
    return train, meta


@pytest.mark.skipif(os.name == "nt" or (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("setpriv")
                                        is None), reason="needs POSIX permissions (as root: setpriv to drop the "
                    "capabilities that override them)")
def test_a_read_only_image_folder_is_named_not_a_temporary_file(folder, tmp_path, saved_model):
    train, meta = folder
    train.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    try:
        prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all"] if os.geteuid() == 0 else []
        run = subprocess.run([*prefix, sys.executable, "-m", "sdtune", "prepare", str(train), str(meta),
                              str(tmp_path / "meta_lat.json"), str(saved_model("sd1", "diffusers_safetensors")),
                              *BUCKETS], capture_output=True, text=True, timeout=180,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    finally:
        train.chmod(stat.S_IRWXU)
    assert run.returncode != 0
    assert f"--train_data_dir {train}: cannot write there (Permission denied)" in run.stderr, run.stderr[-2000:]
    assert ".tmp-" not in run.stderr and "Traceback" not in run.stderr
    assert not list(train.glob("*.npz"))


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=False)


def test_stale_temporaries_of_a_killed_prepare_are_removed_at_the_next_run(folder, tmp_path, saved_model, caplog):
    train, meta = folder
    stale = train / ".img00.npz.tmp-0123abcd.npz"
    stale.write_bytes(b"half a file")
    _age(stale, 2 * 3600)
    stale_json = tmp_path / ".meta_lat.json.tmp-deadbeef.json"
    stale_json.write_text("{", encoding="utf-8")
    _age(stale_json, 2 * 3600)
    fresh = train / ".img01.npz.tmp-89abcdef.npz"  # another run writing right now: not touched
    fresh.write_bytes(b"being written")
    users = train / ".notes.tmp-mine"  # not sdtune's name pattern: not touched, however old
    users.write_text("keep", encoding="utf-8")
    _age(users, 10 * 24 * 3600)
    code = main(["prepare", str(train), str(meta), str(tmp_path / "meta_lat.json"),
                 str(saved_model("sd1", "diffusers_safetensors")), *BUCKETS])
    assert code == 0
    assert not stale.exists() and not stale_json.exists()
    assert fresh.exists() and users.exists()
    assert any("removed 1 temporary file(s) left by an interrupted run" in r.getMessage() for r in caplog.records)


def test_stale_temporaries_of_a_killed_train_are_removed_at_the_next_run(prepared, tmp_path, caplog):
    model, train_dir, meta = prepared("sd1")
    out = tmp_path / "out"
    out.mkdir()
    stale_file = out / ".last.safetensors.tmp-0badc0de.safetensors"  # a checkpoint cut short by SIGKILL
    stale_file.write_bytes(b"half a checkpoint")
    stale_state = out / ".last-state.tmp-feedface.tmp"  # a state folder cut short
    stale_state.mkdir()
    (stale_state / "unet.safetensors").write_bytes(b"half")
    for path in (stale_state / "unet.safetensors", stale_state, stale_file):
        _age(path, 2 * 3600)
    code = main(["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta),
                 "--train_data_dir", str(train_dir), "--output_dir", str(out), "--max_train_steps", "1",
                 "--train_batch_size", "1", "--max_data_loader_n_workers", "0"])
    assert code == 0
    assert not stale_file.exists() and not stale_state.exists()
    assert any("left by an interrupted run" in r.getMessage() for r in caplog.records)
