"""Shared by the prepare and latent-cache tests: small buckets, three images with their buckets and crops worked by
hand, options for the library call, and an independent resize/crop/encode to compare with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdtune.data.prepare import PrepareOptions

# Small buckets so that tests run in milliseconds: area 96x96, sides 32..160 in steps of 32 give
# (32,160) (64,128) (96,96) (128,64) (160,32).
BUCKET_ARGS = dict(max_resolution="96,96", min_bucket_reso=32, max_bucket_reso=160, bucket_reso_steps=32)

CLI_BUCKET_ARGS = ["--max_resolution", "96,96", "--min_bucket_reso", "32", "--max_bucket_reso", "160",
                   "--bucket_reso_steps", "32"]

# image size -> (bucket, resized size, crop box), worked by hand:
# 130x70 (aspect 1.86) -> 128x64 (2.0); scale max(128/130, 64/70) = 0.985 -> 128x69, crop rows 2..66
# 50x40 (1.25) -> 96x96 (1.0); scale max(96/50, 96/40) = 2.4 -> 120x96, crop columns 12..108
# 40x90 (0.44) -> 64x128 (0.5); scale max(64/40, 128/90) = 1.6 -> 64x144, crop rows 8..136
EXPECTED = {
    "wide": ((130, 70), (128, 64), (128, 69), (0, 2, 128, 66)),
    "small": ((50, 40), (96, 96), (120, 96), (12, 0, 108, 96)),
    "tall": ((40, 90), (64, 128), (64, 144), (0, 8, 64, 136)),
}


def options(train: Path, meta: Path, model: Path | str = "unused", **kw) -> PrepareOptions:
    values = dict(BUCKET_ARGS, max_data_loader_n_workers=0)
    values.update(kw)
    return PrepareOptions(train, meta, meta.with_name("meta_lat.json"), str(model), **values)


def expected_crop(path: Path, resized, crop) -> np.ndarray:
    """Resize and crop as the test reads the spec, independently of sdtune's bucket code."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB").resize(resized, Image.Resampling.LANCZOS).crop(crop))


def encode(vae, crop: np.ndarray) -> np.ndarray:
    x = torch.tensor(crop.transpose(2, 0, 1).copy(), dtype=torch.float32)[None] / 127.5 - 1.0
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean[0].numpy()
