"""``sdtune tag``: a tiny WD14-style ONNX tagger whose scores the tests predict independently."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

import sdtune.label.wd14 as wd14
from sdtune.cli import main
from tests.fixtures.labelers import TINY_TAGS, tiny_tagger_scores
from tests.label.conftest import IMAGES, write_images

pytestmark = pytest.mark.component

REPO = wd14.DEFAULT_WD14_REPO
REPO_FOLDER = "SmilingWolf_wd-v1-4-convnext-tagger-v2"


def preprocessed(path: Path, size: int = 32) -> np.ndarray:
    """The tagger's input for ``path``, computed here without sdtune: pad on white with numpy, bicubic resize,
    RGB -> BGR, float32 0..255."""
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    height, width = rgb.shape[:2]
    side = max(height, width)
    square = np.full((side, side, 3), 255, dtype=np.uint8)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = rgb
    resized = Image.fromarray(square).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(resized, dtype=np.float32)[:, :, ::-1].copy()


def scores_for(path: Path, model_dir: Path) -> np.ndarray:
    """Scores from the closed form, checked against onnxruntime run directly on the same input."""
    pixels = preprocessed(path)
    closed_form = tiny_tagger_scores(pixels.mean(axis=(0, 1)))
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    from_onnx = session.run(None, {session.get_inputs()[0].name: pixels[None]})[0][0]
    np.testing.assert_allclose(from_onnx, closed_form, atol=1e-5)
    return closed_form


def expected_tags(scores: np.ndarray, general: float = 0.35, character: float = 0.35) -> list[str]:
    """The documented order: character tags, then general tags, each by descending score; ratings left out."""
    chars = [(s, t.name) for s, t in zip(scores, TINY_TAGS) if t.category == 4 and s >= character]
    gens = [(s, t.name) for s, t in zip(scores, TINY_TAGS) if t.category == 0 and s >= general]
    return [name for _, name in sorted(chars, key=lambda x: -x[0])] + [name for _, name in
                                                                        sorted(gens, key=lambda x: -x[0])]


def read_tags(path: Path, separator: str = ", ") -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text.strip().split(separator) if text.strip() else []


def test_tags_pass_each_threshold_in_documented_order(images: Path, tiny_tagger: Callable[..., Path]) -> None:
    model = tiny_tagger()
    code = main(["tag", str(images), "--model_dir", str(model), "--batch_size", "3",
                 "--general_threshold", "0.6", "--character_threshold", "0.4"])
    assert code == 0
    seen_theme = set()
    for name in IMAGES:
        image = images / name
        want = expected_tags(scores_for(image, model), general=0.6, character=0.4)
        got = read_tags(image.with_suffix(".txt"))
        assert got == want, name
        seen_theme |= {t for t in got if t.endswith("_theme")}
    # The colour tags prove RGB->BGR and white padding: swapped channels would tag the red image blue_theme.
    assert seen_theme == {"red_theme", "blue_theme", "green_theme"}
    assert "bright" in read_tags(images / "red.txt")  # only with white padding (black padding scores 0.14)
    assert read_tags(images / "green.txt")[0] == "hatsune_miku"  # characters first
    assert "kirisame_marisa" in read_tags(images / "blue.txt")  # 0.45 passes the character threshold 0.4 ...
    assert "long_hair" not in read_tags(images / "blue.txt")  # ... but a general 0.57 fails 0.6


def test_thresh_is_the_default_for_both(images: Path, tiny_tagger: Callable[..., Path]) -> None:
    model = tiny_tagger()
    assert main(["tag", str(images), "--model_dir", str(model), "--thresh", "0.48",
                 "--max_data_loader_n_workers", "0"]) == 0
    tags = read_tags(images / "gray.txt")
    assert tags == expected_tags(scores_for(images / "gray.webp", model), 0.48, 0.48)
    assert "^_^" in tags and "kirisame_marisa" not in tags  # 0.50 passes, 0.45 does not


def test_fixed_batch_model_gives_the_same_tags(tmp_path: Path, tiny_tagger: Callable[..., Path]) -> None:
    dynamic, fixed = write_images(tmp_path / "a"), write_images(tmp_path / "b")
    assert ort.InferenceSession(str(tiny_tagger(1) / "model.onnx")).get_inputs()[0].shape[0] == 1
    assert main(["tag", str(dynamic), "--model_dir", str(tiny_tagger()), "--batch_size", "3"]) == 0
    assert main(["tag", str(fixed), "--model_dir", str(tiny_tagger(1)), "--batch_size", "3"]) == 0
    for name in IMAGES:
        stem = Path(name).stem + ".txt"
        assert (fixed / stem).read_text() == (dynamic / stem).read_text()


def test_tag_post_processing_options(images: Path, tiny_tagger: Callable[..., Path]) -> None:
    code = main(["tag", str(images), "--model_dir", str(tiny_tagger()), "--remove_underscore",
                 "--undesired_tags", "solo, long hair", "--always_first_tags", "^_^,bright,not_there",
                 "--use_rating_tags", "--caption_separator", " | ", "--caption_extension", "tags"])
    assert code == 0
    tags = read_tags(images / "red.tags", " | ")
    assert tags[:3] == ["^_^", "bright", "general"]  # always-first tags in the order given, then the rating
    assert "red theme" in tags and "red_theme" not in tags  # underscores removed from words ...
    assert "solo" not in tags and "long hair" not in tags  # undesired tags, in either spelling
    assert tags[3:] == [t.replace("_", " ") for t in expected_tags(scores_for(images / "red.png", tiny_tagger()))
                        if t not in ("^_^", "bright", "solo", "long_hair")]
    assert not (images / "red.txt").exists()


def test_existing_tag_files_skipped_then_overwritten_or_appended(
        images: Path, tiny_tagger: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    model = str(tiny_tagger())
    (images / "red.txt").write_text("my tag, solo\n", encoding="utf-8")
    with caplog.at_level(logging.INFO):
        assert main(["tag", str(images), "--model_dir", model]) == 0
    assert (images / "red.txt").read_text() == "my tag, solo\n"
    assert "3 tagged, 1 skipped" in caplog.text
    assert main(["tag", str(images), "--model_dir", model, "--append_tags"]) == 0
    want = expected_tags(scores_for(images / "red.png", tiny_tagger()))
    assert read_tags(images / "red.txt") == ["my tag", "solo"] + [t for t in want if t != "solo"]
    # Appending again adds nothing: every tag is already there.
    before = (images / "blue.txt").read_text()
    assert main(["tag", str(images), "--model_dir", model, "--append_tags"]) == 0
    assert (images / "blue.txt").read_text() == before
    assert main(["tag", str(images), "--model_dir", model, "--overwrite"]) == 0
    assert read_tags(images / "red.txt") == want


def test_corrupt_image_reported_others_tagged(
        images: Path, tiny_tagger: Callable[..., Path], caplog: pytest.LogCaptureFixture) -> None:
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (images / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.INFO):
        code = main(["tag", str(images), "--model_dir", str(tiny_tagger()), "--batch_size", "2",
                     "--frequency_tags"])
    assert code == 1
    assert all((images / name).with_suffix(".txt").exists() for name in IMAGES)
    assert not (images / "broken.txt").exists() and not (images / "empty.txt").exists()
    summary = next(r.getMessage() for r in caplog.records if "failed" in r.getMessage() and "tagged" in r.getMessage())
    assert "4 tagged" in summary and "2 failed" in summary
    assert "broken.png" in summary and "empty.jpg" in summary
    assert "solo: 4" in caplog.text  # --frequency_tags counts the written tags


def test_same_stem_images_do_not_share_a_tag_file(tmp_path: Path, tiny_tagger: Callable[..., Path],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    folder = write_images(tmp_path / "train", ("red.png",))
    Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "red.jpg")
    assert main(["tag", str(folder), "--model_dir", str(tiny_tagger())]) == 1
    assert "blue_theme" in read_tags(folder / "red.txt")  # red.jpg (the blue one) sorts first and wins
    assert "rename one" in caplog.text


def test_recursive(tmp_path: Path, tiny_tagger: Callable[..., Path]) -> None:
    write_images(tmp_path / "train" / "sub", ("red.png",))
    assert main(["tag", str(tmp_path / "train"), "--model_dir", str(tiny_tagger())]) == 2  # no images at top level
    assert main(["tag", str(tmp_path / "train"), "--model_dir", str(tiny_tagger()), "--recursive"]) == 0
    assert (tmp_path / "train" / "sub" / "red.txt").exists()


# --- the model folder -----------------------------------------------------------------------------------------------

def test_offline_without_model_says_how_to_get_it(images: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["tag", str(images), "--model_dir", str(tmp_path / "models")])
    assert code == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in err
    assert f"https://huggingface.co/{REPO}" in err
    assert "model.onnx" in err and "selected_tags.csv" in err and "--model_dir" in err
    assert str(tmp_path / "models" / REPO_FOLDER) in err
    assert "Traceback" not in err
    assert not list(images.glob("*.txt"))
    assert not (tmp_path / "models").exists()  # no empty model folder left behind


class FakeHub:
    """Stands in for ``huggingface_hub.hf_hub_download``: serves files from a local folder laid out like the repo."""

    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.calls: list[dict[str, Any]] = []

    def __call__(self, repo_id: str, filename: str, *, local_dir: Path, force_download: bool = False,
                 **kwargs: Any) -> str:
        self.calls.append({"repo_id": repo_id, "filename": filename, "local_dir": Path(local_dir),
                           "force_download": force_download})
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.repos[repo_id] / filename, target)
        return str(target)


def test_downloads_through_the_hub_once(images: Path, tmp_path: Path, tiny_tagger: Callable[..., Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    hub = FakeHub({REPO: tiny_tagger(), "SmilingWolf/wd-vit-tagger-v3": tiny_tagger(1)})
    monkeypatch.setattr(wd14, "hf_hub_download", hub)
    models = tmp_path / "models"
    assert main(["tag", str(images), "--model_dir", str(models)]) == 0
    assert sorted((c["repo_id"], c["filename"]) for c in hub.calls) == [(REPO, "model.onnx"),
                                                                         (REPO, "selected_tags.csv")]
    assert all(c["local_dir"] == models / REPO_FOLDER and not c["force_download"] for c in hub.calls)
    assert (models / REPO_FOLDER / "model.onnx").read_bytes() == (tiny_tagger() / "model.onnx").read_bytes()
    # Later runs read the folder and do not ask the hub again.
    assert main(["tag", str(images), "--model_dir", str(models), "--overwrite"]) == 0
    assert len(hub.calls) == 2
    # Another repo goes to its own sub-folder.
    assert main(["tag", str(images), "--model_dir", str(models), "--repo_id", "SmilingWolf/wd-vit-tagger-v3",
                 "--overwrite"]) == 0
    assert (models / "SmilingWolf_wd-vit-tagger-v3" / "model.onnx").exists()
    assert [c["repo_id"] for c in hub.calls[2:]] == ["SmilingWolf/wd-vit-tagger-v3"] * 2


def test_damaged_model_needs_force_download(images: Path, tmp_path: Path, tiny_tagger: Callable[..., Path],
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    hub = FakeHub({REPO: tiny_tagger()})
    monkeypatch.setattr(wd14, "hf_hub_download", hub)
    folder = tmp_path / "models" / REPO_FOLDER
    folder.mkdir(parents=True)
    shutil.copy(tiny_tagger() / "selected_tags.csv", folder)
    good = (tiny_tagger() / "model.onnx").read_bytes()
    (folder / "model.onnx").write_bytes(good[: len(good) // 2])  # an interrupted download
    code = main(["tag", str(images), "--model_dir", str(tmp_path / "models")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(folder / "model.onnx") in err and "--force_download" in err and "Traceback" not in err
    assert hub.calls == []
    assert main(["tag", str(images), "--model_dir", str(tmp_path / "models"), "--force_download"]) == 0
    assert {c["filename"] for c in hub.calls} == {"model.onnx", "selected_tags.csv"}
    assert all(c["force_download"] for c in hub.calls)
    assert (folder / "model.onnx").read_bytes() == good
    assert all((images / name).with_suffix(".txt").exists() for name in IMAGES)


def test_tag_list_that_does_not_match_the_model(images: Path, tmp_path: Path, tiny_tagger: Callable[..., Path],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "flat"
    shutil.copytree(tiny_tagger(), folder)
    lines = (folder / "selected_tags.csv").read_text().splitlines()
    (folder / "selected_tags.csv").write_text("\n".join(lines[:-1]) + "\n")
    assert main(["tag", str(images), "--model_dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "selected_tags.csv" in err and "different models" in err


def test_options_checked_before_the_model(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tag", str(images), "--model_dir", str(tmp_path), "--general_threshold", "1.5"]) == 2
    assert "--general_threshold" in capsys.readouterr().err
    assert main(["tag", str(images), "--append_tags", "--overwrite"]) == 2
    assert main(["tag", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_select_tags_ties_keep_model_order() -> None:
    table = wd14.TagTable(names=("general", "b_tag", "a_tag", "c_tag", "char"), categories=(9, 0, 0, 0, 4))
    rules = wd14.TagRules(general_threshold=0.5, character_threshold=0.9, remove_underscore=False,
                          undesired=frozenset(), always_first=(), use_rating_tags=False)
    scores = np.array([0.9, 0.6, 0.6, 0.7, 0.89], dtype=np.float32)
    assert wd14.select_tags(scores, table, rules) == ["c_tag", "b_tag", "a_tag"]


def test_replacement_then_character_expand_then_rating_last(images: Path, tiny_tagger: Callable[..., Path]) -> None:
    code = main(["tag", str(images), "--model_dir", str(tiny_tagger()), "--remove_underscore",
                 "--tag_replacement", r"hatsune miku,hatsune_miku_(vocaloid);solo,alone\, one;^_^,smile",
                 "--character_tag_expand", "--use_rating_tags_as_last_tag", "--always_first_tags", "vocaloid",
                 "--caption_separator", " | "])
    assert code == 0
    tags = read_tags(images / "green.txt", " | ")
    plain = [t.replace("_", " ") if len(t) > 3 else t
             for t in expected_tags(scores_for(images / "green.png", tiny_tagger()))]
    # "hatsune miku" (underscores already removed) was replaced, then expanded into a name and a series tag; the
    # series is also named by --always_first_tags, which sees the written tags.
    assert tags[:2] == ["vocaloid", "hatsune_miku"]
    assert "alone, one" in tags and "solo" not in tags  # an escaped comma stays inside the tag
    assert "smile" in tags and "^_^" not in tags
    assert tags[-1] == "general"  # the rating, last
    assert len(tags) == len(plain) + 2  # the series tag and the rating are the only additions
    assert [t for t in tags if t in plain] == [t for t in plain if t in tags]  # the other tags keep their order


def test_character_tag_expand_rules() -> None:
    table = wd14.TagTable(names=("general", "name_(series)", "a (b) (c)", "(odd)", "open", "series", "x_(y)"),
                          categories=(9, 4, 4, 4, 4, 0, 0))
    rules = wd14.TagRules(general_threshold=0.5, character_threshold=0.5, remove_underscore=False,
                          undesired=frozenset(), always_first=(), use_rating_tags=False, character_tag_expand=True)
    scores = np.array([0.9, 0.99, 0.98, 0.97, 0.96, 0.8, 0.7], dtype=np.float32)
    # The last parenthesis is the series; a tag that is all parenthesis or none stays whole; the general "series"
    # repeats the expanded one and is written once; general tags are never expanded.
    assert wd14.select_tags(scores, table, rules) == ["name", "series", "a (b)", "c", "(odd)", "open", "x_(y)"]


@pytest.mark.parametrize("bad", ["a", "a,b,c", ",b", "a,b;c"])
def test_malformed_tag_replacement_is_refused_before_the_model(images: Path, tmp_path: Path, bad: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tag", str(images), "--model_dir", str(tmp_path / "none"), "--tag_replacement", bad]) == 2
    assert "--tag_replacement" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
