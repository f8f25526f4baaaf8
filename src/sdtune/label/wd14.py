"""``sdtune tag``: WD14 tagger (ONNX) tags per image, written to ``<image stem>.txt`` next to the image.

Replaces sd-scripts' ``finetune/tag_images_by_wd14_tagger.py``. A tagger model is a folder holding ``model.onnx``
and ``selected_tags.csv`` (columns ``tag_id,name,category,count``; category 9 = rating, 4 = character, anything else
is treated as general), as in SmilingWolf's repos (``wd-v1-4-*-tagger-v2`` and the ``wd-*-tagger-v3`` ones).

Where the model lives: ``--model_dir`` (default ``wd14_tagger_model``). If that folder itself holds ``model.onnx``,
it is used as is (a folder you filled by hand). Otherwise the model lives in a sub-folder per repo,
``MODEL_DIR/<owner>_<name>`` (as sd-scripts lays it out, so switching ``--repo_id`` never mixes two models'
files), is downloaded there from the Hugging Face hub on first use, and is read from there afterwards.
``--force_download`` fetches both files again into the folder in use, replacing damaged ones.

Preprocessing is what the taggers were trained with (SmilingWolf's wd-tagger space, app.py ``prepare_image``):
pad to a square on white, resize (bicubic) to the model's input size read from the ONNX input shape (NHWC), RGB to
BGR, float32 in 0..255.

Tag order in the file: ``--always_first_tags`` that were found (in the order given), then the rating tag
(``--use_rating_tags``), then character tags, then general tags; within each group by descending score (ties keep
the CSV order); the rating tag goes last instead with ``--use_rating_tags_as_last_tag``. Descending score puts the
most certain tags first, where ``--keep_tokens`` and caption truncation leave them alone.

How a tag of the model is written, in this order: ``--remove_underscore``, then ``--tag_replacement``, then
``--character_tag_expand`` (as in sd-scripts). ``--undesired_tags`` and ``--always_first_tags`` match the written
tags; a tag written twice (say an expanded series that is also a general tag) is kept once, where it first appears.
"""

from __future__ import annotations

import csv
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from huggingface_hub import hf_hub_download
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from sdtune.atomic import write_text_atomic
from sdtune.data.images import open_image
from sdtune.label.common import (
    LabelError,
    LabelReport,
    Stopwatch,
    WorkItem,
    hub_offline,
    iter_batches,
    normalize_extension,
    plan_work,
    resolve_workers,
    split_list,
)
from sdtune.option_groups import ImageFolder, LoaderWorkers
from sdtune.options import opt

logger = logging.getLogger(__name__)

DEFAULT_WD14_REPO = "SmilingWolf/wd-v1-4-convnext-tagger-v2"
MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
MODEL_FILES = (MODEL_FILE, TAGS_FILE)
RATING, GENERAL, CHARACTER = 9, 0, 4
# Tags this short keep their underscores under --remove_underscore: they are emoticons ("^_^", "o_o"), not words
# (sd-scripts' rule).
_KEEP_UNDERSCORE_MAX_LEN = 3


@dataclass
class TagOptions(ImageFolder, LoaderWorkers):
    """``tag``: a WD14 tagger writes a tag file beside each image of TRAIN_DIR."""

    repo_id: str = opt(DEFAULT_WD14_REPO, "Hugging Face repo of the WD14 tagger (v2 and v3 taggers work)")
    model_dir: Path = opt(Path("wd14_tagger_model"), "folder holding model.onnx and selected_tags.csv, or their "
                          "parent: the model is then MODEL_DIR/<owner>_<name>, downloaded there on first use")
    force_download: bool = opt(False, "download the model files again, replacing the ones in the model folder")
    batch_size: int = opt(1, "images per model call (a model exported with a fixed batch of 1 is run image by image)")
    thresh: float = opt(0.35, "score a tag needs to be written")
    general_threshold: float | None = opt(None, "threshold for general tags; unset means --thresh")
    character_threshold: float | None = opt(None, "threshold for character tags; unset means --thresh")
    caption_extension: str = opt(".txt", "extension of the tag files written next to the images",
                                 aliases=("--caption_extention",))
    caption_separator: str = opt(", ", "separator between tags in the tag files")
    remove_underscore: bool = opt(False, "write tags with spaces instead of underscores (long_hair -> long hair)")
    undesired_tags: str = opt("", "comma-separated tags never to write")
    always_first_tags: str = opt("", "comma-separated tags that go first, in this order, when the image has them")
    use_rating_tags: bool = opt(False, "write the highest-scoring rating tag (general, sensitive, ...) too")
    use_rating_tags_as_last_tag: bool = opt(False, "write the highest-scoring rating tag last (implies "
                                            "--use_rating_tags)")
    tag_replacement: str = opt("", "write some tags differently: 'source1,target1;source2,target2'; write \\, or "
                               "\\; for a comma or semicolon inside a tag; applied after --remove_underscore")
    character_tag_expand: bool = opt(False, "write a character tag 'name_(series)' as two tags, 'name, series'")
    character_tags_first: bool = opt(False, "sd-scripts' option, accepted: sdtune always writes character tags "
                                     "before general tags (sd-scripts writes them after unless this is given)")
    append_tags: bool = opt(False, "add new tags to existing tag files instead of skipping those images")
    overwrite: bool = opt(False, "tag images that already have a tag file, replacing it")
    frequency_tags: bool = opt(False, "log how often each tag was written, at the end")
    onnx_providers: str = opt("", "comma-separated onnxruntime execution providers; empty means CUDA if available, "
                              "then CPU")
    onnx: bool = opt(False, "sd-scripts' option, accepted: sdtune always runs the tagger with ONNX Runtime")


@dataclass(frozen=True)
class TagTable:
    """``selected_tags.csv``: tag names and categories in model output order."""

    names: tuple[str, ...]
    categories: tuple[int, ...]


@dataclass(frozen=True)
class TagRules:
    """Everything that turns a score vector into the list of tags written."""

    general_threshold: float
    character_threshold: float
    remove_underscore: bool
    undesired: frozenset[str]
    always_first: tuple[str, ...]
    use_rating_tags: bool
    rating_last: bool = False
    replacements: dict[str, str] = field(default_factory=dict)  # comparison key of the source -> target
    character_tag_expand: bool = False


def _validate(options: TagOptions) -> tuple[str, TagRules]:
    """Check every option before a model is loaded; returns the normalized extension and the tag rules."""
    if options.batch_size < 1:
        raise LabelError(f"--batch_size must be at least 1, got {options.batch_size}")
    general = options.thresh if options.general_threshold is None else options.general_threshold
    character = options.thresh if options.character_threshold is None else options.character_threshold
    for name, value in (("--thresh", options.thresh), ("--general_threshold", general),
                        ("--character_threshold", character)):
        if not 0.0 <= value <= 1.0:
            raise LabelError(f"{name} must be between 0 and 1 (a tag's score is a probability), got {value}")
    if options.append_tags and options.overwrite:
        raise LabelError("--append_tags and --overwrite contradict each other: append adds to existing tag files, "
                         "overwrite replaces them; pick one")
    if not options.caption_separator.strip():
        raise LabelError("--caption_separator must contain a visible character, such as ', '")
    resolve_workers(options.max_data_loader_n_workers)
    rules = TagRules(
        general_threshold=general,
        character_threshold=character,
        remove_underscore=options.remove_underscore,
        undesired=frozenset(_key(t) for t in split_list(options.undesired_tags)),
        always_first=tuple(split_list(options.always_first_tags)),
        use_rating_tags=options.use_rating_tags or options.use_rating_tags_as_last_tag,
        rating_last=options.use_rating_tags_as_last_tag,
        replacements=parse_tag_replacement(options.tag_replacement),
        character_tag_expand=options.character_tag_expand,
    )
    return normalize_extension(options.caption_extension, "--caption_extension"), rules


def _key(tag: str) -> str:
    """Comparison key: 'long_hair' and 'long hair' are the same tag, whatever --remove_underscore says."""
    return tag.strip().replace("_", " ").lower()


def display_name(name: str, remove_underscore: bool) -> str:
    """How tag ``name`` is written: with ``remove_underscore``, underscores become spaces, except in tags short
    enough to be emoticons (``^_^``)."""
    if remove_underscore and len(name) > _KEEP_UNDERSCORE_MAX_LEN:
        return name.replace("_", " ")
    return name


def _split_unescaped(text: str, separator: str) -> list[str]:
    """Split at each ``separator`` not preceded by a backslash; escapes are kept for ``_unescape``."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            current.append(char)
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def _unescape(text: str) -> str:
    out, escaped = [], False
    for char in text:
        if char == "\\" and not escaped:
            escaped = True
            continue
        out.append(char)
        escaped = False
    return "".join(out).strip()


def parse_tag_replacement(text: str) -> dict[str, str]:
    """``--tag_replacement``: ``"a,b;c\\,d,e"`` -> ``{"a": "b", "c,d": "e"}``, sources as comparison keys."""
    pairs: dict[str, str] = {}
    for chunk in _split_unescaped(text, ";"):
        if not chunk.strip():
            continue
        parts = [_unescape(part) for part in _split_unescaped(chunk, ",")]
        if len(parts) != 2 or not all(parts):
            raise LabelError(f"--tag_replacement: {chunk.strip()!r} is not one 'source,target' pair; the format is "
                             "'source1,target1;source2,target2', with \\, or \\; for a comma or semicolon inside "
                             "a tag")
        pairs[_key(parts[0])] = parts[1]
    return pairs


def expand_character_tag(tag: str) -> list[str]:
    """``'name_(series)'`` or ``'name (series)'`` -> ``['name', 'series']``; other tags are left whole."""
    if not tag.endswith(")"):
        return [tag]
    name, _, series = tag[:-1].rpartition("(")
    name, series = name.rstrip(" _"), series.strip()
    return [name, series] if name and series else [tag]


def written_tags(name: str, category: int, rules: TagRules) -> list[str]:
    """How the model's tag ``name`` is written (see the module docstring): one tag, or two for an expanded
    character tag."""
    tag = display_name(name, rules.remove_underscore)
    tag = rules.replacements.get(_key(tag), tag)
    if rules.character_tag_expand and category == CHARACTER:
        return expand_character_tag(tag)
    return [tag]


def select_tags(scores: np.ndarray, table: TagTable, rules: TagRules) -> list[str]:
    """The tags written for one image's scores, in the documented order (see the module docstring)."""
    # Stable sort by descending score, so equal scores keep the CSV (model) order.
    order = sorted(range(len(table.names)), key=lambda i: -float(scores[i]))
    rating: list[int] = []
    character: list[int] = []
    general: list[int] = []
    for i in order:
        category = table.categories[i]
        if category == RATING:
            rating.append(i)
        elif category == CHARACTER:
            if scores[i] >= rules.character_threshold:
                character.append(i)
        elif scores[i] >= rules.general_threshold:
            general.append(i)
    rated = rating[:1] if rules.use_rating_tags else []
    chosen = character + general + rated if rules.rating_last else rated + character + general
    tags = []
    seen = set(rules.undesired)
    for i in chosen:
        for tag in written_tags(table.names[i], table.categories[i], rules):
            if _key(tag) not in seen:
                seen.add(_key(tag))
                tags.append(tag)
    first: list[str] = []
    for wanted in rules.always_first:
        match = next((t for t in tags if _key(t) == _key(wanted)), None)
        if match is not None and match not in first:
            first.append(match)
    return first + [t for t in tags if t not in first]


def merge_tags(existing_text: str, new_tags: list[str], separator: str) -> list[str]:
    """Existing tags (in their order) followed by the new tags they did not already have."""
    existing = [t.strip() for t in existing_text.split(separator.strip()) if t.strip()]
    seen = {_key(t) for t in existing}
    merged = list(existing)
    for tag in new_tags:
        if _key(tag) not in seen:
            seen.add(_key(tag))
            merged.append(tag)
    return merged


# --- the model folder ---------------------------------------------------------------------------------------------

def model_folder(model_dir: Path, repo_id: str) -> Path:
    """The folder the tagger is read from (and downloaded to); see the module docstring."""
    model_dir = Path(model_dir)
    if (model_dir / MODEL_FILE).is_file():
        return model_dir
    return model_dir / repo_id.replace("/", "_")


def ensure_model_files(model_dir: Path, repo_id: str, force_download: bool) -> Path:
    """The folder holding both model files, downloading the missing ones (all of them with ``force_download``)."""
    folder = model_folder(model_dir, repo_id)
    missing_before = [name for name in MODEL_FILES if not (folder / name).is_file()]
    wanted = list(MODEL_FILES) if force_download else missing_before
    # The top-most folder this call creates: removed again when the download fails, so that a failed first run
    # leaves no empty model folder (with the hub's lock files) behind to puzzle the user.
    created = next((p for p in reversed([folder, *folder.parents]) if not p.exists()), None)
    for name in wanted:
        logger.info("downloading %s from https://huggingface.co/%s into %s", name, repo_id, folder)
        try:
            # local_dir: plain files in our folder (not the HF cache), so users can see and replace them.
            hf_hub_download(repo_id=repo_id, filename=name, local_dir=folder, force_download=force_download)
        except Exception as exc:  # the hub raises many types (offline, HTTP, DNS, missing repo); all mean the same
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)  # best effort: the error below is what matters
            missing = ", ".join(missing_before)
            how = (f"download {' and '.join(MODEL_FILES)} from https://huggingface.co/{repo_id}/tree/main into "
                   f"{folder}, or pass --model_dir FOLDER holding them")
            if hub_offline() and not missing_before:
                raise LabelError(f"--force_download needs the Hugging Face hub, which is offline (HF_HUB_OFFLINE=1); "
                                 f"unset HF_HUB_OFFLINE, or {how}") from exc
            if hub_offline():
                raise LabelError(f"no WD14 tagger model in {folder} (missing {missing}) and the Hugging Face hub is "
                                 f"offline (HF_HUB_OFFLINE=1); {how}") from exc
            raise LabelError(f"cannot download {name} of {repo_id} into {folder} ({type(exc).__name__}: {exc}); "
                             f"check --repo_id and your connection, or {how}") from exc
    return folder


def read_tag_table(path: Path) -> TagTable:
    """Read ``selected_tags.csv``; a damaged or foreign file raises ``LabelError`` suggesting ``--force_download``."""
    damaged = f"; run again with --force_download to fetch it again, or replace {path.name} by hand"
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LabelError(f"cannot read {path}: {exc}{damaged}") from exc
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise LabelError(f"{path} is not a tagger tag list (expected a CSV with columns tag_id,name,category,count)"
                         f"{damaged}")
    try:
        categories = tuple(int(row["category"]) for row in rows)
    except (TypeError, ValueError) as exc:
        raise LabelError(f"{path} has a non-numeric category ({exc}){damaged}") from exc
    names = tuple(row["name"] or "" for row in rows)
    if any(not n for n in names):
        raise LabelError(f"{path} has a row without a tag name{damaged}")
    return TagTable(names=names, categories=categories)


@dataclass
class Tagger:
    """What ``load_tagger`` returns: the ONNX session, its input's name and image side, its fixed batch size (None:
    any) and the tag table."""

    session: Any
    input_name: str
    size: int
    fixed_batch: int | None
    table: TagTable

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Scores (N, tags) for a batch (N, size, size, 3) of preprocessed images."""
        if self.fixed_batch is None:
            return np.asarray(self.session.run(None, {self.input_name: images})[0])
        # A model exported with a fixed batch dimension accepts exactly that many images: run in chunks, padding
        # the last one with zeros and dropping the padding's scores.
        step = self.fixed_batch
        outputs = []
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            count = len(chunk)
            if count < step:
                chunk = np.concatenate([chunk, np.zeros((step - count, *chunk.shape[1:]), chunk.dtype)])
            outputs.append(np.asarray(self.session.run(None, {self.input_name: chunk})[0])[:count])
        return np.concatenate(outputs)


def _providers(requested: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested.strip():
        providers = split_list(requested)
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise LabelError(f"--onnx_providers: {', '.join(unknown)} not available in this onnxruntime; available: "
                             f"{', '.join(available)}")
        return providers
    preferred = ("CUDAExecutionProvider", "ROCMExecutionProvider", "CoreMLExecutionProvider", "CPUExecutionProvider")
    return [p for p in preferred if p in available]


def load_tagger(folder: Path, providers: list[str]) -> Tagger:
    """Open ``folder``'s model; a damaged or foreign file raises ``LabelError`` naming it and suggesting
    ``--force_download``."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise LabelError("sdtune tag needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from None
    model_path = folder / MODEL_FILE
    table = read_tag_table(folder / TAGS_FILE)
    damaged = "; run again with --force_download to fetch it again, or replace it by hand"
    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception directly
        raise LabelError(f"{model_path} cannot be loaded as an ONNX model, damaged or incomplete? ({exc}){damaged}") \
            from exc
    inputs = session.get_inputs()
    shape = list(inputs[0].shape) if inputs else []
    # The taggers take NHWC: [batch, size, size, 3].
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise LabelError(f"{model_path} takes input of shape {shape}; a WD14 tagger takes [batch, size, size, 3]")
    outputs = session.get_outputs()
    width = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if isinstance(width, int) and width != len(table.names):
        raise LabelError(f"{model_path} scores {width} tags but {folder / TAGS_FILE} lists {len(table.names)}; the "
                         f"two files come from different models{damaged}")
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return Tagger(session=session, input_name=inputs[0].name, size=shape[1], fixed_batch=fixed, table=table)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32 BGR in 0..255, padded to a square on white (SmilingWolf wd-tagger app.py)."""
    width, height = image.size
    side = max(width, height)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    rgb = np.asarray(square, dtype=np.float32)
    return np.ascontiguousarray(rgb[:, :, ::-1])  # the taggers were trained on BGR (OpenCV) arrays


# --- the command --------------------------------------------------------------------------------------------------

def run_tagging(options: TagOptions) -> LabelReport:
    """Tag every image in ``options.train_data_dir`` that needs it; the report lists done/skipped/failed."""
    extension, rules = _validate(options)
    workers = resolve_workers(options.max_data_loader_n_workers)
    report = LabelReport()
    items = plan_work(Path(options.train_data_dir), options.recursive, extension, options.overwrite, report,
                      relabel_existing=options.append_tags)
    if not items:
        logger.info("every image already has a %s file; nothing to tag (--overwrite or --append_tags tags them "
                    "again)", extension)
        return report

    started = time.perf_counter()
    providers = _providers(options.onnx_providers)
    folder = ensure_model_files(Path(options.model_dir), options.repo_id, options.force_download)
    logger.info("loading WD14 tagger from %s (%s)", folder, ", ".join(providers))
    tagger = load_tagger(folder, providers)
    report.load_seconds = time.perf_counter() - started

    def load(item: WorkItem) -> np.ndarray:
        return preprocess(open_image(item.image), tagger.size)

    frequency: Counter[str] = Counter()
    model_time = Stopwatch()
    started = time.perf_counter()
    with logging_redirect_tqdm(), tqdm(total=len(items), unit="img", desc="tag") as progress:
        for batch in iter_batches(items, load, options.batch_size, workers):
            for item, error in batch.failed:
                logger.warning("skipping %s", error)
                report.failed.append((item.image, error.reason))
            if batch.items:
                with model_time:
                    scores = tagger.predict(np.stack(batch.data))
                for item, row in zip(batch.items, scores):
                    tags = select_tags(row, tagger.table, rules)
                    if _write_tags(item, tags, options, report):
                        frequency.update(tags)
            progress.update(len(batch.items) + len(batch.failed))
    report.model_seconds = model_time.seconds
    report.wall_seconds = time.perf_counter() - started
    if options.frequency_tags:
        logger.info("tag frequencies:\n%s", "\n".join(f"  {tag}: {n}" for tag, n in frequency.most_common()))
    return report


def _write_tags(item: WorkItem, tags: list[str], options: TagOptions, report: LabelReport) -> bool:
    try:
        if options.append_tags and item.sidecar.exists():
            tags = merge_tags(item.sidecar.read_text(encoding="utf-8"), tags, options.caption_separator)
        write_text_atomic(item.sidecar, options.caption_separator.join(tags) + "\n")
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("cannot update %s: %s", item.sidecar, exc)
        report.failed.append((item.image, f"cannot update {item.sidecar.name}: {exc}"))
        return False
    logger.debug("%s: %s", item.image.name, tags)
    report.done.append(item.image)
    return True


def tag_images(options: TagOptions) -> int:
    """``sdtune tag``: returns 1 when any image failed (after tagging all the others), else 0."""
    report = run_tagging(options)
    report.log_summary(logger, "tagged", "a tag file exists; --overwrite or --append_tags tags them again")
    return report.exit_code
