"""The metadata JSON: one file describing every training image (its caption, its tags, its bucket), the contract
between ``merge-captions`` / ``merge-tags`` / ``clean`` / ``prepare`` and ``train``. This docstring is the schema's
single source; docs/metadata.md is the user-facing copy.

On disk it is sd-scripts' layout, so that sd-scripts' ``FineTuningDataset`` (library/train_util.py) reads sdtune's
files and sdtune reads sd-scripts'::

    {
      "<image key>": {
        "caption": "a girl standing in a field",          # str, from merge-captions (.caption sidecars)
        "tags": "1girl, long hair, field",                  # str, from merge-tags (.txt sidecars), comma-separated
        "train_resolution": [512, 512],                     # [width, height] of the bucket, from prepare
        "image_size": [1024, 1024]                          # [width, height] of the image (sd-scripts' wd14 tagger
      }                                                     #  --output_path writes it; sdtune keeps it)
    }

or, for a file named ``*.jsonl``, sd-scripts' JSON Lines layout: one object a line, ``{"image_path": "<image key>",
"caption": ..., "tags": ..., "image_size": [w, h], "train_resolution": [w, h]}``.

Every per-image key is optional; no others are allowed (a typo such as ``"caption "`` raises instead of being
silently ignored at training time). An entry without ``train_resolution`` has not been prepared (or its image
failed in ``prepare``) and is not trained on.

Image keys: by default the file stem (``img_001`` for ``train/img_001.png``), as sd-scripts does; the image is
found in the training folder by that stem. With ``--full_path`` the key is the image's absolute path, so several
training folders can share one JSON (and two images with the same stem in different folders do not collide).
sd-scripts' tagger writes image paths as keys: read such files with ``--full_path``.

Versions and migrations: the flat layout is version 0, the schema of the entries above. Earlier sdtune versions
wrapped it, ``{"sdtune_metadata_version": 1, "images": {...}}``; such files are read (``MIGRATIONS[n]`` turns a
version-``n`` document into version ``n + 1``) and written back flat, since sd-scripts cannot read the wrapper. A
wrapper with a version above ``METADATA_VERSION`` comes from a newer sdtune and raises.

Sidecar files are read as UTF-8 (a byte-order mark is tolerated) and kept whole, stripped of surrounding whitespace,
as sd-scripts' finetune/merge_captions_to_metadata.py and merge_dd_tags_to_metadata.py do
(``read_text(encoding="utf-8").strip()``); line endings become ``\\n``. Files of several lines are named in the
closing summary.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdtune.atomic import write_json_atomic, write_text_atomic
from sdtune.data.images import list_image_files, other_images_message
from sdtune.errors import SdtuneError
from sdtune.option_groups import ImageFolder, ImageKeys
from sdtune.options import opt

logger = logging.getLogger(__name__)

METADATA_VERSION = 1
VERSION_KEY = "sdtune_metadata_version"

#: Per-image keys and a check for each value (a description of what is expected, and the test).
MAX_TRAIN_SIDE = 16384  # 16k-pixel buckets: 4x SDXL's largest; the latents of one such image take 1 GB
MAX_IMAGE_SIDE = 1 << 20
IMAGE_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "caption": ("a string", lambda v: isinstance(v, str)),
    "tags": ("a string", lambda v: isinstance(v, str)),
    # A bucket is what prepare wrote: multiples of 8 (the VAE's downscale; of --bucket_reso_steps normally), within
    # MAX_TRAIN_SIDE. Without the check [63, 64] was trained (cropped to a shape no bucket has) and [2**40, 64]
    # ended in an OverflowError traceback.
    "train_resolution": (f"[width, height], two multiples of 8 from 8 to {MAX_TRAIN_SIDE} (what sdtune prepare "
                         "writes: run it again)", lambda v: _is_size(v, MAX_TRAIN_SIDE, 8)),
    "image_size": (f"[width, height], two positive integers up to {MAX_IMAGE_SIDE}",
                   lambda v: _is_size(v, MAX_IMAGE_SIDE)),
}
JSONL_PATH_KEY = "image_path"  # sd-scripts' JSONL: the image key of each line


def _is_size(v: Any, largest: int, multiple: int = 1) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(
        isinstance(x, int) and not isinstance(x, bool) and 0 < x <= largest and x % multiple == 0 for x in v)

Images = dict[str, dict[str, Any]]


class MetadataError(SdtuneError):
    """A metadata JSON that cannot be read: malformed JSON, an unknown key, a value of the wrong type."""


# ------------------------------------------------------------------------------------------------ versions
def _from_flat(doc: dict[str, Any]) -> dict[str, Any]:
    """Version 0 (sd-scripts' flat ``{key: entry}``) -> version 1 (``{"sdtune_metadata_version": 1, "images"}``)."""
    return {VERSION_KEY: 1, "images": doc}


#: ``MIGRATIONS[n]`` takes a version-``n`` document to version ``n + 1``. Small, pure dict -> dict functions.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {0: _from_flat}


def document_version(doc: Mapping[str, Any]) -> int:
    """The schema version of a parsed metadata document (0 for sd-scripts' flat layout)."""
    if VERSION_KEY not in doc:
        return 0
    version = doc[VERSION_KEY]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{VERSION_KEY} must be a positive integer, not {version!r}")
    return version


def migrate(doc: dict[str, Any], source: str | Path = "<metadata>") -> dict[str, Any]:
    """Bring a parsed document to ``METADATA_VERSION`` by applying the migrations in turn."""
    try:
        version = document_version(doc)
    except ValueError as exc:
        raise MetadataError(f"{source}: {exc}") from None
    if version > METADATA_VERSION:
        raise MetadataError(f"{source}: metadata version {version} was written by a newer sdtune (this one reads up "
                            f"to version {METADATA_VERSION}); upgrade sdtune")
    while version < METADATA_VERSION:
        doc = MIGRATIONS[version](doc)
        version += 1
    return doc


def validate_images(images: Any, source: str | Path = "<metadata>") -> Images:
    """Check every entry's keys and value types; returns ``images`` itself."""
    if not isinstance(images, dict):
        raise MetadataError(f"{source}: 'images' must be an object mapping image keys to entries")
    for key, entry in images.items():
        if not isinstance(entry, dict):
            raise MetadataError(f"{source}: image {key!r}: expected an object with caption/tags/train_resolution, "
                                f"found {type(entry).__name__}")
        for name, value in entry.items():
            if name not in IMAGE_FIELDS:
                raise MetadataError(
                    f"{source}: image {key!r} has unknown key {name!r}; known keys are "
                    f"{', '.join(IMAGE_FIELDS)} (fix or remove it)")
            expected, check = IMAGE_FIELDS[name]
            if not check(value):
                raise MetadataError(f"{source}: image {key!r}: {name} must be {expected}, not {value!r}")
    return images


def parse_metadata(text: str, source: str | Path = "<metadata>") -> Images:
    """Parse, migrate and validate a metadata document; returns the image entries."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MetadataError(f"{source}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); fix the "
                            "file or delete it to start over") from None
    except RecursionError:
        raise MetadataError(f"{source}: JSON nested too deeply to be metadata (an object of images, each an object "
                            "of caption/tags/train_resolution); fix the file or delete it to start over") from None
    if not isinstance(doc, dict):
        raise MetadataError(f"{source}: expected a JSON object at the top level, found {type(doc).__name__}")
    doc = migrate(doc, source)
    unknown = sorted(set(doc) - {VERSION_KEY, "images"})
    if unknown:
        raise MetadataError(f"{source}: unknown top-level key(s) {', '.join(map(repr, unknown))}")
    return validate_images(doc.get("images", {}), source)


def parse_jsonl(text: str, source: str | Path = "<metadata>") -> Images:
    """sd-scripts' JSON Lines metadata: ``{"image_path": key, "caption": ..., ...}`` a line (blank lines skipped)."""
    images: Images = {}
    # Lines end at "\n" only, as sd-scripts reads them: str.splitlines also cuts at U+2028, U+2029, form feed,
    # vertical tab and others, which json.dumps(ensure_ascii=False) leaves raw inside a caption.
    for number, line in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"{source}: line {number} is not valid JSON ({exc.msg}); fix the line or delete "
                                "it") from None
        except RecursionError:
            raise MetadataError(f"{source}: line {number} is JSON nested too deeply to be an image's entry; fix the "
                                "line or delete it") from None
        if not isinstance(entry, dict) or not isinstance(entry.get(JSONL_PATH_KEY), str):
            raise MetadataError(f"{source}: line {number} must be an object with an {JSONL_PATH_KEY!r} string, as "
                                "sd-scripts writes it")
        key = entry.pop(JSONL_PATH_KEY)
        if key in images:
            raise MetadataError(f"{source}: line {number} repeats image {key!r}; keep one of the lines")
        images[key] = entry
    return validate_images(images, source)


def load_metadata(path: str | Path) -> Images:
    """Read a metadata file of any known version and layout (sd-scripts' JSON and JSONL included);
    returns ``{key: entry}``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MetadataError(f"{path}: metadata file does not exist") from None
    except UnicodeDecodeError as exc:
        raise MetadataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); is it a metadata JSON?") \
            from None
    except OSError as exc:
        raise MetadataError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".jsonl":
        return parse_jsonl(text, path)
    return parse_metadata(text, path)


def save_metadata(path: str | Path, images: Images) -> None:
    """Write ``images`` in sd-scripts' layout (flat JSON, or JSON Lines for ``*.jsonl``), atomically (a crash
    leaves the old file or none)."""
    path = Path(path)
    validate_images(images, path)
    if path.suffix.lower() == ".jsonl":
        write_text_atomic(path, "".join(json.dumps({JSONL_PATH_KEY: key, **entry}, ensure_ascii=False) + "\n"
                                        for key, entry in images.items()))
    else:
        write_json_atomic(path, images)


# ------------------------------------------------------------------------------------------------ image keys
def image_key(image: Path, full_path: bool) -> str:
    """The metadata key of ``image``: its stem, or with ``full_path`` its absolute path.

    ``os.path.abspath`` rather than ``Path.resolve``: it touches no file system (100,000 images) and leaves
    symbolic links as the user named them.
    """
    return os.path.abspath(image) if full_path else image.stem


class KeyIndex:
    """Finds the entry of an image in ``images``, accepting the key spellings older files use.

    sd-scripts' full-path keys are paths as the user typed them (often relative to where the script ran);
    they are matched by absolute path, so one JSON keeps working from another working folder.
    """

    def __init__(self, images: Images, full_path: bool) -> None:
        self.full_path = full_path
        self._by_abs: dict[str, str] = {}
        if full_path:
            for key in images:
                self._by_abs.setdefault(os.path.normcase(os.path.abspath(key)), key)

    def key_for(self, image: Path) -> str:
        """The metadata key of ``image``: :func:`image_key`, or with ``full_path`` the spelling of an existing entry for
        the same absolute path."""
        key = image_key(image, self.full_path)
        if self.full_path:
            return self._by_abs.get(os.path.normcase(key), key)
        return key


def duplicate_stems(images: Iterable[Path]) -> dict[str, list[Path]]:
    """Stems shared by more than one image (``a.png`` and ``a.jpg``): with stem keys they would share one entry."""
    seen: dict[str, list[Path]] = {}
    for path in images:
        seen.setdefault(path.stem, []).append(path)
    return {stem: paths for stem, paths in seen.items() if len(paths) > 1}


def check_unique_keys(images: list[Path], full_path: bool) -> None:
    """Raise when two images would get the same metadata key (and the same latent file ``<stem>.npz``)."""
    if full_path:
        by_folder: dict[Path, list[Path]] = {}
        for p in images:
            by_folder.setdefault(p.parent, []).append(p)
        clashes = {s: ps for group in by_folder.values() for s, ps in duplicate_stems(group).items()}
    else:
        clashes = duplicate_stems(images)
    if clashes:
        shown = "; ".join(", ".join(str(p) for p in ps) for ps in list(clashes.values())[:5])
        more = f" (and {len(clashes) - 5} more)" if len(clashes) > 5 else ""
        hint = "" if full_path else ", or use --full_path if they are in different folders"
        raise MetadataError(f"images share a file stem, so they would share one caption and one latent file: "
                            f"{shown}{more}; rename them{hint}")


# ------------------------------------------------------------------------------------------------ sidecars
class SidecarError(SdtuneError):
    """A caption or tag file that exists but cannot be read."""


def normalize_extension(extension: str, option: str = "--caption_extension",
                        error: type[SdtuneError] = SdtuneError) -> str:
    """``txt`` -> ``.txt``: a sidecar's extension as a plain suffix with its dot, the one rule of every command
    that reads or writes sidecars. Anything else (empty, a lone dot, a path) raises ``error`` naming ``option``."""
    ext = extension.strip()
    if not ext.startswith("."):
        ext = "." + ext
    if ext == "." or any(sep in ext for sep in ("/", "\\")):
        raise error(f"{option} {extension!r} is not a file extension; use something like .txt or .caption")
    return ext


def read_sidecar(path: Path) -> str:
    """The whole text of a caption/tag file, stripped, line endings as ``\n`` (sd-scripts' merge scripts keep the
    whole text too); '' for an empty file.

    UTF-8 with an optional byte-order mark (Windows Notepad writes one); anything else raises ``SidecarError``.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SidecarError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SidecarError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


@dataclass
class MergeSummary:
    """What a merge did. ``missing`` images have no sidecar; ``unreadable`` sidecars were skipped."""

    kind: str  # "caption" or "tags"
    merged: int = 0
    missing: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    empty: list[Path] = field(default_factory=list)
    multiline: list[Path] = field(default_factory=list)  # kept whole; named so a stray line is noticed
    other_images: list[Path] = field(default_factory=list)  # image files of extensions sdtune does not read
    folder: Path | None = None

    def log(self, log: logging.Logger = logger) -> None:
        """The closing summary: counts, then every problem file by name."""
        log.info("merged %d %s file(s)", self.merged, self.kind)
        if self.empty:
            log.warning("%d %s file(s) were empty (stored as ''): %s", len(self.empty), self.kind,
                        _listing(self.empty))
        if self.other_images:
            log.warning("%s", other_images_message(self.other_images, self.folder or "the folder"))
        if self.multiline:
            log.warning("%d %s file(s) have several lines, kept whole (as sd-scripts does): %s", len(self.multiline),
                        self.kind, _listing(self.multiline))
        if self.missing:
            log.warning("%d image(s) have no %s file: %s", len(self.missing), self.kind, _listing(self.missing))
        if self.unreadable:
            log.warning("%d %s file(s) could not be read and were skipped:\n%s", len(self.unreadable), self.kind,
                        "\n".join(f"  {reason}" for _path, reason in self.unreadable))


def _listing(paths: list[Path], limit: int = 20) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def merge_sidecars_into(
    images: Images, image_paths: Iterable[Path], field_name: str, extension: str, full_path: bool
) -> MergeSummary:
    """Read each image's sidecar (``<image stem><extension>``) into ``images[key][field_name]``, in place.

    Entries of images not in ``image_paths`` are left alone (other training folders may share the file).
    """
    extension = normalize_extension(extension)
    summary = MergeSummary(kind=field_name)
    index = KeyIndex(images, full_path)
    for image in image_paths:
        sidecar = image.with_name(image.stem + extension)
        if not sidecar.is_file():
            summary.missing.append(image)
            continue
        try:
            text = read_sidecar(sidecar)
        except SidecarError as exc:
            summary.unreadable.append((sidecar, str(exc)))
            continue
        if not text:
            summary.empty.append(sidecar)
        elif "\n" in text:
            summary.multiline.append(sidecar)
        images.setdefault(index.key_for(image), {})[field_name] = text
        logger.debug("%s: %s", image.name, text)  # shown with --debug
        summary.merged += 1
    return summary


# ------------------------------------------------------------------------------------------------ commands
@dataclass
class MergeOptions(ImageFolder, ImageKeys):
    """``merge-captions``: the caption file beside each image goes into the metadata."""

    out_json: Path = opt(help="metadata JSON to write", positional=True)
    in_json: Path | None = opt(None, "metadata JSON to read first (default: OUT_JSON when it exists)")
    caption_extension: str = opt(".caption", "extension of the caption files", aliases=("--caption_extention",))


@dataclass
class MergeTagsOptions(MergeOptions):
    """``merge-tags``: the same options; the files read are tag files, ``.txt`` by default."""

    caption_extension: str = opt(".txt", "extension of the tag files", aliases=("--caption_extention",))


def merge_folder(
    train_data_dir: Path, out_json: Path, field_name: str, extension: str, in_json: Path | None = None,
    full_path: bool = False, recursive: bool = False,
) -> MergeSummary:
    """The library function behind ``merge-captions`` / ``merge-tags``: read, merge, write atomically."""
    extension = normalize_extension(extension)  # before any reading: a bad option fails fast
    source = in_json if in_json is not None else (out_json if out_json.is_file() else None)
    images: Images = load_metadata(source) if source is not None else {}
    if source is not None:
        logger.info("read %d entries from %s", len(images), source)
    paths, others = list_image_files(train_data_dir, recursive)
    check_unique_keys(paths, full_path)
    logger.info("found %d images in %s", len(paths), train_data_dir)
    summary = merge_sidecars_into(images, paths, field_name, extension, full_path)
    summary.other_images, summary.folder = others, Path(train_data_dir)
    save_metadata(out_json, images)
    summary.log()
    logger.info("wrote %s (%d entries)", out_json, len(images))
    return summary


def merge_captions_command(options: MergeOptions) -> int:
    """``sdtune merge-captions``: returns 1 when any caption file could not be read (the others are merged), else 0."""
    summary = merge_folder(options.train_data_dir, options.out_json, "caption", options.caption_extension,
                           options.in_json, options.full_path, options.recursive)
    return failure_exit_code(len(summary.unreadable), "caption file(s) could not be read")


def merge_tags_command(options: MergeTagsOptions) -> int:
    """``sdtune merge-tags``: returns 1 when any tag file could not be read (the others are merged), else 0."""
    summary = merge_folder(options.train_data_dir, options.out_json, "tags", options.caption_extension,
                           options.in_json, options.full_path, options.recursive)
    return failure_exit_code(len(summary.unreadable), "tag file(s) could not be read")


def failure_exit_code(failed: int, what: str, log: logging.Logger = logger) -> int:
    """The one exit-code rule of every stage (merge, prepare, caption, tag): the stage processes everything it can
    and writes its output, then exits 1 when any input failed (each was named above), 0 otherwise. Inputs that
    are absent rather than broken (an image with no caption file, files of other extensions) are named but are
    not failures. Bad options or unreadable required files exit 2 before any work (sdtune.cli)."""
    if failed:
        log.error("%d %s (named above); the others were processed; exit status 1", failed, what)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ folder coverage
@dataclass
class Coverage:
    """How well a metadata file and an image folder match (prepare and train check it before any work).

    Metadata written for another folder, or a folder holding only part of a dataset, otherwise goes unnoticed:
    prepare adds entries with only ``train_resolution`` and training runs on empty captions.
    """

    images: int  # images in the folder
    entries: int  # entries in the metadata
    without_entry: list[str]  # keys of images in the folder with no entry
    unlabelled: list[str]  # keys of images in the folder whose entry (if any) has neither caption nor tags
    not_found: list[str]  # keys of entries with no image in the folder

    @classmethod
    def of(cls, images: Images, folder_keys: Iterable[str]) -> "Coverage":
        """How ``images`` and a folder whose images have the keys ``folder_keys`` match (a repeated key counts once)."""
        keys = list(dict.fromkeys(folder_keys))
        present = set(keys)
        return cls(
            images=len(keys), entries=len(images),
            without_entry=[k for k in keys if k not in images],
            unlabelled=[k for k in keys if not (images.get(k, {}).get("caption") or images.get(k, {}).get("tags"))],
            not_found=sorted(k for k in images if k not in present),
        )

    @property
    def mostly_without_entry(self) -> bool:
        """More than half the folder's images have no entry: the metadata is likely another folder's."""
        return self.images > 0 and len(self.without_entry) * 2 > self.images

    def warnings(self, in_json: str | Path, folder: str | Path) -> list[str]:
        """What to tell the user: most images unlabelled or without an entry, entries whose image is missing."""
        out = []
        if self.mostly_without_entry:
            out.append(f"{len(self.without_entry)} of {self.images} images in {folder} have no entry in {in_json} "
                       f"(e.g. {_examples(self.without_entry)}): is it the metadata of another folder? Write this "
                       f"folder's with sdtune merge-captions / merge-tags {folder} <json>")
        elif self.images and len(self.unlabelled) * 2 > self.images:
            out.append(f"{len(self.unlabelled)} of {self.images} images in {folder} have neither caption nor tags "
                       f"in {in_json} (e.g. {_examples(self.unlabelled)}): they train with an empty prompt. Merge "
                       "their captions or tags first (sdtune merge-captions / merge-tags)")
        if self.not_found:
            found = self.entries - len(self.not_found)
            out.append(f"{found} of {self.entries} images found: {len(self.not_found)} entries of {in_json} have no "
                       f"image in {folder} (e.g. {_examples(self.not_found)}); check the folder (and --full_path, "
                       "--recursive)")
        return out


def _examples(keys: list[str], limit: int = 3) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
