"""Token counts of captions as training tokenizes them, and where the 75/150/225-token cut-offs fall.

Counting is :func:`sdtune.models.text.tokenize`'s own call (``add_special_tokens=False, truncation=False``: the
caption's tokens without <BOS>/<EOS>); training keeps the first ``max_token_length`` of them.

A cut-off is placed in the caption's text by tokenizing its whitespace-separated words: CLIP's tokenizer cleans and
splits text into pieces that never span whitespace, so the tokens of a caption are the tokens of its words in turn.
That is checked for every caption (the words' counts must add up to the caption's); where it does not hold the
cut-off is found from the token counts of the caption's prefixes instead.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sdtune.models.text import ALLOWED_TOKEN_LENGTHS

logger = logging.getLogger(__name__)

_WORD = re.compile(r"\S+")
# Padding is not part of a count, so any pad token gives the same counts; SD 1.x's is used.
_PAD = "<|endoftext|>"


@dataclass(frozen=True)
class Cut:
    """Where ``limit`` tokens end in a caption: at character ``offset``; ``inside_word`` when the word starting
    there is split (its first tokens are kept, the rest cut)."""

    limit: int
    offset: int
    inside_word: bool


def load_review_tokenizer(model: str | None, tokenizer: str | None) -> tuple[Any | None, str]:
    """(tokenizer or None, a sentence saying which one) chosen as training chooses: ``--tokenizer``; else the
    model folder's own ``tokenizer/``; else (single files, folders without one) the CLIP vocabulary packaged with
    sdtune. A ``--tokenizer`` or model that cannot be read raises ``ModelLoadError`` naming it; None comes back
    only when no tokenizer can be built at all (transformers missing)."""
    from sdtune.models.tokenizer import load_tokenizer, packaged_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer, _PAD), f"the tokenizer in {tokenizer}"
    if model is not None:
        from sdtune.models.io import detect_source

        kind = detect_source(model)
        if kind == "diffusers" and (Path(model) / "tokenizer").is_dir():
            folder = Path(model) / "tokenizer"
            return load_tokenizer(folder, _PAD), f"the model's tokenizer ({folder})"
        if kind == "hub":
            folder = _hub_tokenizer(model)
            if folder is not None:
                return load_tokenizer(folder, _PAD), f"the tokenizer of {model}"
    try:
        return packaged_tokenizer(_PAD), "the CLIP vocabulary packaged with sdtune (the one training uses for " \
                                         "single-file models; SD 1.x and 2.x share it)"
    except ImportError as exc:
        logger.warning("token counts unavailable: no tokenizer could be loaded (%s)", exc)
        return None, f"token counts unavailable: no tokenizer could be loaded ({exc})"


def _hub_tokenizer(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=["tokenizer/*"])) / "tokenizer"
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        logger.warning("%s: its tokenizer is not in the Hugging Face cache and cannot be downloaded (%s); counting "
                       "with the packaged CLIP vocabulary, which SD 1.x and 2.x models use", repo_id, exc)
        return None
    return folder if folder.is_dir() else None


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [len(i) for i in ids]


def find_cuts(tokenizer: Any, captions: Sequence[str], totals: Sequence[int],
              limits: Sequence[int] = ALLOWED_TOKEN_LENGTHS) -> list[list[Cut]]:
    """For each caption, a ``Cut`` for every limit its token count exceeds."""
    out: list[list[Cut]] = [[] for _ in captions]
    todo = [i for i, total in enumerate(totals) if total > min(limits)]
    words = {i: [(m.start(), m.group()) for m in _WORD.finditer(captions[i])] for i in todo}
    flat = [w for i in todo for _start, w in words[i]]
    counts = iter(count_tokens(tokenizer, flat))
    for i in todo:
        starts = [s for s, _w in words[i]]
        cumulative, running = [], 0
        for _ in starts:
            running += next(counts)
            cumulative.append(running)
        if running != totals[i]:
            logger.debug("caption %d: its words' tokens (%d) differ from the caption's (%d); using prefixes",
                         i, running, totals[i])
            text = captions[i]
            ends = [s + len(w) for s, w in words[i]]
            memo: dict[int, int] = {}

            def upto(k: int, text: str = text, ends: list[int] = ends, memo: dict[int, int] = memo) -> int:
                if k not in memo:
                    memo[k] = count_tokens(tokenizer, [text[:ends[k]]])[0]
                return memo[k]

            out[i] = _cuts(upto, starts, totals[i], limits)
        else:
            out[i] = _cuts(cumulative.__getitem__, starts, totals[i], limits)
    return out


def _cuts(upto: Callable[[int], int], starts: list[int], total: int, limits: Sequence[int]) -> list[Cut]:
    """``upto(k)``: tokens in the caption up to the end of word ``k`` (non-decreasing in ``k``)."""
    cuts = []
    for limit in limits:
        if total <= limit or not starts:
            continue
        lo, hi = 0, len(starts) - 1  # the first word whose end passes the limit
        while lo < hi:
            mid = (lo + hi) // 2
            if upto(mid) > limit:
                hi = mid
            else:
                lo = mid + 1
        before = upto(lo - 1) if lo > 0 else 0
        cuts.append(Cut(limit, starts[lo], before < limit))
    return cuts
