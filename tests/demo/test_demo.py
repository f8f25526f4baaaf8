"""sdtune demo end to end through the CLI, and its workdir handling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdtune.cli import main
from sdtune.data.latent_cache import load_latent_file
from sdtune.data.metadata import load_metadata
from sdtune.demo import DEMO_ENTRIES, MARKER, SIZES, SUMMARY_FILE, prepare_workdir
from sdtune.errors import SdtuneError
from sdtune.models.io import load_model

pytestmark = pytest.mark.e2e


def tensorboard_losses(logs: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = [p for p in logs.iterdir() if p.is_dir()]
    accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [e.value for e in sorted(accumulator.Scalars("loss/step"), key=lambda e: e.step)]


def test_demo_end_to_end(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert main(["demo", "--workdir", str(workdir)]) == 0
    report = capsys.readouterr().out
    assert "loss fell" in report and str(workdir) in report
    # the noise-like images are explained, not left for the user to take as a bug
    assert "look like coloured noise" in report and "randomly initialised" in report

    # dataset: every picture with its caption, tags and latent cache (with the flipped copy)
    images = sorted((workdir / "dataset").glob("*.png"))
    assert len(images) == len(SIZES) == 12
    for image in images:
        assert image.with_suffix(".caption").read_text(encoding="utf-8").startswith("a ")
        assert image.with_suffix(".txt").is_file()
        cache = load_latent_file(image.with_suffix(".npz"))
        assert cache.latents_flipped is not None
    # metadata at every stage; clean tidied the tags; prepare assigned three buckets
    assert all("caption" in e and "tags" not in e for e in load_metadata(workdir / "meta_cap.json").values())
    raw = load_metadata(workdir / "meta_cap_dd.json")
    assert all("_" in e["tags"] and "rating:general" in e["tags"] for e in raw.values())
    clean = load_metadata(workdir / "meta_clean.json")
    assert all("_" not in e["tags"] and "rating" not in e["tags"] for e in clean.values())
    prepared = load_metadata(workdir / "meta_lat.json")
    assert len(prepared) == 12
    assert {tuple(e["train_resolution"]) for e in prepared.values()} == {(64, 64), (80, 48), (48, 80)}
    # models: the base, the trained one with its state, and every export loads
    assert (workdir / "base-model" / "model_index.json").is_file()
    assert (workdir / "output" / "demo.safetensors").is_file()
    assert (workdir / "output" / "demo-state" / "progress.json").is_file()
    for export in ("demo.ckpt", "demo.safetensors", "demo-diffusers"):
        assert load_model(workdir / "exports" / export).family.name == "sd1"
    # generated images carry their settings
    generated = sorted((workdir / "images").glob("*.png"))
    assert [p.name for p in generated] == ["00000-0.png", "00001-7.png", "00002-0.png"]
    with Image.open(generated[1]) as image:
        assert image.size == (80, 48)
        assert image.text["parameters"].startswith("a blue square on a black background\nNegative prompt: circle\n")
    # the loss fell, in the TensorBoard log itself and in the summary
    losses = tensorboard_losses(workdir / "logs")
    summary = json.loads((workdir / SUMMARY_FILE).read_text(encoding="utf-8"))
    assert len(losses) == summary["steps"] == 60
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:10])
    assert summary["loss_end"] < summary["loss_start"]
    assert summary["loss_start"] == pytest.approx(np.mean(losses[:10]), rel=1e-6)
    assert summary["exports_agree"] is True
    assert summary["buckets"] == {"48x80": 2, "64x64": 8, "80x48": 2}
    for stage_files in summary["files"].values():
        for name in stage_files:
            assert (workdir / name).exists(), name
    assert (workdir / MARKER).is_file()
    # it ends with the dataset review page
    assert summary["files"]["review"] == ["review/index.html"] and "Dataset review: open" in report
    page = (workdir / "review" / "index.html").read_text(encoding="utf-8")
    assert '<dd id="sum-images">12</dd>' in page and '<dd id="sum-buckets">3</dd>' in page
    assert '<dd id="sum-cache">0</dd>' in page  # every cache valid for the model's VAE


def test_a_second_run_starts_clean_and_keeps_other_files(tmp_path):
    workdir = tmp_path / "demo"
    prepare_workdir(workdir)
    for name in DEMO_ENTRIES:  # a previous run's (stale) outputs, files and folders
        path = workdir / name
        if path.suffix in (".json", ".txt"):
            path.write_text("stale", encoding="utf-8")
        else:
            (path / "sub").mkdir(parents=True)
            (path / "sub" / "stale.png").write_bytes(b"stale")
    (workdir / "my-notes.md").write_text("mine", encoding="utf-8")
    prepare_workdir(workdir)
    assert sorted(p.name for p in workdir.iterdir()) == sorted([MARKER, "my-notes.md"])
    assert (workdir / "my-notes.md").read_text(encoding="utf-8") == "mine"


def test_refuses_a_folder_that_is_not_a_demo_folder(tmp_path, capsys):
    workdir = tmp_path / "important"
    (workdir / "dataset").mkdir(parents=True)
    (workdir / "dataset" / "photo.png").write_bytes(b"precious")
    assert main(["demo", "--workdir", str(workdir)]) == 2
    assert "not a demo folder" in capsys.readouterr().err
    assert (workdir / "dataset" / "photo.png").read_bytes() == b"precious"
    assert not (workdir / MARKER).exists()


def test_refuses_a_file_and_accepts_an_empty_folder(tmp_path):
    file = tmp_path / "file"
    file.write_text("x", encoding="utf-8")
    with pytest.raises(SdtuneError, match="is a file"):
        prepare_workdir(file)
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_workdir(empty)
    assert (empty / MARKER).is_file()
