"""Throughput of ``sdtune caption`` and ``sdtune tag`` with the tiny models, run by hand:

    .venv/bin/python bench/bench_label.py [--images 64] [--size 512] [--batch_size 8] [--workers 0 4]
                                          [--torch_threads 1]

For each command and loader thread count it reports images/s over the labeling loop (model loading excluded) and
how busy the model was (seconds inside generate / session.run over the loop's wall time). With the tiny models the
model is fast, so the figures mostly measure decoding, preprocessing and file writing: the part the background
loader threads are meant to hide behind a real model. Images are JPEGs of noise, so decoding costs what a photo
of that size costs.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from sdtune.label.blip import CaptionOptions, run_captioning
from sdtune.label.common import LabelReport
from sdtune.label.wd14 import TagOptions, run_tagging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tiny labelers are test fixtures
from tests.fixtures.labelers import build_tiny_blip, build_tiny_tagger  # noqa: E402


def make_images(folder: Path, count: int, size: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(count):
        # Smooth noise (upsampled) compresses like a photo rather than like pure noise.
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        width = size if i % 2 else size * 3 // 4  # mixed aspect ratios, as in a real folder
        Image.fromarray(small).resize((width, size), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.jpg",
                                                                                    quality=90)


def row(name: str, workers: int, batch: int, report: LabelReport) -> str:
    rate = len(report.done) / report.wall_seconds
    busy = 100 * report.model_seconds / report.wall_seconds
    return (f"{name:<8} {workers:>7} {batch:>5} {len(report.done):>6} {report.wall_seconds:>8.2f} {rate:>9.1f} "
            f"{busy:>9.0f}%  (load {report.load_seconds:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="image height in pixels")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--tagger_size", type=int, default=448, help="tiny tagger input side (the real ones: 448)")
    parser.add_argument("--blip_size", type=int, default=384, help="tiny BLIP input side (the real one: 384)")
    parser.add_argument("--max_length", type=int, default=20, help="caption length in tokens")
    parser.add_argument("--torch_threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice); 1 keeps tiny-model figures steady "
                        "on a busy machine, where every tiny op otherwise waits for a descheduled thread")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)

    with tempfile.TemporaryDirectory(prefix="sdtune-bench-label-") as tmp:
        root = Path(tmp)
        blip = build_tiny_blip(root / "blip", image_size=args.blip_size, patch_size=16)
        tagger = build_tiny_tagger(root / "tagger", size=args.tagger_size)
        print(f"{args.images} JPEG images, {args.size} px high; tiny BLIP at {args.blip_size} px, "
              f"tiny tagger at {args.tagger_size} px", file=sys.stderr)
        print(f"{'command':<8} {'workers':>7} {'batch':>5} {'images':>6} {'wall s':>8} {'images/s':>9} "
              f"{'model busy':>10}")
        for workers in args.workers:
            folder = root / f"images-{workers}"
            make_images(folder, args.images, args.size)
            report = run_captioning(CaptionOptions(
                train_data_dir=folder, model=str(blip), batch_size=args.batch_size, beam_search=True,
                max_length=args.max_length, max_data_loader_n_workers=workers, device="cpu"))
            print(row("caption", workers, args.batch_size, report), flush=True)
            report = run_tagging(TagOptions(
                train_data_dir=folder, model_dir=tagger, batch_size=args.batch_size,
                max_data_loader_n_workers=workers))
            print(row("tag", workers, args.batch_size, report), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
