"""``sdtune clean``: tidy the captions and tags of a metadata JSON by editable rules.

The rules are data (``clean_rules.toml`` next to this module; ``--rules FILE`` replaces it). The defaults follow
kohya-ss/sd-scripts finetune/clean_captions_and_tags.py:

* tags: underscores to spaces (emoticons such as ``^_^`` kept); rating tags removed; when the tags say several
  people are in the picture (``2girls``, ``multiple boys``), person-specific tags that conflict (two hair colours,
  two eye colours...) are all removed; a one-word tag is dropped when a longer tag ends with it (``shirt`` next to
  ``white shirt``).
* captions: BLIP's variants (``anime girl``, ``woman``, ``lady``, ``people``...) unified to ``girl``/``girls``.

Differences from the seed, on purpose: replacements match whole words (the seed turns "ladybug" into "girlbug"),
and tag rules match whole tags rather than substrings of the tag line.
"""

from __future__ import annotations

import logging
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from sdtune.data.metadata import Images, load_metadata, save_metadata
from sdtune.errors import SdtuneError
from sdtune.options import opt

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

RULES_VERSION = 1
# The word characters of a caption: a hyphenated word ("close-up") is one word.
_WORD_CHAR = r"[\w\-]"


class RulesError(SdtuneError):
    """A cleaning rules file that cannot be used."""


@dataclass(frozen=True)
class TagGroup:
    """One ``[[tags.multiple_people.groups]]`` rule: tags that conflict when several people are in the picture."""

    name: str
    match: re.Pattern[str]
    exclude: re.Pattern[str] | None = None

    def matches(self, tag: str) -> bool:
        """Whether the whole of ``tag`` matches ``match`` and not ``exclude``."""
        return bool(self.match.fullmatch(tag)) and not (self.exclude is not None and self.exclude.fullmatch(tag))


@dataclass(frozen=True)
class Replacement:
    """One ``caption.replace`` pair: whole-word ``source`` becomes ``target`` (an empty ``target`` deletes it)."""

    source: str
    target: str
    pattern: re.Pattern[str]  # group "plural": the source's words followed by an "s" ("females")

    def apply(self, caption: str) -> str:
        """One pass over ``caption`` (``clean_caption`` repeats it until nothing changes)."""
        return self.pattern.sub(self._replace, caption)

    def _replace(self, m: re.Match[str]) -> str:
        # The seed's substring replacement turns "females" into "girls" ("female" -> "girl", the "s" stays); whole
        # words keep that: a plural of the source becomes the plural of the target.
        if m.group("plural") and not self.target.endswith("s"):
            return self.target + "s"
        return self.target


@dataclass(frozen=True)
class CleanRules:
    """A parsed rules file (``parse_rules``): what ``clean_tag_list`` and ``clean_caption`` apply."""

    underscores_to_spaces: bool = False
    keep_underscores: tuple[str, ...] = ()
    remove: frozenset[str] = frozenset()
    multi_markers: tuple[re.Pattern[str], ...] = ()
    multi_groups: tuple[TagGroup, ...] = ()
    redundant_one_word: bool = False
    redundant_also: frozenset[str] = frozenset()
    caption_replace: tuple[Replacement, ...] = ()


# ------------------------------------------------------------------------------------------------ rules file
_SCHEMA: dict[str, set[str]] = {
    "": {"version", "tags", "caption"},
    "tags": {"underscores_to_spaces", "keep_underscores", "remove", "multiple_people", "redundant"},
    "tags.multiple_people": {"markers", "groups"},
    "tags.multiple_people.groups": {"name", "match", "exclude"},
    "tags.redundant": {"one_word_tags", "also"},
    "caption": {"replace"},
}


def _check_keys(table: Any, where: str, source: str | Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise RulesError(f"{source}: [{where}] must be a table")
    unknown = sorted(set(table) - _SCHEMA[where])
    if unknown:
        raise RulesError(f"{source}: unknown key(s) {', '.join(unknown)} in [{where or 'top level'}]; known keys: "
                         f"{', '.join(sorted(_SCHEMA[where]))}")
    return table


def _strings(value: Any, where: str, source: str | Path) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RulesError(f"{source}: {where} must be a list of strings")
    return value


def _compile(pattern: Any, where: str, source: str | Path) -> re.Pattern[str]:
    if not isinstance(pattern, str):
        raise RulesError(f"{source}: {where} must be a string (a regular expression)")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise RulesError(f"{source}: {where}: invalid regular expression {pattern!r}: {exc}") from None


def _word_pattern(words: str, delete: bool) -> re.Pattern[str]:
    """Whole-word match of ``words`` (any run of spaces between them), or of their plural with an "s" (group
    ``plural``; not for deletions); a deletion also eats one following space."""
    body = r"\s+".join(re.escape(w) for w in words.split())
    plural = "(?P<plural>(?!))?" if delete else "(?P<plural>s)?"
    return re.compile(rf"(?<!{_WORD_CHAR}){body}{plural}(?!{_WORD_CHAR})" + (r" ?" if delete else ""))


def _tag_groups(raw_groups: Any, source: str | Path) -> list[TagGroup]:
    """The ``[[tags.multiple_people.groups]]`` tables of a rules file, checked and compiled."""
    groups = []
    if not isinstance(raw_groups, list):
        raise RulesError(f"{source}: tags.multiple_people.groups must be an array of tables ([[...]])")
    for i, raw in enumerate(raw_groups):
        raw = _check_keys(raw, "tags.multiple_people.groups", source)
        name = str(raw.get("name", f"group {i + 1}"))
        if "match" not in raw:
            raise RulesError(f"{source}: tags.multiple_people.groups '{name}' has no 'match' pattern")
        where = f"tags.multiple_people.groups '{name}'"
        groups.append(TagGroup(name, _compile(raw["match"], f"{where}.match", source),
                               _compile(raw["exclude"], f"{where}.exclude", source) if "exclude" in raw else None))
    return groups


def _replacements(raw_replace: Any, source: str | Path) -> list[Replacement]:
    """The ``caption.replace`` pairs of a rules file, checked and compiled."""
    replacements = []
    if not isinstance(raw_replace, list):
        raise RulesError(f"{source}: caption.replace must be a list of [from, to] pairs")
    for pair in raw_replace:
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(s, str) for s in pair)) \
                or not pair[0].strip():
            raise RulesError(f"{source}: caption.replace entry {pair!r} must be a pair of strings [from, to] with a "
                             "non-empty 'from'")
        pattern = _word_pattern(pair[0], delete=not pair[1])
        if pattern.search(pair[1]):
            # Repeating until nothing changes would never stop.
            raise RulesError(f"{source}: caption.replace {pair!r}: the replacement contains the words it replaces")
        replacements.append(Replacement(pair[0], pair[1], pattern))
    return replacements


def parse_rules(text: str, source: str | Path = "<rules>") -> CleanRules:
    """Read a rules TOML document; every problem raises ``RulesError`` naming ``source`` and the key."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"{source}: not valid TOML: {exc}") from None
    _check_keys(doc, "", source)
    version = doc.get("version", RULES_VERSION)
    if version != RULES_VERSION:
        raise RulesError(f"{source}: rules version {version!r} is not supported (this sdtune reads version "
                         f"{RULES_VERSION})")
    tags = _check_keys(doc.get("tags", {}), "tags", source)
    multi = _check_keys(tags.get("multiple_people", {}), "tags.multiple_people", source)
    redundant = _check_keys(tags.get("redundant", {}), "tags.redundant", source)
    caption = _check_keys(doc.get("caption", {}), "caption", source)

    groups = _tag_groups(multi.get("groups", []), source)

    one_word = redundant.get("one_word_tags", False)
    underscores = tags.get("underscores_to_spaces", False)
    for name, value in (("tags.redundant.one_word_tags", one_word), ("tags.underscores_to_spaces", underscores)):
        if not isinstance(value, bool):
            raise RulesError(f"{source}: {name} must be true or false")

    replacements = _replacements(caption.get("replace", []), source)

    keep = tuple(_strings(tags.get("keep_underscores", []), "tags.keep_underscores", source))
    return CleanRules(
        underscores_to_spaces=underscores,
        keep_underscores=keep,
        remove=frozenset(_strings(tags.get("remove", []), "tags.remove", source)),
        multi_markers=tuple(_compile(p, "tags.multiple_people.markers", source)
                            for p in _strings(multi.get("markers", []), "tags.multiple_people.markers", source)),
        multi_groups=tuple(groups),
        redundant_one_word=one_word,
        redundant_also=frozenset(_strings(redundant.get("also", []), "tags.redundant.also", source)),
        caption_replace=tuple(replacements),
    )


def default_rules_text() -> str:
    """The packaged ``clean_rules.toml``: the default rules, and the template for ``--rules``."""
    return resources.files("sdtune.data").joinpath("clean_rules.toml").read_text(encoding="utf-8")


def load_rules(path: str | Path | None = None) -> CleanRules:
    """The rules in ``path``, or the packaged defaults when ``path`` is None."""
    if path is None:
        return parse_rules(default_rules_text(), "sdtune/data/clean_rules.toml")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise RulesError(f"{path}: rules file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    return parse_rules(text, path)


# ------------------------------------------------------------------------------------------------ cleaning
def split_tags(tags: str) -> list[str]:
    """The tags of a comma-separated tag line, stripped, empty ones dropped."""
    return [t.strip() for t in tags.split(",") if t.strip()]


def _underscores_to_spaces(tag: str, rules: CleanRules) -> str:
    """Only a tag that is wholly an emoticon keeps its underscores: "o_o" inside "hand_to_own_mouth" is not one."""
    return tag if tag in rules.keep_underscores else tag.replace("_", " ")


def clean_tag_list(tags: list[str], rules: CleanRules) -> list[str]:
    """Apply the tag rules to a list of tags, in the seed's order: underscores, removals, several people,
    redundant tags."""
    if rules.underscores_to_spaces:
        tags = [_underscores_to_spaces(t, rules) for t in tags]
    tags = [t for t in tags if t not in rules.remove]

    if any(m.fullmatch(t) for m in rules.multi_markers for t in tags):
        for group in rules.multi_groups:
            if sum(1 for t in tags if group.matches(t)) > 1:
                tags = [t for t in tags if not group.matches(t)]

    # Every "word" that some tag ends with after a space: "white shirt" -> "shirt", "red hair ornament" ->
    # "hair ornament" and "ornament".
    suffixes = set()
    for t in tags:
        i = t.find(" ")
        while i >= 0:
            suffixes.add(t[i + 1:])
            i = t.find(" ", i + 1)

    def redundant(tag: str) -> bool:
        if tag not in suffixes:
            return False
        return tag in rules.redundant_also or (rules.redundant_one_word and " " not in tag)

    return [t for t in tags if not redundant(t)]


def clean_tags(tags: str, rules: CleanRules) -> str:
    """Clean a comma-separated tag line; the result is joined with ", "."""
    return ", ".join(clean_tag_list(split_tags(tags), rules))


def clean_caption(caption: str, rules: CleanRules) -> str:
    """Apply the caption replacements in order, each until the caption stops changing."""
    for rep in rules.caption_replace:
        # Each pass shortens the caption or leaves it unchanged for rules that shrink text; the bound guards
        # a user's rule that keeps rewriting without ever settling.
        for _ in range(len(caption) + 2):
            new = rep.apply(caption)
            if new == caption:
                break
            caption = new
        else:
            raise RulesError(f"caption rule [{rep.source!r}, {rep.target!r}] does not settle on {caption!r}")
    return caption.strip()


@dataclass
class CleanSummary:
    """What ``clean_images`` changed, and the entries without a caption or tags."""

    images: int = 0
    captions_changed: int = 0
    tags_changed: int = 0
    without_caption: list[str] = field(default_factory=list)
    without_tags: list[str] = field(default_factory=list)

    def log(self, log: logging.Logger = logger) -> None:
        """Log the counts, then (as information, not warnings) the entries that lack a caption or tags."""
        log.info("cleaned %d image entries: %d captions and %d tag lines changed", self.images,
                 self.captions_changed, self.tags_changed)
        # Informational: a dataset may have captions only or tags only, so these are not warnings.
        for what, keys in (("caption", self.without_caption), ("tags", self.without_tags)):
            if keys:
                shown = ", ".join(keys[:10]) + (f" (and {len(keys) - 10} more)" if len(keys) > 10 else "")
                log.info("%d entries have no %s: %s", len(keys), what, shown)


def clean_images(images: Images, rules: CleanRules) -> tuple[Images, CleanSummary]:
    """A cleaned copy of ``images`` (entries' other keys kept) and what changed."""
    summary = CleanSummary(images=len(images))
    out: Images = {}
    for key, entry in images.items():
        entry = dict(entry)
        if "tags" in entry:
            cleaned = clean_tags(entry["tags"], rules)
            summary.tags_changed += cleaned != entry["tags"]
            entry["tags"] = cleaned
        else:
            summary.without_tags.append(key)
        if "caption" in entry:
            cleaned = clean_caption(entry["caption"], rules)
            summary.captions_changed += cleaned != entry["caption"]
            entry["caption"] = cleaned
        else:
            summary.without_caption.append(key)
        out[key] = entry
    return out, summary


@dataclass
class CleanOptions:
    """``clean``: IN_JSON's captions and tags, cleaned by the rules, go to OUT_JSON."""

    in_json: Path = opt(help="metadata JSON to read", positional=True)
    out_json: Path = opt(help="metadata JSON to write (may be IN_JSON itself)", positional=True)
    rules: Path | None = opt(None, "TOML file of cleaning rules replacing the packaged ones (sdtune/data/"
                                   "clean_rules.toml is the template)")


def clean_command(options: CleanOptions) -> int:
    """``sdtune clean``: load the rules first, then clean IN_JSON and write OUT_JSON; returns 0."""
    rules = load_rules(options.rules)  # before reading the data: a bad rules file fails fast
    images = load_metadata(options.in_json)
    cleaned, summary = clean_images(images, rules)
    save_metadata(options.out_json, cleaned)
    summary.log()
    logger.info("wrote %s", options.out_json)
    return 0
