"""Token counts of captions as training tokenizes them, and where the 75/150/225-token cut-offs fall.

Counting is :func:`sdtune.models.text.tokenize`'s own call (``add_special_tokens=False, truncation=False``: the
caption's tokens without <BOS>/<EOS>); training keeps the first ``max_token_length`` of them.

A cut-off is placed in the caption's text by tokenizing its whitespace-separated words: CLIP's tokenizer cleans and
splits text into pieces that never span whitespace, so the tokens of a caption are the tokens of its words in turn.
That is checked for every caption (the words' counts must add up to the caption's); where it does not hold the
cut-off is found from the token counts of the caption's prefixes instead.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from sdtune.models.choices import ALLOWED_TOKEN_LENGTHS

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
        from sdtune.models.files import detect_source

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
    """The token count of each text, without BOS/EOS and not cut off."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [len(i) for i in ids]


_GROUP = 8  # words tokenized together in the first pass (one tokenizer item per word costs more than its tokens)


def find_cuts(tokenizer: Any, captions: Sequence[str], totals: Sequence[int],
              limits: Sequence[int] = ALLOWED_TOKEN_LENGTHS) -> list[list[Cut]]:
    """For each caption, a ``Cut`` for every limit its token count exceeds.

    Two passes, each one batched tokenizer call: groups of ``_GROUP`` words (spans of the caption from a word's start
    to a later word's end, so their tokens are the words' tokens), then the single words of the groups a limit
    falls in. A caption whose groups or words do not add up to its own count is done from its prefixes instead.
    """
    out: list[list[Cut]] = [[] for _ in captions]
    todo = [i for i, total in enumerate(totals) if total > min(limits)]
    spans = {i: [(m.start(), m.end()) for m in _WORD.finditer(captions[i])] for i in todo}
    groups = {i: [spans[i][k:k + _GROUP] for k in range(0, len(spans[i]), _GROUP)] for i in todo}
    counts = iter(count_tokens(tokenizer, [captions[i][g[0][0]:g[-1][1]] for i in todo for g in groups[i]]))
    group_cum = {i: list(itertools.accumulate(next(counts) for _ in groups[i])) for i in todo}
    needed: dict[tuple[int, int], None] = {}
    for i in todo:
        if group_cum[i] and group_cum[i][-1] == totals[i]:
            for limit in limits:
                if totals[i] > limit:
                    needed[i, bisect.bisect_right(group_cum[i], limit)] = None
    counts = iter(count_tokens(tokenizer, [captions[i][s:e] for i, g in needed for s, e in groups[i][g]]))
    word_counts = {(i, g): [next(counts) for _ in groups[i][g]] for i, g in needed}
    for i in todo:
        cuts = _cuts_by_group(i, totals[i], limits, groups[i], group_cum[i], word_counts)
        if cuts is None:
            logger.debug("caption %d: its words' tokens differ from the caption's (%d); using prefixes", i, totals[i])
            cuts = _cuts_by_prefix(tokenizer, captions[i], spans[i], totals[i], limits)
        out[i] = cuts
    return out


def _cuts_by_group(i: int, total: int, limits: Sequence[int], groups: list[list[tuple[int, int]]],
                   group_cum: list[int], word_counts: dict[tuple[int, int], list[int]]) -> list[Cut] | None:
    if not group_cum or group_cum[-1] != total:
        return None
    cuts = []
    for limit in limits:
        if total <= limit:
            continue
        g = bisect.bisect_right(group_cum, limit)  # the first group whose end passes the limit
        base = group_cum[g - 1] if g else 0
        cum = list(itertools.accumulate(word_counts[i, g], initial=base))  # cum[j]: tokens before word j
        if cum[-1] != group_cum[g]:
            return None
        j = next(k for k in range(len(groups[g])) if cum[k + 1] > limit)
        cuts.append(Cut(limit, groups[g][j][0], cum[j] < limit))
    return cuts


def _cuts_by_prefix(tokenizer: Any, text: str, spans: list[tuple[int, int]], total: int,
                    limits: Sequence[int]) -> list[Cut]:
    memo: dict[int, int] = {}

    def upto(k: int) -> int:
        if k not in memo:
            memo[k] = count_tokens(tokenizer, [text[:spans[k][1]]])[0]
        return memo[k]

    return _cuts(upto, [s for s, _e in spans], total, limits)


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
