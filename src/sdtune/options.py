"""Declare each command's options once, as a dataclass, and derive argparse and TOML handling from it.

A field's metadata carries what argparse needs (help, choices, aliases, positional).  Option names keep
sd-scripts' spellings (``--train_batch_size``); the hyphenated spelling (``--train-batch-size``) is accepted too.
``--config_file x.toml`` supplies any option; the command line overrides it. A ``[COMMAND]`` section applies to
that command only. Help shows each default once (or the help text's own wording of it) and marks required options.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

T = TypeVar("T")
_MISSING = dataclasses.MISSING


class OptionsError(ValueError):
    """Bad options: an unknown key in a config file, a missing required value, an invalid combination."""


def opt(
    default: Any = _MISSING,
    help: str = "",
    *,
    choices: Sequence[Any] | None = None,
    aliases: Sequence[str] = (),
    positional: bool = False,
    metavar: str | None = None,
    default_factory: Any = _MISSING,
    ignore_case: bool = False,
) -> Any:
    """A dataclass field carrying its command-line description.

    ``positional=True`` makes it a positional argument (required unless a config file supplies it).
    ``aliases`` are extra option names, e.g. ``("--ckpt",)``. ``ignore_case``: a choice in any letter case is
    taken as its listed spelling (sd-scripts lower-cases ``--optimizer_type``, so ``adamw8bit`` works there).
    """
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "positional": positional, "metavar": metavar,
            "ignore_case": ignore_case}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _listed_spelling(meta: Mapping[str, Any], value: Any) -> Any:
    """``value`` as its choice is listed, with ``ignore_case``; otherwise (or when it is no choice) as it is."""
    if not (meta.get("ignore_case") and meta.get("choices") and isinstance(value, str)):
        return value
    return next((c for c in meta["choices"] if str(c).lower() == value.lower()), value)


def _converted_then_listed(convert: Any, meta: Mapping[str, Any], text: str) -> Any:
    """argparse's ``type`` of an ``ignore_case`` option: converted, then as its choice is listed."""
    return _listed_spelling(meta, convert(text))


def _resolved_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _scalar_converter(tp: Any):
    if tp is Path:
        return Path
    if tp in (int, float, str):
        return tp
    raise TypeError(f"unsupported option type {tp!r}")


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def option_names(name: str, aliases: Sequence[str] = ()) -> list[str]:
    """The command-line spellings of option ``name`` and its aliases: each ``--a_b`` also as ``--a-b``, no repeats."""
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    for alias in aliases:
        names.append(alias)
        bare = alias.lstrip("-")
        if "_" in bare:
            names.append("--" + bare.replace("_", "-"))
    return list(dict.fromkeys(names))


def is_required(f: dataclasses.Field, hints: dict[str, Any]) -> bool:
    """A non-positional option is required when its type is not Optional yet its default is None
    (``in_json: str = opt(None, ...)``): no sensible default exists and the command cannot run without it."""
    if f.metadata.get("positional"):
        return False
    _tp, optional = _unwrap_optional(hints[f.name])
    return f.default is None and not optional


def _default_note(default: Any, help_text: str) -> str:
    """The ``(default: X)`` note, or nothing when it would say nothing or repeat the help.

    A help text that already states its default ("(default: detected)", "(the default)") keeps its own wording;
    None, False, an empty string and an empty list mean "not set" / "off", which the help says in words.
    """
    if "default" in help_text.lower():
        return ""
    if default is None or default is False or default == "" or default == [] or default == ():
        return ""
    if default is True:
        return " (default: on; --OPTION false turns it off)"
    if isinstance(default, str) and default != default.strip():
        return f" (default: {default!r})"
    if isinstance(default, (list, tuple)):
        return f" (default: {' '.join(str(v) for v in default)})"
    return f" (default: {default})"


class _Parser(argparse.ArgumentParser):
    """argparse with short errors: one line naming the problem (and the nearest option for a misspelling) plus
    where the full list is, instead of argparse's usage block (58 lines for train)."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n({self.prog} --help lists every option)\n")

    def option_strings(self) -> list[str]:
        return [s for action in self._actions for s in action.option_strings]


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


class _FromConfig:
    """A value a config file gave, kept raw until parsing shows the command line did not override it: only then is
    it converted, so a wrong type in the file fires only when the file's value is the one used."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __repr__(self) -> str:  # argparse may show a default in messages
        return repr(self.value)


def build_parser(cls: type, prog: str, description: str = "",
                 config_positionals: typing.Collection[str] = ()) -> argparse.ArgumentParser:
    """An argparse parser whose options are ``cls``'s fields (plus ``--config_file``).

    Positionals are required (shown without brackets) unless the field has a default or the config file supplies
    them (``config_positionals``). Abbreviated option names are not accepted: a prefix silently matching another
    option (or being "ambiguous") hides misspellings.
    """
    parser = _Parser(prog=prog, description=description, allow_abbrev=False)
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        tp, _optional = _unwrap_optional(hints[f.name])
        default = _field_default(f)
        text = meta.get("help") or ""
        if is_required(f, hints):
            text += " (required)"
        elif not meta.get("positional"):
            text += _default_note(default, text).replace("--OPTION", f"--{f.name}")
        # argparse expands %-formats in help; a literal "75 %" must not be read as one
        kwargs: dict[str, Any] = {"help": (text or " ").replace("%", "%%")}
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        origin = typing.get_origin(tp)
        if meta.get("positional"):
            kwargs["type"] = _scalar_converter(tp)
            kwargs.setdefault("metavar", f.name.upper())
            if f.default is not _MISSING or f.name in config_positionals:
                kwargs["nargs"] = "?"
            kwargs["default"] = None
            parser.add_argument(f.name, **kwargs)
            continue
        names = option_names(f.name, meta.get("aliases", ()))
        if tp is bool:
            # --flag sets True; --flag false / --flag no is accepted too (useful to undo a config file).
            kwargs.update(nargs="?", const=True, default=default, type=_parse_bool, metavar="BOOL")
        elif origin in (list, tuple):
            (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
            kwargs.update(nargs="*", type=_scalar_converter(item), default=default)
        else:
            convert = _scalar_converter(tp)
            if meta.get("ignore_case"):
                convert = functools.partial(_converted_then_listed, convert, meta)
            kwargs.update(type=convert, default=default)
        parser.add_argument(*names, dest=f.name, **kwargs)
    parser.add_argument(
        "--debug", action="store_true",
        help="log sdtune's debug messages too, e.g. each file's caption or tags as it is written (sd-scripts' "
        "--debug of its finetune scripts)",
    )
    parser.add_argument(
        "--config_file", "--config-file", dest="config_file", type=Path, default=None,
        help="TOML file supplying any of these options (keys are the option names). A section named after the "
        "command ([train], [prepare], ...) applies to that command only and sections named after other commands "
        "are skipped, so one file can serve every stage; other sections (sd-scripts' [model_arguments], ...) only "
        "group keys. Options given on the command line win",
    )
    return parser


def _flatten_toml(data: dict[str, Any], skip: typing.Collection[str] = ()) -> dict[str, Any]:
    """sd-scripts' config files group options in sections; those sections carry no meaning. Sections named in
    ``skip`` (other commands' sections) are left out."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if _section_key(key) not in skip:
                flat.update(_flatten_toml(value, skip))
        else:
            flat[key.replace("-", "_")] = value
    return flat


def _section_key(name: str) -> str:
    return name.replace("_", "-").lower()


def suggestion(word: str, candidates: typing.Iterable[str]) -> str:
    """ "; did you mean X?" for the closest candidate, or "" when none is close."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def read_config_file(path: Path, cls: type, command: str | None = None,
                     commands: typing.Collection[str] = ()) -> dict[str, Any]:
    """The options ``path`` gives ``command``: top-level keys and grouping sections, then (overriding them) the
    section named after ``command``; sections named after the other ``commands`` are skipped."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionsError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptionsError(f"config file {path} is not valid TOML: {exc}") from None
    sections = {_section_key(c) for c in commands} | ({_section_key(command)} if command else set())
    values = _flatten_toml(data, skip=sections)
    for key, value in data.items():
        if command and isinstance(value, dict) and _section_key(key) == _section_key(command):
            values.update(_flatten_toml(value, skip=sections))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"sdtune {command}" if command else "this command"
        details = "; ".join(f"{key}{suggestion(key, known)}" for key in unknown)
        raise OptionsError(f"config file {path}: unknown option(s) for {where}: {details} (put options of another "
                           "command in a section named after it, e.g. [prepare])")
    return values


def _coerce(value: Any, tp: Any, name: str, source: str = "") -> Any:
    """``value`` (from a TOML file) as type ``tp``; a mismatch names the option and ``source``."""
    tp, optional = _unwrap_optional(tp)
    if value is None:
        return None
    where = f"{source}: " if source else ""

    def wrong() -> OptionsError:
        kind = getattr(tp, "__name__", str(tp))
        return OptionsError(f"{where}option {name} = {value!r}: expected {'true/false' if tp is bool else kind}")

    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise wrong()
        return [_coerce(v, item, name, source) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return _parse_bool(value)
            except argparse.ArgumentTypeError:
                raise wrong() from None
        raise wrong()
    if tp is not str and (isinstance(value, (dict, list, bool))):
        raise wrong()  # str() of a TOML list reads fine (hypernetwork_layer_structure = [1, 2, 1]); int([1]) cannot
    if tp is Path:
        return Path(value)
    if tp is int and isinstance(value, float) and not value.is_integer():
        raise wrong()
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise wrong() from None


_BOOL_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")


def _bind_bool_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """``--flag`` followed by anything but a true/false word becomes ``--flag=true``, so that the flag does not
    swallow the next argument: ``sdtune tag --recursive images/`` means the folder, as in sd-scripts."""
    flags = {name for action in parser._actions if action.type is _parse_bool for name in action.option_strings}
    out: list[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            out.extend(argv[i:])
            break
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token in flags and (following is None or following.strip().lower() not in _BOOL_WORDS):
            token += "=true"
        out.append(token)
    return out


def _config_path(argv: Sequence[str]) -> Path | None:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config_file", "--config-file", dest="config_file", type=Path, default=None)
    known, _rest = pre.parse_known_args(argv)
    return known.config_file


def _unknown_arguments(parser: _Parser, extras: Sequence[str]) -> typing.NoReturn:
    options = parser.option_strings()
    problems = []
    after_unknown_option = False
    for token in extras:
        if token.startswith("-"):
            key = token.split("=", 1)[0]
            problems.append(f"unknown option {key}{suggestion(key, options)}")
            after_unknown_option = "=" not in token
        elif after_unknown_option:  # the unknown option's value
            after_unknown_option = False
        else:
            problems.append(f"unexpected argument {token!r}")
    parser.error("\n  ".join(problems) if len(problems) == 1 else "\n  " + "\n  ".join(problems))


def parse_options(cls: type[T], argv: Sequence[str], prog: str, description: str = "", *,
                  commands: typing.Collection[str] = ()) -> T:
    """Parse ``argv`` into a ``cls`` instance, honouring ``--config_file``.

    ``prog`` is "sdtune COMMAND"; ``commands`` are every command's name, whose config sections are skipped.
    """
    command = prog.split(" ", 1)[1] if prog.startswith("sdtune ") else None
    hints = _resolved_types(cls)
    fields = dataclasses.fields(cls)
    positional = {f.name for f in fields if f.metadata.get("positional")}
    config_path = None if any(a in ("-h", "--help") for a in argv) else _config_path(argv)
    values: dict[str, Any] = {}
    if config_path is not None:
        values = read_config_file(config_path, cls, command, commands)
    parser = build_parser(cls, prog, description, config_positionals=set(values) & positional)
    parser.set_defaults(**{k: _FromConfig(v) for k, v in values.items() if k not in positional})
    first, extras = parser.parse_known_args(_bind_bool_values(parser, argv))
    if extras:
        _unknown_arguments(parser, extras)  # type: ignore[arg-type]
    if first.debug:
        logging.getLogger("sdtune").setLevel(logging.DEBUG)
    kwargs: dict[str, Any] = {}
    for f in fields:
        value = getattr(first, f.name)
        from_file = isinstance(value, _FromConfig) or (value is None and f.name in positional and f.name in values)
        if from_file:
            raw = value.value if isinstance(value, _FromConfig) else values[f.name]
            value = _listed_spelling(f.metadata, _coerce(raw, hints[f.name], f.name, f"config file {config_path}"))
            choices = f.metadata.get("choices")
            if choices and value is not None and value not in choices:  # argparse checks only command-line values
                raise OptionsError(f"config file {config_path}: option {f.name} = {raw!r}: choose one of "
                                   f"{', '.join(map(str, choices))}")
        kwargs[f.name] = value
    missing = [f"--{f.name}" for f in fields if kwargs[f.name] is None and is_required(f, hints)]
    if missing:  # all of them at once, not one a run
        raise OptionsError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    return cls(**kwargs)
