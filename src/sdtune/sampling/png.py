"""PNG files that describe themselves, and the numbered names ``sdtune generate`` gives them.

Every PNG carries a ``parameters`` text chunk in AUTOMATIC1111's infotext format (readable by its "PNG Info" tab and
by image sites) and an ``sdtune`` chunk with the full settings as JSON (:func:`read_png_settings` reads it back).
LoRAs are written as A1111 writes them (prompt tags and ``Lora hashes``, see :func:`infotext`) and, in the JSON, as
``loras``: a list of ``{"name", "weight", "hash"}``.

**Names.** ``<outdir>/<number:05d>-<seed>.png``, numbered after the highest number already in the folder; a name is
claimed with an exclusive create before the image is written (atomically) over it, so no file is ever overwritten,
even by two runs writing into one folder. Imports no torch.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtune import __version__
from sdtune.atomic import atomic_path
from sdtune.errors import SdtuneError
from sdtune.sampling.samplers import get_sampler

if TYPE_CHECKING:
    from sdtune.sampling.loras import LoraUse
    from sdtune.sampling.pipeline import GeneratedImage, ImageSettings

METADATA_VERSION = 1


def a1111_quote(value: Any) -> str:
    """AUTOMATIC1111 quotes a value holding a comma, colon or newline as a JSON string (its ``quote()``)."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _a1111_number(value: float) -> str:
    """A weight as a user types it in an A1111 prompt tag: ``0.7``, ``1``, ``-0.25`` (all digits when needed)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def lora_prompt_tags(loras: Sequence[LoraUse]) -> str:
    """The ``<lora:name:weight>`` tags A1111 reads the LoRAs and their weights from (its prompt syntax), each after
    a space. A1111 removes the tags before encoding the prompt, so pasting the infotext there repeats the image."""
    return "".join(f" <lora:{lora.name}:{_a1111_number(lora.weight)}>" for lora in loras)


def lora_hashes_field(loras: Sequence[LoraUse]) -> str:
    """A1111's ``Lora hashes`` value, as its extensions-builtin/Lora/extra_networks_lora.py writes it: ``name:
    shorthash`` pairs joined by ``", "``, the name (the one in the prompt tag) without ``:`` and ``,``, one entry per
    name (a dict there: a later LoRA of the same name replaces the earlier one), shorthash the hash's first 12 hex
    digits. Image sites (civitai) find the LoRAs by these hashes."""
    hashes: dict[str, str] = {}
    for lora in loras:
        if lora.name and lora.shorthash:
            hashes[lora.name.translate(_REMOVE_SYMBOLS)] = lora.shorthash
    return ", ".join(f"{name}: {short}" for name, short in hashes.items())


_REMOVE_SYMBOLS = str.maketrans("", "", ":,")


def infotext(settings: ImageSettings) -> str:
    """The ``parameters`` chunk of ``settings`` in AUTOMATIC1111's infotext format. LoRAs appear as A1111 writes
    them: ``<lora:name:weight>`` tags in the prompt and a ``Lora hashes`` field after ``Clip skip`` (A1111's
    ``extra_generation_params`` come after its own fields)."""
    lines = [settings.prompt + lora_prompt_tags(settings.loras)]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    fields: dict[str, Any] = {
        "Steps": settings.steps, "Sampler": get_sampler(settings.sampler).a1111_name, "CFG scale": settings.scale,
        "Seed": settings.seed, "Size": f"{settings.width}x{settings.height}",
    }
    if settings.model:
        fields["Model"] = settings.model
    if settings.hypernetwork:  # the names A1111 wrote before it moved hypernetworks into the prompt
        fields["Hypernet"] = settings.hypernetwork
        fields["Hypernet strength"] = settings.hypernetwork_multiplier
    fields["Clip skip"] = settings.clip_skip
    if settings.loras:
        fields["Lora hashes"] = lora_hashes_field(settings.loras)  # quoted below: it holds commas and colons
    lines.append(", ".join(f"{key}: {a1111_quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def settings_json(settings: ImageSettings) -> dict[str, Any]:
    """The ``sdtune`` chunk of ``settings``: every field, with the metadata and sdtune versions."""
    return {"version": METADATA_VERSION, "sdtune_version": __version__, **asdict(settings)}


def model_display_name(source: str | Path) -> str:
    """The model's name for the infotext's ``Model:``: a file's stem, a folder's name."""
    path = Path(source)
    return path.stem if path.is_file() else path.name or str(source)


def png_info(settings: ImageSettings, extra: dict[str, Any] | None = None) -> PngInfo:
    """The ``parameters`` and ``sdtune`` text chunks of an image; ``extra`` adds keys to the JSON."""
    info = PngInfo()
    info.add_text("parameters", settings.parameters_text())  # PIL switches to iTXt for non-Latin-1 text
    info.add_text("sdtune", json.dumps({**settings.to_json(), **(extra or {})}, ensure_ascii=False))
    return info


def save_png(image: Image.Image, path: str | Path, settings: ImageSettings,
             extra: dict[str, Any] | None = None) -> Path:
    """Write ``image`` to ``path`` atomically, with the ``parameters`` and ``sdtune`` text chunks.

    ``extra`` adds keys to the ``sdtune`` JSON (training adds ``step`` and ``epoch``).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=png_info(settings, extra))
    return path


def read_png_settings(path: str | Path) -> dict[str, Any]:
    """The ``sdtune`` JSON of a PNG written by :func:`save_png`."""
    with Image.open(path) as image:
        text = getattr(image, "text", {}).get("sdtune")
    if text is None:
        raise SdtuneError(f"{path}: has no sdtune metadata (not written by sdtune generate)")
    return json.loads(text)


_NUMBERED = re.compile(r"^(\d+)-")


class NumberedWriter:
    """Saves images as ``<outdir>/<number:05d>-<seed>.png``, numbers continuing after the folder's highest."""

    def __init__(self, outdir: str | Path) -> None:
        self.outdir = Path(outdir)
        self.outdir.mkdir(parents=True, exist_ok=True)
        numbers = [int(m.group(1)) for p in self.outdir.iterdir() if (m := _NUMBERED.match(p.name))]
        self.next_number = max(numbers, default=-1) + 1

    def _claim(self, seed: int) -> Path:
        while True:
            path = self.outdir / f"{self.next_number:05d}-{seed}.png"
            self.next_number += 1
            try:
                with open(path, "xb"):  # exclusive create: fails if the name exists, on every OS
                    return path
            except FileExistsError:
                continue

    def save(self, generated: GeneratedImage) -> Path:
        """Write ``generated`` under the next free number; returns its path."""
        path = self._claim(generated.settings.seed)
        try:
            return save_png(generated.image, path, generated.settings)
        except BaseException:
            path.unlink(missing_ok=True)  # release the claimed (still empty) name
            raise


__all__ = ["METADATA_VERSION", "NumberedWriter", "a1111_quote", "infotext", "lora_hashes_field", "lora_prompt_tags",
           "model_display_name", "png_info", "read_png_settings", "save_png", "settings_json"]
