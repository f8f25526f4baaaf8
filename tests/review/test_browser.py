"""The review page in a real headless browser (Chromium via selenium): it loads with no console errors, counts and
crops are training's, a tag click filters, the cut-off shows, markup in captions stays text.

Skipped, saying why, only when no browser can be found (``.ci/run`` installs Debian's chromium and chromium-driver).
"""

from __future__ import annotations

import pytest

from sdtune.data.buckets import cover
from sdtune.review.browser import console_errors, find_browser, page_url, start_chrome, wait_ready
from sdtune.review.collect import ReviewOptions
from sdtune.review.command import write_review
from tests.review.conftest import LONG_CAPTION, LONG_CUT, PREPARE, SIZES

BROWSER, MISSING = find_browser()
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(BROWSER is None, reason=f"no headless browser to test the review page: {MISSING}"),
]


@pytest.fixture(scope="module")
def driver():
    d = start_chrome(BROWSER)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def page(review_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("page")
    path, review = write_review(ReviewOptions(in_json=review_dataset.meta, train_data_dir=review_dataset.folder,
                                              out=out, workers=0, max_token_length=225, train_batch_size=2,
                                              **PREPARE))
    return path, review


@pytest.fixture()
def loaded(driver, page):
    driver.get_log("browser")  # drop what earlier pages logged
    driver.get(page_url(page[0]))
    wait_ready(driver)
    return driver


def thumbnails_load(driver, timeout: float = 30) -> None:
    """The first cards' thumbnails load (a blocked or missing image never does: its naturalWidth stays 0)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "var imgs = Array.from(document.querySelectorAll('#grid img')).slice(0, 4);"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0)"))


def cards(driver):
    return driver.find_elements("css selector", "#grid .card")


def card(driver, name):
    return driver.find_element("css selector", f'#grid .card[data-name="{name}"]')


def test_loads_without_console_errors_and_counts_are_right(loaded, page):
    _path, review = page
    assert console_errors(loaded) == []
    assert len(cards(loaded)) == len(review.items) == len(SIZES) + 2  # + the unprepared image, the lost entry
    assert loaded.find_element("id", "sum-images").text == str(len(SIZES))
    assert loaded.find_element("id", "sum-buckets").text == "3"
    assert len(loaded.find_elements("css selector", "#bucket-table tbody tr")) == 3
    assert loaded.find_element("id", "status").get_attribute("data-count") == str(len(review.items))
    thumbnails_load(loaded)  # from disk: the Content-Security-Policy lets them
    assert loaded.execute_script("return document.querySelectorAll('svg[role=img] title').length") >= 3


def test_crop_rectangle_is_where_the_bucket_code_puts_it(loaded):
    placement = cover(96, 48, (80, 48))  # b_wide.png, bucket 80x48
    element = card(loaded, "b_wide.png")
    img = element.find_element("css selector", ".thumb img").rect
    crop = element.find_element("css selector", ".thumb .crop").rect
    rw, rh = placement.resized
    left, top, right, bottom = placement.crop_ltrb
    assert crop["x"] - img["x"] == pytest.approx(img["width"] * left / rw, abs=1)
    assert crop["y"] - img["y"] == pytest.approx(img["height"] * top / rh, abs=1)
    assert crop["width"] == pytest.approx(img["width"] * (right - left) / rw, abs=1)
    assert crop["height"] == pytest.approx(img["height"] * (bottom - top) / rh, abs=1)
    assert crop["width"] < img["width"] - 10  # really cropped: 80 of 96 columns
    assert "80x48" in element.text and "not upscaled" in element.text


def test_clicking_a_tag_filters_to_the_images_that_have_it(loaded, page):
    _path, review = page
    expected = sorted(i.name for i in review.items if "wide" in i.tags)
    assert expected == ["b_wide.png", "e_wide.png"]
    button = next(b for b in loaded.find_elements("css selector", "button.tag") if b.text == "wide")
    loaded.execute_script("arguments[0].click()", button)
    assert sorted(c.get_attribute("data-name") for c in cards(loaded)) == expected
    assert button.get_attribute("aria-pressed") == "true"
    assert "2 of" in loaded.find_element("id", "status").text
    loaded.execute_script("arguments[0].click()", loaded.find_element("id", "clear-tag"))
    assert len(cards(loaded)) == len(review.items)
    assert console_errors(loaded) == []


def test_a_225_token_caption_shows_its_cut_off(loaded):
    element = card(loaded, "g_long.png")
    mark = element.find_element("css selector", ".caption .cut-mark")
    assert "225" in mark.text
    assert element.find_element("css selector", ".caption .cut-text").text == LONG_CAPTION[LONG_CUT:].strip()
    assert [m.text for m in element.find_elements("css selector", ".caption .chunk-mark")] == ["|75", "|150"]
    assert "237 tokens of 225: 12 cut off" in element.text
    assert card(loaded, "a_square.png").find_elements("css selector", ".cut-mark") == []


def test_markup_in_captions_and_tags_is_shown_as_text(loaded):
    element = card(loaded, "h_markup.png")
    caption = element.find_element("css selector", ".caption").text
    assert "<script>window.__pwned = 1</script>" in caption and "<b>bold</b>" in caption
    assert loaded.execute_script("return window.__pwned === undefined")
    assert element.find_elements("css selector", "script, b, .caption img") == []
    assert any(b.text == "<b>bold</b>" for b in loaded.find_elements("css selector", "button.tag"))
    assert console_errors(loaded) == []


def test_thumbnails_say_in_words_what_the_outline_shows(loaded):
    alt = card(loaded, "b_wide.png").find_element("css selector", ".thumb img").get_attribute("alt")
    assert alt == "b_wide.png, 96\u00d748, trained as bucket 80x48, crop outlined: x 8-88, y 0-48 of the image " \
                  "resized to 96\u00d748"
    headers = loaded.find_elements("css selector", "#bucket-table thead th[scope=col], #tag-table thead th[scope=col]")
    assert len(headers) == 8


def test_the_served_page_works_too(driver, page):
    import threading

    from sdtune.review.command import make_server

    server = make_server(page[0].parent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        driver.get_log("browser")
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/index.html")
        wait_ready(driver)
        assert len(cards(driver)) == len(page[1].items)
        thumbnails_load(driver)
        assert console_errors(driver) == []
    finally:
        server.shutdown()
        server.server_close()
