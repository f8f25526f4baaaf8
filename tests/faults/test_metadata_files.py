"""Hostile or wrong metadata (issue 12, items 6 and 7): a clear error naming the file, read before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdtune.cli import main
from sdtune.data.metadata import load_metadata
from sdtune.errors import SdtuneError
from sdtune.train import base_model

pytestmark = pytest.mark.component


def _train_args(prepared, meta: Path, out: Path) -> list[str]:
    model, train_dir, _ = prepared("sd1")
    return ["train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta),
            "--train_data_dir", str(train_dir), "--output_dir", str(out), "--max_train_steps", "1",
            "--train_batch_size", "1", "--max_data_loader_n_workers", "0"]


@pytest.fixture()
def no_model_load(monkeypatch):
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the metadata was checked")

    monkeypatch.setattr(base_model, "load_model", refuse)
    return calls


def _edited(prepared, tmp_path: Path, resolution) -> Path:
    images = json.loads(prepared("sd1")[2].read_text(encoding="utf-8"))
    first = sorted(images)[0]
    images[first]["train_resolution"] = resolution
    path = tmp_path / "meta_lat.json"
    path.write_text(json.dumps(images), encoding="utf-8")
    return path


@pytest.mark.parametrize("resolution", [[63, 64], [2**40, 64], [64, 0], [2**15 + 8, 64]])
def test_an_impossible_train_resolution_is_refused_before_the_model_loads(prepared, tmp_path, capsys, no_model_load,
                                                                        resolution):
    meta = _edited(prepared, tmp_path, resolution)
    code = main(_train_args(prepared, meta, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert str(meta) in err and "train_resolution" in err and "multiples of 8" in err, err
    assert not no_model_load


def test_deeply_nested_metadata_is_a_clear_error(prepared, tmp_path, capsys, no_model_load):
    meta = tmp_path / "nested.json"
    meta.write_text('{"img00": ' + "[" * 100_000 + "]" * 100_000 + "}", encoding="utf-8")
    code = main(_train_args(prepared, meta, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert str(meta) in err and "nested too deeply" in err, err
    assert not no_model_load


def test_deeply_nested_jsonl_line_is_a_clear_error(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text('{"image_path": "a"}\n' + "[" * 100_000 + "]" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(SdtuneError, match=r"meta.jsonl: line 2 .*nested too deeply"):
        load_metadata(meta)


def test_a_bad_in_json_costs_no_model_load(prepared, tmp_path, capsys, no_model_load):
    meta = tmp_path / "broken.json"
    meta.write_text("{not json", encoding="utf-8")
    code = main(_train_args(prepared, meta, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code != 0 and str(meta) in err
    assert not no_model_load
