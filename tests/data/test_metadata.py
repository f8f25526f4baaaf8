"""The metadata JSON (versions, migration, validation) and merge-captions / merge-tags."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sdtune.cli import main
from sdtune.data.metadata import (
    MIGRATIONS,
    VERSION_KEY,
    MetadataError,
    load_metadata,
    merge_folder,
    parse_metadata,
    read_sidecar,
    save_metadata,
)

pytestmark = pytest.mark.unit


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
    assert doc == {"a": {"caption": "a girl"}, "b": {"caption": "a dog"}}  # sd-scripts' flat layout
    assert "1 image(s) have no caption file" in caplog.text and str(folder / "c.png") in caplog.text


def test_merge_tags_adds_to_existing_out_json_by_default(folder, tmp_path):
    out = tmp_path / "meta.json"
    merge_folder(folder, out, "caption", ".caption")
    summary = merge_folder(folder, out, "tags", ".txt")  # reads out.json first: captions kept
    assert summary.merged == 1 and sorted(p.name for p in summary.missing) == ["b.png", "c.png"]
    assert read(out)["a"] == {"caption": "a girl", "tags": "1girl, long_hair"}
    assert main(["merge-tags", str(folder), str(out)]) == 0  # the command's default extension is .txt
    assert read(out)["a"]["tags"] == "1girl, long_hair"


def test_in_json_is_read_first_and_other_entries_are_kept(folder, tmp_path):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"other": {"caption": "from another folder"}, "a": {"tags": "x"}}))
    out = tmp_path / "out.json"
    assert main(["merge-captions", str(folder), str(out), "--in_json", str(src)]) == 0
    images = read(out)
    assert images["other"] == {"caption": "from another folder"}
    assert images["a"] == {"tags": "x", "caption": "a girl"}
    assert read(src) == {"other": {"caption": "from another folder"}, "a": {"tags": "x"}}  # input untouched


def test_caption_extension_with_or_without_dot(folder, tmp_path):
    (folder / "c.cap2").write_text("third")
    for ext in (".cap2", "cap2"):
        out = tmp_path / f"m{len(ext)}.json"
        merge_folder(folder, out, "caption", ext)
        assert read(out) == {"c": {"caption": "third"}}
    assert main(["merge-captions", str(folder), str(tmp_path / "x.json"), "--caption_extension", ".cap2"]) == 0
    assert read(tmp_path / "x.json") == {"c": {"caption": "third"}}


def test_full_path_keys_let_two_folders_share_one_json(tmp_path, make_image):
    for sub in ("one", "two"):
        make_image(tmp_path / sub / "img.png", 8, 8)
        (tmp_path / sub / "img.caption").write_text(f"from {sub}")
    out = tmp_path / "meta.json"
    assert main(["merge-captions", str(tmp_path / "one"), str(out), "--full_path"]) == 0
    assert main(["merge-captions", str(tmp_path / "two"), str(out), "--full-path"]) == 0
    images = read(out)
    assert images == {os.path.abspath(tmp_path / "one" / "img.png"): {"caption": "from one"},
                      os.path.abspath(tmp_path / "two" / "img.png"): {"caption": "from two"}}


def test_full_path_matches_relative_keys_of_older_files(tmp_path, make_image, monkeypatch):
    make_image(tmp_path / "train" / "img.png", 8, 8)
    (tmp_path / "train" / "img.caption").write_text("new")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "old.json").write_text(json.dumps({"train/img.png": {"tags": "t"}}))  # sd-scripts, relative key
    merge_folder(Path("train"), tmp_path / "out.json", "caption", ".caption", in_json=tmp_path / "old.json",
                 full_path=True)
    assert read(tmp_path / "out.json") == {"train/img.png": {"tags": "t", "caption": "new"}}


def test_recursive(tmp_path, make_image):
    make_image(tmp_path / "top.png", 8, 8)
    make_image(tmp_path / "sub" / "deep.png", 8, 8)
    (tmp_path / "top.caption").write_text("top")
    (tmp_path / "sub" / "deep.caption").write_text("deep")
    merge_folder(tmp_path, tmp_path / "flat.json", "caption", ".caption")
    merge_folder(tmp_path, tmp_path / "rec.json", "caption", ".caption", recursive=True)
    assert set(read(tmp_path / "flat.json")) == {"top"}
    assert set(read(tmp_path / "rec.json")) == {"top", "deep"}


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
    assert read(tmp_path / "m.json")["a"]["caption"] == reference
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
    assert "c" not in read(tmp_path / "m.json")
    assert "could not be read" in caplog.text and str(folder / "c.caption") in caplog.text


def test_duplicate_stems_are_refused(tmp_path, make_image):
    make_image(tmp_path / "x.png", 8, 8)
    make_image(tmp_path / "x.jpg", 8, 8)
    with pytest.raises(MetadataError, match="share a file stem"):
        merge_folder(tmp_path, tmp_path / "m.json", "caption", ".caption")
    assert not (tmp_path / "m.json").exists()


def test_flat_sd_scripts_file_and_wrapped_sdtune_file(tmp_path):
    flat = {"img1": {"caption": "c", "tags": "t", "train_resolution": [512, 768]}, "img2": {}}
    (tmp_path / "old.json").write_text(json.dumps(flat))
    assert load_metadata(tmp_path / "old.json") == flat
    assert MIGRATIONS[0](flat) == {VERSION_KEY: 1, "images": flat}
    (tmp_path / "wrapped.json").write_text(json.dumps({VERSION_KEY: 1, "images": flat}))  # earlier sdtune versions
    assert load_metadata(tmp_path / "wrapped.json") == flat
    save_metadata(tmp_path / "new.json", load_metadata(tmp_path / "wrapped.json"))
    assert read(tmp_path / "new.json") == flat  # written back in the layout sd-scripts reads
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
    assert read(path) == {"a": {"caption": "old"}}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temporary file left behind


def test_parse_accepts_empty_wrapper():
    assert parse_metadata(json.dumps({VERSION_KEY: 1})) == {}



# ---------------------------------------------------------------------------------------------- sd-scripts both ways
def sd_scripts_fine_tuning_captions(metadata_file: Path, image_dir: Path) -> dict[str, tuple[str, str]]:
    """What sd-scripts' FineTuningDataset.__init__ (library/train_util.py) does with a metadata file, written out:
    json.load / the JSONL branch, abs_path for every key, caption + caption_separator + tags. Returns
    {image key: (abs_path, caption)}."""
    if str(metadata_file).endswith(".jsonl"):
        metadata = {}
        with open(metadata_file, "rt", encoding="utf-8") as f:
            for line in f:
                line_md = json.loads(line)
                image_md = {"caption": line_md.get("caption", "")}
                if "image_size" in line_md:
                    image_md["image_size"] = line_md["image_size"]
                if "tags" in line_md:
                    image_md["tags"] = line_md["tags"]
                metadata[line_md["image_path"]] = image_md
    else:
        with open(metadata_file, "rt", encoding="utf-8") as f:
            metadata = json.load(f)
    out = {}
    for image_key in metadata.keys():
        abs_path = image_key if os.path.isabs(image_key) else os.path.join(str(image_dir), image_key)
        metadata[image_key]["abs_path"] = abs_path
    for image_key, img_md in metadata.items():
        caption = img_md.get("caption") or ""
        tags = img_md.get("tags")
        if tags is not None and len(tags) > 0:
            caption = (caption + "," if caption else "") + tags  # --caption_separator's default ","
        out[image_key] = (img_md["abs_path"], caption)
    return out


@pytest.mark.parametrize("name", ["meta.json", "meta.jsonl"])
def test_sd_scripts_fine_tuning_dataset_reads_sdtune_metadata(folder, tmp_path, name):
    out = tmp_path / name
    merge_folder(folder, out, "caption", ".caption")
    merge_folder(folder, out, "tags", ".txt")
    assert sd_scripts_fine_tuning_captions(out, folder) == {
        "a": (str(folder / "a"), "a girl,1girl, long_hair"), "b": (str(folder / "b"), "a dog")}


def test_sd_scripts_wd14_output_path_files_are_read(folder, tmp_path):
    """tag_images_by_wd14_tagger.py --output_path: {image_path: {"tags", "image_size"}} as JSON, or JSONL lines
    {"image_path", "caption", "image_size"}."""
    a, b = str(folder / "a.png"), str(folder / "b.png")
    results = {a: {"tags": "1girl, solo", "image_size": [16, 16]}, b: {"tags": "dog", "image_size": [16, 16]}}
    (tmp_path / "tags.json").write_text(json.dumps(results, ensure_ascii=False, indent=4), encoding="utf-8")
    with open(tmp_path / "tags.jsonl", "wt", encoding="utf-8") as f:
        for image_path, entry in results.items():
            f.write(json.dumps({"image_path": image_path, "caption": entry["tags"], "image_size": entry["image_size"]})
                    + "\n")
    assert load_metadata(tmp_path / "tags.json") == results
    assert load_metadata(tmp_path / "tags.jsonl") == {
        a: {"caption": "1girl, solo", "image_size": [16, 16]}, b: {"caption": "dog", "image_size": [16, 16]}}
    # merging captions into the tagger's file (full paths: --full_path) keeps its entries and writes them back
    merge_folder(folder, tmp_path / "merged.json", "caption", ".caption", in_json=tmp_path / "tags.json",
                 full_path=True)
    merged = load_metadata(tmp_path / "merged.json")
    assert merged[a] == {"tags": "1girl, solo", "image_size": [16, 16], "caption": "a girl"}
    save_metadata(tmp_path / "round.jsonl", merged)
    assert load_metadata(tmp_path / "round.jsonl") == merged


@pytest.mark.parametrize("text, message", [
    ('{"image_path": "a.png", "caption": "x"}\nnot json\n', "line 2 is not valid JSON"),
    ('{"caption": "x"}\n', "line 1 must be an object with an 'image_path'"),
    ('{"image_path": "a.png", "captoin": "x"}\n', "unknown key 'captoin'"),
    ('{"image_path": "a.png"}\n{"image_path": "a.png"}\n', "line 2 repeats image 'a.png'"),
])
def test_bad_jsonl_names_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(MetadataError, match=message) as info:
        load_metadata(path)
    assert str(path) in str(info.value)
