"""``--cache_text_encoder_outputs``: the text encoder's hidden states of every distinct caption, encoded once.

When the text encoder is frozen and a caption never changes between uses (no shuffle, no caption or tag dropout:
:func:`sdtune.train.options.validate_text_cache` refuses the option otherwise), encoding it again every step gives
the same states each time. The trainer then encodes each distinct caption once at start-up, in batches, moves the
text encoder off the device (samples bring it back for their call), and each step looks the states up.

With ``--cache_text_encoder_outputs_to_disk`` the states are also written next to each image's latent cache, as
``<image stem>_te_outputs.npz`` (sd-scripts' name for its text-encoder caches), and read back by the next run when
the file's key still matches. The key covers the caption, the text encoder's weights (a fingerprint; with a LoRA
also its text-encoder modules), the clip skip, the token length and the precision: change any of them and the
file is encoded again (counted in the log), never used stale.

Memory: one caption's states are ``tokens x width`` values (77 x 768 for SD 1.x, 77 x 1024 for SD 2.x; three
times that at 225 tokens), about 0.24 MB (SD 1.x, float32, 75 tokens) per distinct caption on the CPU. The text
encoder (123 M parameters in SD 1.x, 340 M in SD 2.x) leaves the device: 0.25 / 0.7 GB in fp16.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from sdtune.atomic import atomic_path

if TYPE_CHECKING:
    from sdtune.data.dataset import Example
    from sdtune.models.sd import StableDiffusion
    from sdtune.train.options import TrainOptions
    from sdtune.train.targets import TrainTarget

logger = logging.getLogger(__name__)

TE_OUTPUTS_SUFFIX = "_te_outputs.npz"


def te_outputs_path(image: Path) -> Path:
    """Where an image's text-encoder cache lives: ``<stem>_te_outputs.npz`` beside it (and its latent cache)."""
    return image.with_name(image.stem + TE_OUTPUTS_SUFFIX)


def text_cache_key(caption: str, encoder_print: str, clip_skip: int, max_token_length: int, dtype: str) -> str:
    """The validity key of one caption's cached states: what the states depend on, hashed."""
    text = "\x00".join(["sdtune-te-1", caption, encoder_print, str(clip_skip), str(max_token_length), dtype])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read(path: Path, key: str) -> Optional[torch.Tensor]:
    """The states stored at ``path`` if its key is ``key``; None when missing, stale or unreadable (re-encoded)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                return None
            return torch.from_numpy(np.array(data["hidden_states"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        logger.warning("%s: unreadable text-encoder cache (%s); encoding it again", path, exc)
        return None


def _write(path: Path, key: str, states: torch.Tensor) -> None:
    with atomic_path(path) as tmp:  # keeps the .npz suffix, so numpy does not append another
        np.savez(tmp, hidden_states=states.float().numpy(), key=np.array(key))


class TextEncoderCache:
    """Hidden states by caption; ``cache(captions)`` stacks a batch's (float32, on the CPU: the values the encoder
    gave, in its output precision)."""

    def __init__(self, states: dict[str, torch.Tensor]) -> None:
        self.states = states

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        return torch.stack([self.states[c] for c in captions])

    def __len__(self) -> int:
        return len(self.states)


def build_text_cache(items: Iterable[tuple[str, Optional[Path]]], encode: Callable[[list[str]], torch.Tensor],
                     key_of: Callable[[str], str], batch_size: int, write: bool) -> tuple[TextEncoderCache, dict]:
    """Encode every distinct caption of ``items`` (caption, image path or None) once, in batches of
    ``batch_size``; with an image path, read a valid ``_te_outputs.npz`` instead, and with ``write`` write those
    that were encoded. Returns the cache and counts (``captions``, ``encoded``, ``read``, ``written``)."""
    items = list(items)
    states: dict[str, torch.Tensor] = {}
    paths: dict[str, list[Path]] = {}
    for caption, image in items:
        if image is not None:
            paths.setdefault(caption, []).append(te_outputs_path(image))
    read, stale = 0, []  # stale: (caption, key, file) to write once the caption's states are known
    for caption, files in paths.items():
        key = key_of(caption)
        for path in files:
            if caption in states and not write:
                break  # found, and nothing will be written: the other files need not be read
            found = _read(path, key)
            if found is None:
                stale.append((caption, key, path))
            elif caption not in states:
                states[caption], read = found, read + 1
    todo = sorted({caption for caption, _ in items} - set(states))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        with torch.no_grad():
            out = encode(chunk).detach().cpu().float()  # as the file holds them: read or encoded, the same
        states.update(zip(chunk, out.unbind(0)))
    if write:
        for caption, key, path in stale:
            _write(path, key, states[caption])
    states = {c: s.clone() for c, s in states.items()}  # each its own storage: no view keeps a whole batch alive
    return TextEncoderCache(states), {"captions": len(states), "encoded": len(todo), "read": read,
                                      "written": len(stale) if write else 0}


def text_encoder_cache(opts: TrainOptions, examples: Iterable[Example], model: StableDiffusion, target: TrainTarget,
                       clip_skip: int, is_main: bool, encode: Callable[[list[str]], torch.Tensor]) -> TextEncoderCache:
    """The cache of a run: every caption of ``examples`` (training and validation images) through ``encode``
    (the trainer's conditioning, on the device, under its autocast), read from and (main process) written to disk
    with --cache_text_encoder_outputs_to_disk."""
    from sdtune.train.provenance import model_fingerprint

    modules: dict[str, torch.nn.Module] = {"text_encoder": model.text_encoder}
    for i, lora in enumerate(getattr(getattr(target, "network", None), "text_encoder_loras", ()) or ()):
        modules[f"lora{i}"] = lora  # a LoRA's text-encoder modules change the states too
    encoder_print = model_fingerprint(modules)
    dtype = f"{next(model.text_encoder.parameters()).dtype}/{opts.mixed_precision}"

    def key_of(caption: str) -> str:
        return text_cache_key(caption, encoder_print, clip_skip, opts.max_token_length, dtype)

    to_disk = opts.cache_text_encoder_outputs_to_disk
    items = [(ex.caption, ex.image if to_disk else None) for ex in examples]
    cache, counts = build_text_cache(items, encode, key_of, max(opts.train_batch_size, 8), write=to_disk and is_main)
    where = (f"; {counts['read']} read from and {counts['written']} written to *{TE_OUTPUTS_SUFFIX}" if to_disk
             else "")
    logger.info("text-encoder outputs cached: %d distinct caption(s), %d encoded%s; the text encoder leaves the "
                "device", counts["captions"], counts["encoded"], where)
    return cache


__all__ = ["TE_OUTPUTS_SUFFIX", "TextEncoderCache", "build_text_cache", "te_outputs_path", "text_cache_key",
           "text_encoder_cache"]
