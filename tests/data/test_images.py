"""open_image / image_size / list_images: every image mode and every kind of broken file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtune.data.images import ImageError, image_size, list_images, open_image
from sdtune.errors import SdtuneError

pytestmark = pytest.mark.unit


def test_rgb_round_trip(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", 40, 30)
    im = open_image(path)
    assert im.mode == "RGB" and im.size == (40, 30)
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(path)))


def test_cmyk_is_converted(tmp_path):
    Image.new("CMYK", (20, 10), (0, 255, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    im = open_image(tmp_path / "c.jpg")
    assert im.mode == "RGB"
    r, g, b = np.asarray(im)[5, 10]
    assert r > 240 and g < 15 and b > 240  # no magenta ink: magenta


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (10, 10), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert np.asarray(open_image(tmp_path / "p.png"))[0, 0].tolist() == [255, 0, 0]
    p.info["transparency"] = 1
    p.save(tmp_path / "pt.png", transparency=1)
    assert np.asarray(open_image(tmp_path / "pt.png"))[0, 0].tolist() == [255, 255, 255]


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    value = np.asarray(open_image(tmp_path / "g16.png"))[0, 0]
    assert value.tolist() == [128, 128, 128]  # 32768 / 257 = 127.5; PIL's own convert would give 255


def test_32_bit_integer_mode(tmp_path):
    # PNG cannot hold mode I in this PIL; TIFF can (open_image reads any format PIL reads).
    Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)).save(tmp_path / "i.tif")
    assert Image.open(tmp_path / "i.tif").mode == "I"
    assert np.asarray(open_image(tmp_path / "i.tif"))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparency_is_composited_onto_white(tmp_path, mode):
    im = Image.new(mode, (10, 10), (0, 0, 0, 0) if mode == "RGBA" else (0, 0))
    im.putpixel((0, 0), (255, 0, 0, 255) if mode == "RGBA" else (100, 255))
    im.putpixel((1, 0), (255, 0, 0, 128) if mode == "RGBA" else (100, 128))
    im.save(tmp_path / "t.png")
    arr = np.asarray(open_image(tmp_path / "t.png")).astype(int)
    assert arr[5, 5].tolist() == [255, 255, 255]  # fully transparent: white, not the stored black
    if mode == "RGBA":
        assert arr[0, 0].tolist() == [255, 0, 0]
        assert arr[0, 1, 0] == 255 and 120 <= arr[0, 1, 1] <= 135  # half red over white: pink
    else:
        assert arr[0, 0].tolist() == [100, 100, 100]


def test_grayscale_and_bilevel(tmp_path):
    Image.new("L", (5, 5), 77).save(tmp_path / "l.png")
    Image.new("1", (5, 5), 1).save(tmp_path / "b.bmp")
    assert np.asarray(open_image(tmp_path / "l.png"))[0, 0].tolist() == [77, 77, 77]
    assert np.asarray(open_image(tmp_path / "b.bmp"))[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_exif_orientation_is_applied(tmp_path, ext):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # stored rotated: display rotated 90 degrees clockwise
    path = tmp_path / f"r.{ext}"
    im.save(path, exif=exif, quality=95)
    out = open_image(path)
    assert out.size == (20, 40)
    assert image_size(path) == (20, 40)  # from the header, without decoding
    top, bottom = np.asarray(out)[2, 10].astype(int), np.asarray(out)[37, 10].astype(int)
    assert top[0] > 200 and top[1] < 60  # the red half is now on top
    assert bottom[0] < 60


def test_broken_files_raise_one_error_naming_the_file(tmp_path, make_image):
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    good = make_image(tmp_path / "good.png", 64, 64)
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    jpg = make_image(tmp_path / "full.jpg", 64, 64, quality=90)
    (tmp_path / "trunc.jpg").write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    (tmp_path / "corrupt.png").write_bytes(good.read_bytes()[:60] + b"\x00" * 200 + good.read_bytes()[260:])
    expected = {"zero.png": "empty", "text.jpg": "not an image", "trunc.png": "truncated", "trunc.jpg": "truncated",
                "corrupt.png": "", "missing.png": "does not exist"}
    for name, reason in expected.items():
        with pytest.raises(ImageError) as info:
            open_image(tmp_path / name)
        assert isinstance(info.value, SdtuneError)
        assert str(tmp_path / name) in str(info.value)
        assert reason in str(info.value)
        assert info.value.path == tmp_path / name


def test_decompression_bomb_limit_is_per_call(tmp_path, make_image):
    path = make_image(tmp_path / "big.png", 200, 100)
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(path, max_pixels=19_999)
    with pytest.raises(ImageError, match="decompression bomb"):
        image_size(path, max_pixels=19_999)
    assert open_image(path, max_pixels=20_000).size == (200, 100)


def test_open_from_bytes_names_the_path(tmp_path, make_image):
    path = make_image(tmp_path / "a.png", 8, 8)
    assert open_image(path, data=path.read_bytes()).size == (8, 8)
    with pytest.raises(ImageError, match="a.png"):
        open_image(path, data=b"")


def test_list_images(tmp_path, make_image):
    for name in ["b.PNG", "a.jpg", "c.JpEg", "d.webp", "e.bmp", "sub/f.png", ".hidden.png"]:
        make_image(tmp_path / name, 8, 8, format="PNG")
    (tmp_path / "a.caption").write_text("x")
    (tmp_path / "g.gif").write_text("x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.JpEg", "d.webp", "e.bmp"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)][-1] == "sub/f.png"
    with pytest.raises(SdtuneError, match="does not exist"):
        list_images(tmp_path / "nope")



def test_files_of_other_image_extensions_are_named(tmp_path, make_image, caplog):
    make_image(tmp_path / "a.png", 8, 8)
    for name in ("b.gif", "c.jxl", "d.TIFF", "e.heic"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image")
    caplog.set_level("WARNING")
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]
    assert "4 image file(s)" in caplog.text and "Convert them to PNG" in caplog.text
    for name in ("b.gif", "c.jxl", "d.TIFF", "e.heic"):
        assert name in caplog.text
    assert "notes.txt" not in caplog.text


def test_every_stage_follows_one_exit_rule(tmp_path, make_image, caplog):
    """merge (like caption and tag) exits 1 when an input failed, after writing what it could; a missing caption
    file is not a failure."""
    from sdtune.cli import main

    make_image(tmp_path / "a.png", 8, 8)
    make_image(tmp_path / "b.png", 8, 8)
    make_image(tmp_path / "c.png", 8, 8)
    (tmp_path / "a.caption").write_text("fine")
    assert main(["merge-captions", str(tmp_path), str(tmp_path / "m.json")]) == 0  # b, c: no caption file
    (tmp_path / "b.caption").write_bytes(b"caf\xe9")  # not UTF-8
    assert main(["merge-captions", str(tmp_path), str(tmp_path / "m.json")]) == 1
    assert (tmp_path / "m.json").is_file() and "b.caption" in caplog.text


def test_merge_and_prepare_summaries_name_files_of_other_extensions(tmp_path, make_image, caplog):
    from sdtune.data.metadata import merge_folder

    make_image(tmp_path / "a.png", 8, 8)
    (tmp_path / "a.caption").write_text("x")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    caplog.set_level("WARNING")
    summary = merge_folder(tmp_path, tmp_path / "m.json", "caption", ".caption")
    assert [p.name for p in summary.other_images] == ["anim.gif"]
    assert any("anim.gif" in r.getMessage() and "Convert them" in r.getMessage() for r in caplog.records)
