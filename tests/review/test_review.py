"""sdtune review without a browser: what the page shows agrees with training's own code, files and errors."""

from __future__ import annotations

import json
import re
import shutil
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from sdtune.cli import main
from sdtune.data.buckets import AspectBuckets, cover
from sdtune.data.dataset import FineTuneData, build_caption
from sdtune.data.latent_cache import load_latent_file
from sdtune.data.metadata import load_metadata, save_metadata
from sdtune.errors import ModelLoadError, SdtuneError
from sdtune.models.text import tokenize
from sdtune.models.tokenizer import packaged_tokenizer
from sdtune.review.collect import ReviewOptions, collect
from sdtune.review.command import make_server, write_review
from sdtune.review.page import json_for_script, render
from sdtune.review.tokens import count_tokens, find_cuts, load_review_tokenizer
from tests.review.conftest import LONG_CAPTION, LONG_CUT, PREPARE, SIZES, XSS_CAPTION, draw

pytestmark = pytest.mark.component


def options(dataset, out: Path, **kw) -> ReviewOptions:
    return ReviewOptions(in_json=dataset.meta, train_data_dir=dataset.folder, out=out, workers=0, **PREPARE, **kw)


def by_name(review):
    return {i.name: i for i in review.items}


@pytest.fixture(scope="module")
def review(review_dataset, tmp_path_factory):
    return collect(options(review_dataset, tmp_path_factory.mktemp("out"), max_token_length=225, train_batch_size=2))


def test_images_buckets_and_crops_are_trainings(review, review_dataset):
    images = load_metadata(review_dataset.meta)
    data = FineTuneData.from_metadata(images, review_dataset.folder)
    assert {i.key for i in review.trained} == set(data.examples) == set(SIZES)
    assert Counter(i.bucket for i in review.trained) == Counter(e.bucket for e in data.examples.values())
    assert review.summary()["buckets"] == 3
    for item in review.trained:
        cache = load_latent_file(review_dataset.folder / f"{item.key}.npz")
        assert item.latent == "valid" and item.flipped is True
        assert item.crop == cache.crop_ltrb and item.resized == cache.resized_size
        # ... and the cache's crop is the bucket code's
        placement = cover(*item.size, item.bucket)
        assert (placement.resized, placement.crop_ltrb) == (item.resized, item.crop)
    wide = by_name(review)["b_wide.png"]
    assert (wide.size, wide.bucket, wide.crop) == ((96, 48), (80, 48), (8, 0, 88, 48))
    assert by_name(review)["f_small.png"].upscaled is True and by_name(review)["a_square.png"].upscaled is False


def test_unprepared_image_is_placed_where_prepare_would_and_reported(review):
    item = by_name(review)["m_new.png"]
    assert not item.trained and "not prepared" in item.skip
    expected = AspectBuckets((64, 64), 32, 128, 16).place(64, 48)
    assert (item.bucket, item.crop) == (expected.bucket, expected.crop_ltrb)
    gone = by_name(review)["z_gone"]
    assert not gone.trained and "no image file" in gone.skip
    assert review.summary()["skipped"] == 2


def test_flags(review):
    items = by_name(review)
    assert items["i_nocaption.png"].caption_state == "none" and "no caption" in items["i_nocaption.png"].flags(225)
    assert items["j_empty.png"].caption_state == "empty" and "empty caption" in items["j_empty.png"].flags(225)
    assert items["k_dup.png"].duplicates == ["a_square.png"] and items["a_square.png"].duplicates == ["k_dup.png"]
    assert items["b_wide.png"].caption == build_caption({"caption": "a picture number 1", "tags": "shape, colour 1, wide"})
    s = review.summary()
    assert (s["no_caption"], s["empty_caption"], s["duplicates"], s["over_limit"]) == (1, 1, 2, 1)


def test_batches_are_trainings_epoch_batches(review, review_dataset):
    data = FineTuneData.from_metadata(load_metadata(review_dataset.meta), review_dataset.folder)
    plan = data.epoch_batches(0, 0, 2, 1, 0)
    assert sorted(review.batches) == sorted((data.buckets.bucket_of(k[0]), len(k)) for k, _w in plan)
    rows = {r["bucket"]: r for r in review.bucket_rows()}
    assert rows[(64, 64)] == {"bucket": (64, 64), "images": 8, "batches": 4, "full": 4, "partial": []}
    assert rows[(48, 80)]["partial"] == [1]
    assert review.summary()["steps_per_epoch"] == len(plan) == 6


def test_token_count_and_cut_off_are_trainings(review):
    tok = packaged_tokenizer("<|endoftext|>")
    item = by_name(review)["g_long.png"]
    assert item.caption == LONG_CAPTION and item.tokens == 237
    cuts = {limit: (offset, inside) for limit, offset, inside in item.cuts}
    assert cuts[225] == (LONG_CUT, True) and cuts[75] == (75 * 4, False) and cuts[150] == (150 * 4, False)
    # what training keeps: the first 225 of tokenize()'s tokens; they end inside the word at the cut
    ids = tokenize(tok, [LONG_CAPTION], 225)[0]
    kept = [int(t) for row in ids for t in row[1:] if int(t) != tok.eos_token_id]
    assert len(kept) == 225
    assert tok(LONG_CAPTION[:LONG_CUT], add_special_tokens=False).input_ids == kept[:222]
    assert item.flags(225) == ["over token limit"] and "over token limit" not in by_name(review)["a_square.png"].flags(225)


def test_cuts_fall_back_to_prefixes_when_words_do_not_add_up():
    class Doubling:  # a tokenizer whose whole-caption count is not the sum of its words' (CLIP's always is)
        def __call__(self, texts, **kw):
            class Out:
                input_ids = [[0] * (len(t.split()) * (2 if len(t.split()) > 1 else 1)) for t in texts]
            return Out()

    caption = " ".join(["w"] * 100)
    (cuts,) = find_cuts(Doubling(), [caption], [200], limits=(75,))
    assert cuts[0].limit == 75 and caption[:cuts[0].offset].count("w") == 37  # 38 words = 76 "tokens"


def test_keep_tokens_marks_the_fixed_parts(review_dataset, tmp_path):
    result = collect(options(review_dataset, tmp_path, shuffle_caption=True, keep_tokens=1))
    item = by_name(result)["b_wide.png"]
    assert item.parts == ["a picture number 1", "shape", "colour 1", "wide"] and item.fixed_parts == 1
    assert item.fixed_tokens == 4


def test_latent_cache_states(review_dataset, tmp_path, saved_model):
    same_vae = saved_model("sd1", "diffusers_safetensors")  # seed 0's model: the dataset was prepared with its VAE
    folder = tmp_path / "train"
    shutil.copytree(review_dataset.folder, folder)
    meta = tmp_path / "meta.json"
    images = load_metadata(review_dataset.meta)
    images["d_square"]["train_resolution"] = [80, 48]
    save_metadata(meta, images)
    (folder / "a_square.npz").unlink()
    (folder / "b_wide.npz").write_bytes(b"not a zip")
    draw((120, 64), 42).save(folder / "e_wide.png")  # same size, other pixels
    result = collect(ReviewOptions(in_json=meta, train_data_dir=folder, out=tmp_path / "out", workers=0, **PREPARE))
    items = by_name(result)
    assert items["a_square.png"].latent == "missing"
    assert items["b_wide.png"].latent == "damaged" and "b_wide.npz" in items["b_wide.png"].latent_note
    assert items["d_square.png"].latent == "stale" and "bucket" in items["d_square.png"].latent_note
    assert items["e_wide.png"].latent == "stale" and "changed since it was cached" in items["e_wide.png"].latent_note
    assert items["c_tall.png"].latent == "valid" and "VAE is not checked" in items["c_tall.png"].latent_note
    # with a model, its VAE is checked too: the one prepare used, then another
    from sdtune.models.save import save_model
    from sdtune.models.tiny import build_tiny

    other = tmp_path / "other-model"
    save_model(build_tiny("sd1", seed=1), other, "diffusers_safetensors")
    for model, state, note in ((same_vae, "valid", "matches the image"), (other, "stale", "another VAE")):
        checked = by_name(collect(ReviewOptions(in_json=meta, train_data_dir=folder, out=tmp_path / "out2",
                                                workers=0, pretrained_model_name_or_path=str(model), **PREPARE)))
        assert checked["c_tall.png"].latent == state and note in checked["c_tall.png"].latent_note
        assert "not checked" not in checked["c_tall.png"].latent_note
    # a cache training does not use: the crop is the one training's start-up encoding makes
    assert items["d_square.png"].crop == cover(64, 64, (80, 48)).crop_ltrb
    assert result.summary()["cache_problems"] == 4 and "cache not valid" in items["a_square.png"].flags(75)


def test_metadata_only(review_dataset, tmp_path):
    result = collect(ReviewOptions(in_json=review_dataset.meta, out=tmp_path, workers=0))
    assert {i.key for i in result.trained} == set(SIZES) | {"z_gone"}
    assert all(i.thumb is None and i.crop is None for i in result.items)
    assert result.summary()["buckets"] == 3 and "m_new" in {i.key for i in result.items if i.skip}


def test_html_escapes_captions_tags_and_names(review, tmp_path):
    page = render(review)
    body = page.split('<script id="review-data"')[0]
    assert "<script>window" not in page and "<b>bold</b>" not in page and "onerror=\"window" not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in body  # the tag table, written by Python
    data = page.split('<script id="review-data" type="application/json">')[1].split("</script>")[0]
    parsed = json.loads(data)
    assert f"{XSS_CAPTION}, <b>bold</b>, shape" in {i["caption"] for i in parsed["items"]}
    assert "</script" not in json_for_script({"x": "</script><!--"})
    # the page's own script is the only one the Content-Security-Policy allows
    assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", page) and "unsafe-inline" not in page


def test_thumbnails_are_cached_and_made_in_worker_processes(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    images = {}
    for i in range(130):
        draw((48 + (i % 5) * 16, 64), i).save(folder / f"img{i:03d}.png")
        images[f"img{i:03d}"] = {"caption": f"picture {i}"}
    meta = tmp_path / "meta.json"
    save_metadata(meta, images)
    out = tmp_path / "out"
    opts = dict(in_json=meta, train_data_dir=folder, out=out, **PREPARE)
    _page, pooled = write_review(ReviewOptions(workers=2, **opts))
    thumbs = sorted((out / "thumbs").iterdir())
    assert len(thumbs) == 130 and all(Image.open(t).size[1] == 64 for t in thumbs[:3])
    stamps = {t.name: t.stat().st_mtime_ns for t in thumbs}
    (out / "thumbs" / f"{'0' * 32}-256.jpg").write_bytes(b"stale")  # a thumbnail no image uses any more
    (out / "thumbs" / "mine.txt").write_text("not ours", encoding="utf-8")
    _page, here = write_review(ReviewOptions(workers=0, **opts))
    assert {t.name: t.stat().st_mtime_ns for t in (out / "thumbs").glob("*.jpg")} == stamps  # reused, not rewritten
    assert (out / "thumbs" / "mine.txt").is_file()
    assert [(i.name, i.bucket, i.crop, i.thumb) for i in pooled.items] == \
        [(i.name, i.bucket, i.crop, i.thumb) for i in here.items]


def test_tokenizer_is_chosen_as_training_chooses(saved_model, tmp_path, monkeypatch):
    folder = saved_model("sd1", "diffusers_safetensors")
    tok, note = load_review_tokenizer(str(folder), None)
    assert "tokenizer" in note and str(folder) in note and count_tokens(tok, ["a red cat"]) == [3]
    tok, note = load_review_tokenizer(None, None)
    assert "packaged" in note
    with pytest.raises(ModelLoadError, match="nowhere"):
        load_review_tokenizer(None, str(tmp_path / "nowhere"))

    def no_transformers(pad_token):
        raise ImportError("No module named 'transformers'")

    monkeypatch.setattr("sdtune.models.tokenizer.packaged_tokenizer", no_transformers)
    tok, note = load_review_tokenizer(None, None)
    assert tok is None and "unavailable" in note  # the page then shows "n/a" (next test)


def test_page_says_when_token_counts_are_unavailable(review_dataset, tmp_path, monkeypatch):
    monkeypatch.setattr("sdtune.review.collect.load_review_tokenizer", lambda m, t: (None, "token counts unavailable: x"))
    result = collect(options(review_dataset, tmp_path))
    assert all(i.tokens is None for i in result.items)
    page = render(result)
    assert "token counts unavailable" in page and 'id="sum-over">n/a<' in page


def test_cli_writes_the_page_and_prints_its_path(review_dataset, tmp_path, capsys):
    out = tmp_path / "review"
    argv = ["review", str(review_dataset.meta), str(review_dataset.folder), "--out", str(out), "--workers", "0",
            "--max_resolution", "64,64", "--min_bucket_reso", "32", "--bucket_reso_steps", "16"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str((out / "index.html").resolve())
    assert main(["review", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing.json" in err and "does not exist" in err
    (tmp_path / "file").write_text("x", encoding="utf-8")
    assert main(["review", str(review_dataset.meta), "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["review", str(review_dataset.meta), "--out", str(tmp_path / "t"), "--tokenizer",
                 str(tmp_path / "no-tokenizer")]) == 2
    assert "no-tokenizer" in capsys.readouterr().err and not (tmp_path / "t").exists()  # before any work


def test_serve_binds_localhost(review_dataset, tmp_path):
    page, _review = write_review(options(review_dataset, tmp_path))
    server = make_server(tmp_path)
    assert server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/index.html", timeout=10) as r:
            assert r.read() == page.read_bytes()
        with pytest.raises(SdtuneError, match="choose another --port"):
            make_server(tmp_path, port=server.server_address[1])  # taken
    finally:
        server.shutdown()
        server.server_close()


def test_options_are_checked_first(review_dataset, tmp_path):
    with pytest.raises(SdtuneError, match="train_batch_size"):
        collect(options(review_dataset, tmp_path, train_batch_size=0))
    with pytest.raises(SdtuneError, match="image folder"):
        collect(ReviewOptions(in_json=review_dataset.meta, train_data_dir=tmp_path / "no", out=tmp_path))


def test_worker_processes_start_under_spawn(tmp_path):
    """Windows and macOS start workers with spawn: jobs and results must pickle, the worker must import cleanly."""
    import multiprocessing

    from sdtune.review.thumbs import ImageJob, _pooled, inspect_image

    (tmp_path / "thumbs").mkdir()
    jobs = []
    for i in range(3):
        draw((64, 32 + 16 * i), i).save(tmp_path / f"p{i}.png")
        jobs.append(ImageJob(tmp_path / f"p{i}.png", None, tmp_path / "thumbs", 64, 10**8))
    spawned = list(_pooled(jobs, 2, multiprocessing.get_context("spawn")))
    assert [(f.size, f.thumb, f.latent) for f in spawned] == [(f.size, f.thumb, f.latent) for f in map(inspect_image, jobs)]


def test_images_sharing_a_stem_are_reported(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    draw((64, 64), 1).save(folder / "same.png")
    draw((64, 64), 2).save(folder / "same.jpg")
    meta = tmp_path / "meta.json"
    save_metadata(meta, {"same": {"caption": "x", "train_resolution": [64, 64]}})
    items = by_name(collect(ReviewOptions(in_json=meta, train_data_dir=folder, out=tmp_path / "out", workers=0,
                                          **PREPARE)))
    used = FineTuneData.from_metadata(load_metadata(meta), folder).examples["same"].image.name
    other = ({"same.png", "same.jpg"} - {used}).pop()
    assert items[used].trained and not items[other].trained
    assert f"training uses {used}" in items[other].skip
    assert "shares its file stem" in items[used].error


def test_find_browser_says_what_is_missing(monkeypatch):
    from sdtune.review import browser

    monkeypatch.setattr(browser.importlib.util, "find_spec", lambda name: None)
    found, missing = browser.find_browser()
    assert found is None and "pip install selenium" in missing
    monkeypatch.undo()
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.delenv("SDTUNE_CHROMIUM", raising=False)
    monkeypatch.delenv("SDTUNE_CHROMEDRIVER", raising=False)
    if browser.importlib.util.find_spec("selenium") is not None:
        found, missing = browser.find_browser()
        assert found is None and "apt-get install chromium chromium-driver" in missing


@pytest.mark.parametrize("words", [1, 7, 8, 9, 40, 160])
def test_cuts_agree_with_prefix_counts(words):
    """Against the slow, obvious method: the tokens of each prefix that ends at a word."""
    tok = packaged_tokenizer("<|endoftext|>")
    vocabulary = ["cat", "supercalifragilistic", "1girl", "red,", "a", "blue-sky", "(masterpiece:1.2)", "ok"]
    caption = " ".join(vocabulary[(i * 5) % len(vocabulary)] for i in range(words))
    (total,) = count_tokens(tok, [caption])
    limits = (1, 2, 5, 17, 75, 150, 225)
    (cuts,) = find_cuts(tok, [caption], [total], limits)
    spans = [(m.start(), m.end()) for m in re.finditer(r"\S+", caption)]
    expected = []
    for limit in limits:
        if total > limit:
            k = next(k for k, (_s, e) in enumerate(spans) if count_tokens(tok, [caption[:e]])[0] > limit)
            before = count_tokens(tok, [caption[:spans[k - 1][1]]])[0] if k else 0
            expected.append((limit, spans[k][0], before < limit))
    assert [(c.limit, c.offset, c.inside_word) for c in cuts] == expected
