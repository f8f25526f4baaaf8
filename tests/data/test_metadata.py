"""The metadata JSON (versions, migration, validation) and merge-captions / merge-tags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sdtune.cli import main
from sdtune.data.metadata import (
    METADATA_VERSION, MIGRATIONS, VERSION_KEY, MetadataError, load_metadata, merge_folder, parse_metadata,
    read_sidecar, save_metadata,
)


@pytest.fixture()
def folder(tmp_path, make_image) -> Path:
    train = tmp_path / "train"
    for name in ["a", "b", "c"]:
        make_image(train / f"{name}.png", 16, 16)
    (train / "a.caption").write_text("a girl\n", encoding="utf-8")
    (train / "b.caption").write_text("a dog", encoding="utf-8")
    (train / "a.txt").write_text("1girl, long_hair", encoding="utf-8")
    return train


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def test_merge_captions_writes_versioned_json_and_lists_missing(folder, tmp_path, caplog):
    out = tmp_path / "meta.json"
    caplog.set_level("INFO")
    assert main(["merge-captions", str(folder), str(out)]) == 0
    doc = read(out)
    assert doc == {VERSION_KEY: METADATA_VERSION, "images": {"a": {"caption": "a girl"}, "b": {"caption": "a dog"}}}
    assert "1 image(s) have no caption file" in caplog.text and str(folder / "c.png") in caplog.text


def test_merge_tags_adds_to_existing_out_json_by_default(folder, tmp_path):
    out = tmp_path / "meta.json"
    merge_folder(folder, out, "caption", ".caption")
    summary = merge_folder(folder, out, "tags", ".txt")  # reads out.json first: captions kept
    assert summary.merged == 1 and sorted(p.name for p in summary.missing) == ["b.png", "c.png"]
    assert read(out)["images"]["a"] == {"caption": "a girl", "tags": "1girl, long_hair"}
    assert main(["merge-tags", str(folder), str(out)]) == 0  # the command's default extension is .txt
    assert read(out)["images"]["a"]["tags"] == "1girl, long_hair"


def test_in_json_is_read_first_and_other_entries_are_kept(folder, tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"other": {"caption": "from another folder"}, "a": {"tags": "x"}}))
    out = tmp_path / "out.json"
    assert main(["merge-captions", str(folder), str(out), "--in_json", str(src)]) == 0
    images = read(out)["images"]
    assert images["other"] == {"caption": "from another folder"}
    assert images["a"] == {"tags": "x", "caption": "a girl"}
    assert read(src) == {"other": {"caption": "from another folder"}, "a": {"tags": "x"}}  # input untouched


def test_caption_extension_with_or_without_dot(folder, tmp_path):
    (folder / "c.cap2").write_text("third")
    for ext in (".cap2", "cap2"):
        out = tmp_path / f"m{len(ext)}.json"
        merge_folder(folder, out, "caption", ext)
        assert read(out)["images"] == {"c": {"caption": "third"}}
    assert main(["merge-captions", str(folder), str(tmp_path / "x.json"), "--caption_extension", ".cap2"]) == 0
    assert read(tmp_path / "x.json")["images"] == {"c": {"caption": "third"}}


def test_full_path_keys_let_two_folders_share_one_json(tmp_path, make_image):
    for sub in ("one", "two"):
        make_image(tmp_path / sub / "img.png", 8, 8)
        (tmp_path / sub / "img.caption").write_text(f"from {sub}")
    out = tmp_path / "meta.json"
    assert main(["merge-captions", str(tmp_path / "one"), str(out), "--full_path"]) == 0
    assert main(["merge-captions", str(tmp_path / "two"), str(out), "--full-path"]) == 0
    images = read(out)["images"]
    assert images == {os.path.abspath(tmp_path / "one" / "img.png"): {"caption": "from one"},
                      os.path.abspath(tmp_path / "two" / "img.png"): {"caption": "from two"}}


def test_full_path_matches_relative_keys_of_older_files(tmp_path, make_image, monkeypatch):
    make_image(tmp_path / "train" / "img.png", 8, 8)
    (tmp_path / "train" / "img.caption").write_text("new")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"train/img.png": {"tags": "t"}}))  # sd-scripts, relative key
    merge_folder(Path("train"), tmp_path / "out.json", "caption", ".caption", in_json=tmp_path / "old.json",
                 full_path=True)
    assert read(tmp_path / "out.json")["images"] == {"train/img.png": {"tags": "t", "caption": "new"}}


def test_recursive(tmp_path, make_image):
    make_image(tmp_path / "top.png", 8, 8)
    make_image(tmp_path / "sub" / "deep.png", 8, 8)
    (tmp_path / "top.caption").write_text("top")
    (tmp_path / "sub" / "deep.caption").write_text("deep")
    merge_folder(tmp_path, tmp_path / "flat.json", "caption", ".caption")
    merge_folder(tmp_path, tmp_path / "rec.json", "caption", ".caption", recursive=True)
    assert set(read(tmp_path / "flat.json")["images"]) == {"top"}
    assert set(read(tmp_path / "rec.json")["images"]) == {"top", "deep"}


def test_sidecar_encoding_bom_and_whole_text(tmp_path):
    p = tmp_path / "x.caption"
    p.write_bytes("\ufeff\n  héllo wörld  \nsecond line\n".encode("utf-8"))
    assert read_sidecar(p) == "héllo wörld  \nsecond line"
    p.write_bytes(b"")
    assert read_sidecar(p) == ""


@pytest.mark.parametrize("content", ["one line\n", "first line\nsecond line\n", "\n\n1girl, solo,\nsmile\n\n",
                                     "a\r\nb\r\n", "  spaced  \n"])
def test_merge_keeps_the_whole_text_as_sd_scripts_does(folder, tmp_path, caplog, content):
    """sd-scripts' finetune/merge_captions_to_metadata.py: ``caption_path.read_text(encoding="utf-8").strip()``."""
    (folder / "a.caption").write_bytes(content.encode("utf-8"))
    reference = (folder / "a.caption").read_text(encoding="utf-8").strip()  # universal newlines, as sd-scripts reads
    caplog.set_level("INFO")
    summary = merge_folder(folder, tmp_path / "m.json", "caption", ".caption")
    assert read(tmp_path / "m.json")["images"]["a"]["caption"] == reference
    if "\n" in reference:
        assert [p.name for p in summary.multiline] == ["a.caption"]
        assert "several lines" in caplog.text and str(folder / "a.caption") in caplog.text
    else:
        assert not summary.multiline


def test_unreadable_and_empty_sidecars_are_skipped_named_and_counted(folder, tmp_path, caplog):
    (folder / "c.caption").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    (folder / "b.caption").write_text("   \n")
    caplog.set_level("INFO")
    summary = merge_folder(folder, tmp_path / "m.json", "caption", ".caption")
    assert [p.name for p, _ in summary.unreadable] == ["c.caption"]
    assert "not UTF-8" in summary.unreadable[0][1]
    assert [p.name for p in summary.empty] == ["b.caption"]
    assert summary.merged == 2 and summary.missing == []
    assert "c" not in read(tmp_path / "m.json")["images"]
    assert "could not be read" in caplog.text and str(folder / "c.caption") in caplog.text


def test_duplicate_stems_are_refused(tmp_path, make_image):
    make_image(tmp_path / "x.png", 8, 8)
    make_image(tmp_path / "x.jpg", 8, 8)
    with pytest.raises(MetadataError, match="share a file stem"):
        merge_folder(tmp_path, tmp_path / "m.json", "caption", ".caption")
    assert not (tmp_path / "m.json").exists()


def test_flat_sd_scripts_file_is_migrated(tmp_path):
    flat = {"img1": {"caption": "c", "tags": "t", "train_resolution": [512, 768]}, "img2": {}}
    (tmp_path / "old.json").write_text(json.dumps(flat))
    assert load_metadata(tmp_path / "old.json") == flat
    assert MIGRATIONS[0](flat) == {VERSION_KEY: 1, "images": flat}
    save_metadata(tmp_path / "new.json", flat)
    assert read(tmp_path / "new.json") == {VERSION_KEY: 1, "images": flat}
    assert load_metadata(tmp_path / "new.json") == flat


@pytest.mark.parametrize("doc, message", [
    ({"img": {"caption": "x", "captoin": "y"}}, "unknown key 'captoin'"),
    ({VERSION_KEY: 1, "images": {"img": {"tags": 3}}}, "tags must be a string"),
    ({"img": {"train_resolution": [512]}}, "train_resolution must be"),
    ({"img": "just a caption"}, "expected an object"),
    ({VERSION_KEY: 99, "images": {}}, "newer sdtune"),
    ({VERSION_KEY: 1, "images": {}, "extra": 1}, "unknown top-level key"),
    ([1, 2], "expected a JSON object"),
])
def test_invalid_documents_name_the_file_and_the_key(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(MetadataError, match=message) as info:
        load_metadata(path)
    assert str(path) in str(info.value)


def test_malformed_json_is_a_clean_cli_error(folder, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": {"caption": "x"},,}')
    out = tmp_path / "out.json"
    assert main(["merge-captions", str(folder), str(out), "--in_json", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "not valid JSON (line 1" in err and "Traceback" not in err
    assert not out.exists()


def test_missing_in_json_and_missing_folder_are_clean_errors(folder, tmp_path, capsys):
    assert main(["merge-tags", str(folder), str(tmp_path / "o.json"), "--in_json", str(tmp_path / "no.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge-tags", str(tmp_path / "nofolder"), str(tmp_path / "o.json")]) == 2
    assert "nofolder" in capsys.readouterr().err


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    save_metadata(path, {"a": {"caption": "old"}})

    def explode(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sdtune.atomic.os.replace", explode)  # interrupted after writing, before the rename
    with pytest.raises(KeyboardInterrupt):
        save_metadata(path, {"a": {"caption": "new"}})
    assert read(path)["images"] == {"a": {"caption": "old"}}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind


def test_parse_accepts_empty_wrapper():
    assert parse_metadata(json.dumps({VERSION_KEY: 1})) == {}
