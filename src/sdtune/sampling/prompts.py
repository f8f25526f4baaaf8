"""Prompts and prompt files: one prompt a line, ``#`` comments, sd-scripts' inline options.

A line ``a cat --n low quality --w 512 --h 512 --d 42 --l 7.5 --s 28`` sets, for that prompt only, the negative
prompt, width, height, seed, CFG scale and steps, as in sd-scripts' sample prompt files. ``sdtune generate
--from_file`` and ``sdtune train --sample_prompts`` read the same files. Imports no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sdtune.errors import SdtuneError

MAX_SEED = 2**63 - 1


class PromptFileError(SdtuneError):
    """A prompt file that cannot be read, or a line with a bad inline option."""


@dataclass(frozen=True)
class PromptSpec:
    """One prompt and the settings it overrides (None: the run's setting)."""

    prompt: str
    negative_prompt: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    seed: Optional[int] = None
    scale: Optional[float] = None
    steps: Optional[int] = None


# Inline options of a prompt-file line, as sd-scripts' sample prompts spell them.
_INLINE = {"n": "negative_prompt", "w": "width", "h": "height", "d": "seed", "l": "scale", "s": "steps"}
INLINE_HELP = "--n NEGATIVE PROMPT, --w WIDTH, --h HEIGHT, --d SEED, --l CFG SCALE, --s STEPS"
_INLINE_SPLIT = re.compile(r"(?:^|\s)--(?=\S)")


def check_size(width: int, height: int, where: str) -> None:
    """Raise :class:`SdtuneError` (naming ``where`` and a size that works) unless both sides are multiples of 8."""
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise SdtuneError(f"{where}: image size {width}x{height} must be multiples of 8 (the VAE works on 8x8 "
                          f"pixel blocks); use e.g. {max(8, round(width / 8) * 8)}x{max(8, round(height / 8) * 8)}")


def _inline_value(key: str, name: str, value: str, where: str) -> Any:
    """The value of inline option ``--key`` (``name`` in :class:`PromptSpec`), checked."""
    if name == "negative_prompt":
        return value
    try:
        number: float = float(value) if name == "scale" else int(value)
    except ValueError:
        raise PromptFileError(f"{where}: --{key} needs a {'number' if name == 'scale' else 'whole number'}, "
                              f"not {value!r}") from None
    if name == "steps" and number < 1:
        raise PromptFileError(f"{where}: --s (steps) must be at least 1, not {value}")
    if name == "seed" and not 0 <= number <= MAX_SEED:
        raise PromptFileError(f"{where}: --d (seed) must be between 0 and {MAX_SEED}, not {value}")
    return number


def parse_prompt_line(line: str, where: str = "prompt") -> PromptSpec:
    """``a cat --n low quality --w 512 --h 512 --d 42 --l 7.5 --s 28`` -> PromptSpec.

    ``where`` (e.g. ``prompts.txt:3``) names the line in errors. Raises :class:`PromptFileError`.
    """
    prompt, *parts = _INLINE_SPLIT.split(line.strip())
    values: dict[str, Any] = {}
    for part in parts:
        key, _, value = part.strip().partition(" ")
        key, value = key.lower(), value.strip()
        if key not in _INLINE:
            raise PromptFileError(f"{where}: unknown option --{key}; a prompt line may carry {INLINE_HELP}")
        values[_INLINE[key]] = _inline_value(key, _INLINE[key], value, where)
    if "width" in values or "height" in values:
        width, height = values.get("width", 8), values.get("height", 8)
        try:
            check_size(width, height, where)
        except SdtuneError as exc:
            raise PromptFileError(str(exc)) from None
    prompt = prompt.strip()
    if not prompt:
        raise PromptFileError(f"{where}: the line has options but no prompt before them")
    return PromptSpec(prompt, **values)


def read_prompt_file(path: str | Path) -> list[PromptSpec]:
    """The prompts of a text file, one a line; blank lines and lines starting with ``#`` are skipped. A line may
    carry inline options (see :func:`parse_prompt_line`)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise PromptFileError(f"{path}: prompt file does not exist") from None
    except OSError as exc:
        raise PromptFileError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    # line ends as sd-scripts' readlines() sees them (\n, \r\n, \r); str.splitlines would also cut a prompt at
    # U+2028, U+0085, form feed or vertical tab
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    specs = [parse_prompt_line(line, f"{path}:{number}") for number, line in enumerate(lines, 1)
             if line.strip() and not line.lstrip().startswith("#")]
    if not specs:
        raise PromptFileError(f"{path}: holds no prompts (only blank or # lines); write one prompt a line")
    return specs


__all__ = ["INLINE_HELP", "MAX_SEED", "PromptFileError", "PromptSpec", "check_size", "parse_prompt_line",
           "read_prompt_file"]
