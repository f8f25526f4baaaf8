"""A generated dataset for the review tests: pictures of several aspect ratios, captions, tags, a 225-token caption,
a caption holding markup, duplicates, an unprepared image, a metadata entry without an image; ``prepare`` runs with
the tiny model's VAE so the latent caches are real."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from sdtune.data.metadata import load_metadata, save_metadata
from sdtune.data.prepare import PrepareOptions, prepare_latents

# (stem, (width, height), caption or None, tags or None)
# 222 one-token words, a 5-token word (tokens 223-227: the 225-token cut-off falls inside it), 10 more: 237 tokens
LONG_CAPTION = "cat " * 222 + "supercalifragilistic" + " dog" * 10
LONG_CUT = len("cat " * 222)  # where the cut-off is drawn: the start of the word it splits
XSS_CAPTION = "a cat <script>window.__pwned = 1</script> <img src=x onerror=\"window.__pwned = 2\"> & co"
SIZES = {
    "a_square": (64, 64), "b_wide": (96, 48), "c_tall": (48, 96), "d_square": (64, 64), "e_wide": (120, 64),
    "f_small": (40, 40), "g_long": (64, 64), "h_markup": (64, 64), "i_nocaption": (64, 64), "j_empty": (64, 64),
    "k_dup": (64, 64),
}
PREPARE = dict(max_resolution="64,64", min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16)


@dataclass
class Dataset:
    folder: Path
    meta: Path  # prepared metadata (with train_resolution)
    keys: list[str]


def draw(size: tuple[int, int], seed: int) -> Image.Image:
    image = Image.new("RGB", size, ((seed * 40) % 256, (seed * 90) % 256, (seed * 150) % 256))
    image.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    return image


def write_dataset(folder: Path, vae) -> Dataset:
    folder.mkdir(parents=True)
    entries: dict[str, dict] = {}
    for i, (stem, size) in enumerate(SIZES.items()):
        seed = 0 if stem == "k_dup" else i  # k_dup has a_square's bytes
        draw(size, seed).save(folder / f"{stem}.png")
        entry = {"caption": f"a picture number {i}", "tags": f"shape, colour {i % 3}" + (", wide" if size[0] > size[1] else "")}
        if stem == "g_long":
            entry = {"caption": LONG_CAPTION}
        elif stem == "h_markup":
            entry = {"caption": XSS_CAPTION, "tags": "<b>bold</b>, shape"}
        elif stem == "i_nocaption":
            entry = {}
        elif stem == "j_empty":
            entry = {"caption": "", "tags": ""}
        entries[stem] = entry
    entries["z_gone"] = {"caption": "an image that was deleted", "train_resolution": [64, 64]}
    raw = folder.parent / "meta_clean.json"
    save_metadata(raw, entries)
    meta = folder.parent / "meta_lat.json"
    prepare_latents(PrepareOptions(train_data_dir=folder, in_json=raw, out_json=meta, model_name_or_path="unused",
                                   batch_size=4, max_data_loader_n_workers=0, flip_aug=True, **PREPARE), vae=vae)
    # one image added after prepare: in the metadata, but never prepared
    draw((64, 48), 99).save(folder / "m_new.png")
    images = load_metadata(meta)
    images["m_new"] = {"caption": "added later", "tags": "shape"}
    save_metadata(meta, images)
    return Dataset(folder, meta, sorted(SIZES) + ["m_new"])


@pytest.fixture(scope="session")
def review_dataset(tmp_path_factory) -> Dataset:
    from sdtune.models.tiny import build_tiny

    return write_dataset(tmp_path_factory.mktemp("review") / "train", build_tiny("sd1").vae)
