"""The CLIP tokenizer, from a model folder, a user-given folder, or the vocabulary packaged with sdtune."""

from __future__ import annotations

import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from sdtune.errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

_VOCAB_ASSET = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 48,894 merges of the file (49,152 - 256 byte symbols - 2 special tokens), as open_clip does.
_NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the first 256 tokens of the vocabulary)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def packaged_vocabulary() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocab (49,408 tokens) and merges, rebuilt from the packaged BPE file."""
    raw = resources.files("sdtune.assets").joinpath(_VOCAB_ASSET).read_bytes()
    merges = gzip.decompress(raw).decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def packaged_tokenizer(pad_token: str) -> CLIPTokenizer:
    """A CLIP tokenizer built offline from sdtune's packaged vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = packaged_vocabulary()
    with tempfile.TemporaryDirectory(prefix="sdtune-clip-") as tmp:
        vocab_file = Path(tmp, "vocab.json")
        merges_file = Path(tmp, "merges.txt")
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    return tokenizer


def load_tokenizer(folder: str | Path | None, pad_token: str) -> CLIPTokenizer:
    """The tokenizer saved in ``folder`` (a tokenizer folder or a diffusers model folder), else the packaged one.

    ``pad_token`` is enforced: SD2 checkpoints must pad with "!" whatever a third-party folder says.
    """
    if folder is None:
        return packaged_tokenizer(pad_token)
    folder = Path(folder)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise ModelLoadError(f"tokenizer folder {folder} does not exist; pass a folder holding a CLIP tokenizer "
                             "(vocab.json + merges.txt or tokenizer.json), or leave --tokenizer unset")
    from transformers import CLIPTokenizer

    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read a CLIP tokenizer from {folder}: {exc}") from exc
    if tokenizer.pad_token != pad_token:
        tokenizer.pad_token = pad_token
    return tokenizer
