"""Latent caches that change or go bad (issue 12, items 6 and 7): the file is named, the run stops cleanly."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from sdtune.cli import main
from sdtune.data import dataset as dataset_module
from sdtune.data.latent_cache import LatentFileError, load_latent_file

pytestmark = pytest.mark.component


@pytest.fixture()
def data(prepared, tmp_path) -> tuple[Path, Path, Path]:
    model, train_dir, meta = prepared("sd1")
    copy = tmp_path / "train"
    shutil.copytree(train_dir, copy)
    return model, copy, meta


def _args(model: Path, train_dir: Path, meta: Path, out: Path) -> list[str]:
    return ["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta),
            "--train_data_dir", str(train_dir), "--output_dir", str(out), "--max_train_steps", "3",
            "--train_batch_size", "1", "--max_data_loader_n_workers", "0"]


def _rewrite(path: Path, change) -> None:
    with np.load(path, allow_pickle=False) as z:
        fields = {k: z[k] for k in z.files}
    fields["latents"] = change(fields["latents"])
    with open(path, "wb") as f:
        np.savez(f, **fields)


def _after_setup(monkeypatch, action) -> None:
    """Run ``action`` once the run has checked its caches: the file changes while the run trains."""
    original = dataset_module.FineTuneData.encode_missing

    def encode_missing(self, vae, *args, **kwargs):
        count = original(self, vae, *args, **kwargs)
        action()
        return count

    monkeypatch.setattr(dataset_module.FineTuneData, "encode_missing", encode_missing)


def test_a_wrong_shape_latent_met_mid_run_is_named(data, tmp_path, monkeypatch, capsys):
    model, train_dir, meta = data
    victims = sorted(train_dir.glob("*.npz"))
    _after_setup(monkeypatch, lambda: [_rewrite(v, lambda lat: np.zeros((4, 3, 5), np.float32)) for v in victims])
    code = main(_args(model, train_dir, meta, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "sdtune train: error:" in err and any(str(v) in err for v in victims), err
    assert "shape (4, 3, 5)" in err


def test_nan_latents_met_mid_run_are_named_not_blamed_on_the_learning_rate(data, tmp_path, monkeypatch, capsys):
    model, train_dir, meta = data
    victims = sorted(train_dir.glob("*.npz"))
    _after_setup(monkeypatch, lambda: [_rewrite(v, lambda lat: np.full_like(lat, np.nan)) for v in victims])
    code = main(_args(model, train_dir, meta, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert any(str(v) in err for v in victims) and "NaN" in err, err
    assert "learning rate" not in err and "learning_rate" not in err


def test_nan_latents_found_at_start_are_named_and_encoded_again(data, tmp_path, caplog):
    model, train_dir, meta = data
    victim = sorted(train_dir.glob("*.npz"))[0]
    _rewrite(victim, lambda lat: np.full_like(lat, np.nan))
    with pytest.raises(LatentFileError, match="NaN"):
        load_latent_file(victim)
    with caplog.at_level(logging.WARNING):
        assert main(_args(model, train_dir, meta, tmp_path / "out")) == 0
    assert any(str(victim) in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)
