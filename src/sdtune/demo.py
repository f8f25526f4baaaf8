"""``sdtune demo``: the whole pipeline, end to end, on a generated dataset and a tiny model -- no download.

Stages (each through the same library function its sub-command uses)::

    dataset   12 pictures of coloured shapes (three aspect ratios) with .caption and .txt (tag) files
    model     a tiny randomly initialised SD 1.x model (sdtune.models.tiny), saved as a diffusers folder
    merge     merge-captions -> meta_cap.json, merge-tags -> meta_cap_dd.json
    clean     -> meta_clean.json (tags: underscores to spaces, the rating tag removed)
    prepare   aspect-ratio buckets + VAE latents with --flip_aug -> meta_lat.json, dataset/*.npz
    train     a few dozen steps at a high learning rate, so the loss visibly falls; training state and
              TensorBoard logs saved
    export    the trained model as .ckpt, .safetensors and a diffusers folder
    generate  images from the exported model (diffusers folder), and one from the .ckpt to show both agree
    review    the dataset page (sdtune review): crops, buckets, captions and tokens as training saw them

The tiny model learns colour blobs, not shapes: the point is to see every stage work and every file appear, in well
under a minute on a laptop CPU. ``--workdir`` (default ``./sdtune-demo``) holds everything. The demo marks its
folder with ``.sdtune-demo``; a later run deletes only the demo's own entries in it (listed in ``DEMO_ENTRIES``)
and starts fresh. It refuses to use a non-empty folder without the marker.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

from sdtune import __version__
from sdtune.atomic import write_json_atomic, write_text_atomic
from sdtune.errors import SdtuneError
from sdtune.options import opt

logger = logging.getLogger(__name__)

MARKER = ".sdtune-demo"
SUMMARY_FILE = "demo-summary.json"
# Everything a demo run creates at the top of its workdir; only these are ever deleted.
DEMO_ENTRIES = (
    "dataset", "base-model", "meta_cap.json", "meta_cap_dd.json", "meta_clean.json", "meta_lat.json", "output",
    "logs", "exports", "images", "prompts.txt", "review", SUMMARY_FILE,
)
STAGES = ("dataset", "model", "merge", "clean", "prepare", "train", "export", "generate", "review")

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 70), "blue": (50, 80, 220), "yellow": (235, 205, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
# (width, height) of the pictures: mostly square, two landscape and two portrait ones for the aspect buckets.
SIZES = ((64, 64),) * 8 + ((80, 48), (48, 80)) * 2
# What a new user sees in images/ and should not take for a bug.
NOISE_NOTE = ("The generated images look like coloured noise: that is what a tiny randomly initialised model gives "
              "after a minute of training. The demo checks that every stage works and the files agree, not image "
              "quality; a real base model (e.g. SD 1.5) gives real images.")
AGREE_LEVELS = 2  # pixel levels (of 255) within which two exports' images count as the same


@dataclass
class DemoOptions:
    """``demo``: its folder, the training's steps, learning rate and batch size, the seed and torch's CPU threads."""

    workdir: Path = opt(Path("sdtune-demo"), "folder for the dataset, model, logs and images (created; a previous "
                        "demo run's files in it are replaced)")
    max_train_steps: int = opt(60, "training steps")
    learning_rate: float = opt(1e-3, "learning rate (high, so the tiny model's loss falls within the demo)")
    train_batch_size: int = opt(2, "images per batch")
    seed: int = opt(0, "seed of the model, the training and the generated images")
    torch_threads: int = opt(1, "CPU threads torch uses during the demo (0: torch's default). Tiny models run "
                             "fastest on one: more threads only wait for each other, badly so on a busy machine")


@dataclass
class DemoSummary:
    """What a demo run did and how long each stage took: ``report`` prints it, ``demo-summary.json`` stores it."""

    workdir: Path
    images: int = 0
    buckets: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    first_loss: float | None = None  # the first and last steps' losses, as logged
    last_loss: float | None = None
    loss_start: float | None = None  # mean of the first steps logged to TensorBoard
    loss_end: float | None = None  # mean of the last steps logged
    loss_window: int = 0
    files: dict[str, list[str]] = field(default_factory=dict)
    exports_agree: bool | None = None  # the .ckpt and diffusers exports give the same image (within AGREE_LEVELS)
    exports_max_difference: int | None = None  # largest pixel difference between them, in 0-255 levels
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The summary as JSON data for ``demo-summary.json`` (paths as strings, with the sdtune version)."""
        data = asdict(self)
        data["workdir"] = str(self.workdir)
        return {"sdtune_version": __version__, **data}

    def problems(self) -> list[str]:
        """What went wrong although every stage ran (empty for a good run)."""
        out = []
        if self.loss_start is None or self.loss_end is None or not math.isfinite(self.loss_end) \
                or not self.loss_end < self.loss_start:
            out.append(f"the training loss did not fall ({self.loss_start} -> {self.loss_end}); see the TensorBoard "
                       f"logs in {self.workdir / 'logs'}")
        if not self.exports_agree:
            out.append(f"the .ckpt and diffusers exports gave different images (largest difference "
                       f"{self.exports_max_difference} levels); a model format conversion is broken")
        return out

    def report(self) -> str:
        """The text ``sdtune demo`` ends with: each stage's time and files, the loss, whether the exports agree, where
        to look next."""
        lines = [f"sdtune demo finished in {sum(self.seconds.values()):.1f} s; everything is in {self.workdir}", ""]
        for stage in STAGES:
            if stage in self.files:
                shown = self.files[stage]
                more = f" (+{len(shown) - 4} more)" if len(shown) > 4 else ""
                lines.append(f"  {stage:<9} {self.seconds.get(stage, 0):5.1f} s  {', '.join(shown[:4])}{more}")
        lines.append("")
        if self.loss_start is not None and self.loss_end is not None:
            verdict = "fell" if self.loss_end < self.loss_start else "did NOT fall"
            lines.append(f"loss {verdict}: {self.loss_start:.4f} (mean of the first {self.loss_window} steps) -> "
                         f"{self.loss_end:.4f} (mean of the last {self.loss_window}) over {self.steps} steps")
        if self.exports_agree is not None:
            lines.append("the .ckpt and the diffusers export give " + (
                "the same image for the same seed" if self.exports_agree else "DIFFERENT images for one seed")
                + f" (largest pixel difference {self.exports_max_difference} of 255)")
        if "review" in self.files:
            lines.append(f"Dataset review: open {self.workdir / self.files['review'][0]} in a browser")
        lines.append(f"TensorBoard: tensorboard --logdir {self.workdir / 'logs'}")
        lines.append(f"PNG metadata: sdtune generate writes the prompt and settings into each image "
                     f"({self.workdir / 'images'})")
        lines.append(NOISE_NOTE)
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ workdir
def prepare_workdir(workdir: Path) -> None:
    """Make ``workdir`` ready for a fresh run: create it, or empty the demo's own entries from an earlier run.

    Refuses (``SdtuneError``) a path that is a file, or a non-empty folder without the demo's marker file: the
    demo never deletes what it did not create.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise SdtuneError(f"--workdir {workdir}: is a file; give a folder (it will be created)")
    marker = workdir / MARKER
    if workdir.is_dir() and any(workdir.iterdir()) and not marker.is_file():
        raise SdtuneError(
            f"--workdir {workdir}: the folder is not empty and is not a demo folder (no {MARKER} file in it); the "
            "demo will not delete anything it did not create. Choose a new or empty folder, e.g. --workdir "
            "sdtune-demo"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    removed = []
    for name in DEMO_ENTRIES:
        path = workdir / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(name)
    if removed:
        logger.info("removed the previous demo run's %s from %s", ", ".join(removed), workdir)
    write_json_atomic(marker, {"created_by": "sdtune demo", "sdtune_version": __version__})


# ------------------------------------------------------------------------------------------------ dataset
def draw_shape(size: tuple[int, int], shape: str, colour: str, background: str) -> Image.Image:
    """A ``size`` picture of one ``shape`` (circle, square, else triangle) in ``colour`` on ``background``, centred,
    70% of the shorter side."""
    width, height = size
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    side = int(min(width, height) * 0.7)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(left + side // 2, top), (left + side, top + side), (left, top + side)], fill=COLOURS[colour])
    return image


def make_dataset(folder: Path) -> list[Path]:
    """12 pictures, each with a ``.caption`` (a sentence) and a ``.txt`` (WD14-style tags, with underscores and a
    rating tag for ``clean`` to tidy)."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    paths = []
    for i, size in enumerate(SIZES):
        shape, colour = SHAPES[i % len(SHAPES)], colours[i % len(colours)]
        background = "white" if i % 2 == 0 else "black"
        stem = f"{i:02d}_{colour}_{shape}"
        path = folder / f"{stem}.png"
        draw_shape(size, shape, colour, background).save(path)
        write_text_atomic(folder / f"{stem}.caption", f"a {colour} {shape} on a {background} background\n")
        write_text_atomic(folder / f"{stem}.txt",
                          f"{colour}_{shape}, {shape}, simple_background, {background}_background, no_humans, "
                          "rating:general\n")
        paths.append(path)
    return paths


def loss_curve(logging_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs of ``loss/step`` from the TensorBoard event files under ``logging_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: list[tuple[int, float]] = []
    for run in sorted(p for p in Path(logging_dir).iterdir() if p.is_dir()):
        accumulator = EventAccumulator(str(run), size_guidance={"scalars": 0})
        accumulator.Reload()
        if "loss/step" in accumulator.Tags().get("scalars", []):
            points += [(e.step, float(e.value)) for e in accumulator.Scalars("loss/step")]
    if not points:
        raise SdtuneError(f"{logging_dir}: no loss/step values in its TensorBoard logs")
    return sorted(points)


# ------------------------------------------------------------------------------------------------ the run
def run_demo(opts: DemoOptions) -> DemoSummary:
    """Run every stage in ``opts.workdir``; returns what happened and where the files are (also written to
    ``<workdir>/demo-summary.json``)."""
    if opts.max_train_steps < 2:
        raise SdtuneError("--max_train_steps must be at least 2 for the loss to be compared")
    if opts.torch_threads < 0:
        raise SdtuneError("--torch_threads must be 0 (torch's default) or more")
    with torch_threads(opts.torch_threads):
        return _run_demo(opts)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` (0: unchanged) for the block, then restored."""
    import torch

    previous = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _run_demo(opts: DemoOptions) -> DemoSummary:
    workdir = Path(opts.workdir).absolute()
    prepare_workdir(workdir)
    summary = DemoSummary(workdir=workdir)

    def stage(number: int, name: str, what: str, body: Callable[[], list[Path]]) -> None:
        logger.info("[%d/%d] %s: %s", number, len(STAGES), name, what)
        started = time.perf_counter()
        paths = body()
        summary.seconds[name] = round(time.perf_counter() - started, 2)
        summary.files[name] = [str(p.relative_to(workdir)) for p in paths]

    dataset = workdir / "dataset"
    base_model = workdir / "base-model"
    stage(1, "dataset", f"drawing {len(SIZES)} captioned and tagged shapes in {dataset}",
          lambda: _stage_dataset(dataset, summary))
    stage(2, "model", f"building a tiny SD 1.x model in {base_model}", lambda: _stage_model(base_model, opts.seed))
    stage(3, "merge", "merge-captions and merge-tags into the metadata JSON", lambda: _stage_merge(workdir))
    stage(4, "clean", "cleaning captions and tags", lambda: _stage_clean(workdir))
    stage(5, "prepare", "aspect-ratio buckets and VAE latents (with flipped copies)",
          lambda: _stage_prepare(workdir, summary))
    stage(6, "train", f"{opts.max_train_steps} steps at learning rate {opts.learning_rate:g}",
          lambda: _stage_train(workdir, opts, summary))
    stage(7, "export", "saving the trained model as .ckpt, .safetensors and a diffusers folder",
          lambda: _stage_export(workdir))
    stage(8, "generate", "images from the exported model", lambda: _stage_generate(workdir, opts.seed, summary))
    stage(9, "review", "the dataset page, as training saw the data", lambda: _stage_review(workdir, opts))
    write_json_atomic(workdir / SUMMARY_FILE, summary.to_json())
    return summary


def _stage_dataset(dataset: Path, summary: DemoSummary) -> list[Path]:
    images = make_dataset(dataset)
    summary.images = len(images)
    return images


def _stage_model(base_model: Path, seed: int) -> list[Path]:
    from sdtune.models.save import save_model
    from sdtune.models.tiny import build_tiny

    save_model(build_tiny("sd1", seed=seed), base_model, "diffusers_safetensors")
    return [base_model]


def _stage_merge(workdir: Path) -> list[Path]:
    from sdtune.data.metadata import merge_folder

    for field_name, extension, out, source in (("caption", ".caption", "meta_cap.json", None),
                                               ("tags", ".txt", "meta_cap_dd.json", "meta_cap.json")):
        result = merge_folder(workdir / "dataset", workdir / out, field_name, extension,
                              in_json=workdir / source if source else None)
        if result.missing or result.unreadable:
            raise SdtuneError(f"merging {field_name} files in {workdir / 'dataset'} missed some images")
    return [workdir / "meta_cap.json", workdir / "meta_cap_dd.json"]


def _stage_clean(workdir: Path) -> list[Path]:
    from sdtune.data.clean import clean_images, load_rules
    from sdtune.data.metadata import load_metadata, save_metadata

    cleaned, result = clean_images(load_metadata(workdir / "meta_cap_dd.json"), load_rules())
    save_metadata(workdir / "meta_clean.json", cleaned)
    result.log()
    example = next(iter(cleaned.values()))
    logger.info("e.g. caption %r, tags %r", example.get("caption"), example.get("tags"))
    return [workdir / "meta_clean.json"]


def _stage_prepare(workdir: Path, summary: DemoSummary) -> list[Path]:
    from sdtune.data.prepare import PrepareOptions, load_prepare_vae, prepare_latents

    options = PrepareOptions(
        train_data_dir=workdir / "dataset", in_json=workdir / "meta_clean.json", out_json=workdir / "meta_lat.json",
        model_name_or_path=str(workdir / "base-model"), batch_size=4, max_data_loader_n_workers=0,
        max_resolution="64,64", min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16, flip_aug=True,
    )
    result = prepare_latents(options, load_prepare_vae(options.model_name_or_path))
    result.log()
    if result.skipped:
        raise SdtuneError(f"prepare skipped {len(result.skipped)} demo image(s): {result.skipped[0][1]}")
    summary.buckets = {f"{w}x{h}": n for (w, h), n in result.bucket_counts.items()}
    return [workdir / "meta_lat.json", *sorted((workdir / "dataset").glob("*.npz"))]


def _stage_train(workdir: Path, opts: DemoOptions, summary: DemoSummary) -> list[Path]:
    from sdtune.train.loop import TrainOptions, train

    result = train(TrainOptions(
        pretrained_model_name_or_path=str(workdir / "base-model"), in_json=str(workdir / "meta_lat.json"),
        train_data_dir=str(workdir / "dataset"), output_dir=str(workdir / "output"), output_name="demo",
        save_model_as="safetensors", train_batch_size=opts.train_batch_size, learning_rate=opts.learning_rate,
        max_train_steps=opts.max_train_steps, seed=opts.seed, save_state=True, logging_dir=str(workdir / "logs"),
        max_data_loader_n_workers=0,
    ))
    summary.steps = int(result["global_step"])
    losses = [loss for _step, loss in loss_curve(workdir / "logs")]
    summary.first_loss, summary.last_loss = losses[0], losses[-1]
    # Single steps are noisy (each draws its own timesteps): compare means of the first and last few.
    window = max(1, min(10, len(losses) // 4))
    summary.loss_window = window
    summary.loss_start = float(np.mean(losses[:window]))
    summary.loss_end = float(np.mean(losses[-window:]))
    logger.info("loss: %.4f -> %.4f (means of the first and last %d steps)", summary.loss_start, summary.loss_end,
                window)
    model = Path(result["model"])
    return [model, workdir / "output" / f"{model.stem}-state", workdir / "logs"]


def _stage_export(workdir: Path) -> list[Path]:
    from sdtune.models.io import load_model
    from sdtune.models.save import save_model

    model = load_model(workdir / "output" / "demo.safetensors")
    exports = workdir / "exports"
    targets = [(exports / "demo.ckpt", "ckpt"), (exports / "demo.safetensors", "safetensors"),
               (exports / "demo-diffusers", "diffusers_safetensors")]
    for path, fmt in targets:
        save_model(model, path, fmt)
        logger.info("wrote %s (%s)", path, fmt)
    return [path for path, _fmt in targets]


def _stage_generate(workdir: Path, seed: int, summary: DemoSummary) -> list[Path]:
    from sdtune.generate import GenerateOptions, generate

    prompts = workdir / "prompts.txt"
    write_text_atomic(prompts, "\n".join([
        "# one prompt a line; inline options: --n negative prompt, --w width, --h height, --d seed, --l scale, --s steps",
        "a red circle on a white background, red circle, circle, simple background, white background",
        "a blue square on a black background --n circle --w 80 --h 48 --d 7",
    ]) + "\n")
    common = dict(steps=20, scale=7.5, sampler="euler_a", W=64, H=64, seed=seed, outdir=workdir / "images",
                  device="auto")
    paths = generate(GenerateOptions(pretrained_model_name_or_path=str(workdir / "exports" / "demo-diffusers"),
                                     from_file=prompts, **common))  # type: ignore[arg-type]
    first_prompt = "a red circle on a white background, red circle, circle, simple background, white background"
    check = generate(GenerateOptions(pretrained_model_name_or_path=str(workdir / "exports" / "demo.ckpt"),
                                     prompt=first_prompt, **common))  # type: ignore[arg-type]
    with Image.open(paths[0]) as a, Image.open(check[0]) as b:
        difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    # Equal weights, but not always bit-equal pixels: tensors read from a .ckpt and from .safetensors can sit at
    # differently aligned addresses, which changes the CPU's vectorised summation order in the last bits.
    summary.exports_max_difference = int(difference.max())
    summary.exports_agree = summary.exports_max_difference <= AGREE_LEVELS
    return [*paths, *check]


def _stage_review(workdir: Path, opts: DemoOptions) -> list[Path]:
    from sdtune.review.collect import ReviewOptions
    from sdtune.review.command import write_review

    # the options training and prepare ran with above, so the page shows that run's crops and batches
    page, _review = write_review(ReviewOptions(
        in_json=workdir / "meta_lat.json", train_data_dir=workdir / "dataset", out=workdir / "review",
        pretrained_model_name_or_path=str(workdir / "base-model"), train_batch_size=opts.train_batch_size,
        seed=opts.seed, max_resolution="64,64", min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=16,
        workers=0,
    ))
    return [page]


def demo_command(opts: DemoOptions) -> int:
    """Run the demo and print its report. Exit code 1 when it ran but did not show what it should: a loss that
    did not fall, or exports that disagree."""
    summary = run_demo(opts)
    print(summary.report())
    problems = summary.problems()
    for problem in problems:
        logger.error("%s", problem)
    return 1 if problems else 0
