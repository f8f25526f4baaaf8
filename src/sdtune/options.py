"""Declare each command's options once, as a dataclass, and derive argparse and TOML handling from it.

A field's metadata carries what argparse needs (help, choices, aliases, positional).  Option names keep
sd-scripts' spellings (``--train_batch_size``); the hyphenated spelling (``--train-batch-size``) is accepted too.
``--config_file x.toml`` supplies any option; the command line overrides it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

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
) -> Any:
    """A dataclass field carrying its command-line description.

    ``positional=True`` makes it a positional argument (required unless a config file supplies it).
    ``aliases`` are extra option names, e.g. ``("--ckpt",)``.
    """
    meta = {"help": help, "choices": choices, "aliases": tuple(aliases), "positional": positional, "metavar": metavar}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


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
    names = [f"--{name}"]
    if "_" in name:
        names.append(f"--{name.replace('_', '-')}")
    for alias in aliases:
        names.append(alias)
        bare = alias.lstrip("-")
        if "_" in bare:
            names.append("--" + bare.replace("_", "-"))
    return list(dict.fromkeys(names))


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser whose options are ``cls``'s fields (plus ``--config_file``)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    hints = _resolved_types(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        tp, _optional = _unwrap_optional(hints[f.name])
        # argparse expands %-formats in help; a literal "75 %" must not be read as one
        kwargs: dict[str, Any] = {"help": (meta.get("help") or " ").replace("%", "%%")}
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None  # type: ignore[misc]
        )
        origin = typing.get_origin(tp)
        if meta.get("positional"):
            kwargs["type"] = _scalar_converter(tp)
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
            kwargs.update(type=_scalar_converter(tp), default=default)
        parser.add_argument(*names, dest=f.name, **kwargs)
    parser.add_argument(
        "--config_file", "--config-file", dest="config_file", type=Path, default=None,
        help="TOML file supplying any of these options (keys are the option names, sections are ignored); "
        "options given on the command line win",
    )
    return parser


def _flatten_toml(data: dict[str, Any]) -> dict[str, Any]:
    """sd-scripts' config files group options in sections; the sections carry no meaning."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten_toml(value))
        else:
            flat[key.replace("-", "_")] = value
    return flat


def read_config_file(path: Path, cls: type) -> dict[str, Any]:
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionsError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OptionsError(f"config file {path} is not valid TOML: {exc}") from None
    values = _flatten_toml(data)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OptionsError(f"config file {path}: unknown option(s) {', '.join(unknown)} for this command")
    return values


def _coerce(value: Any, tp: Any, name: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return [_coerce(v, item, name) for v in value]
    if tp is bool:
        if isinstance(value, str):
            return _parse_bool(value)
        return bool(value)
    if tp is Path:
        return Path(value)
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise OptionsError(f"option {name}: cannot read {value!r} as {tp.__name__}") from None


def parse_options(cls: type[T], argv: Sequence[str], prog: str, description: str = "") -> T:
    """Parse ``argv`` into a ``cls`` instance, honouring ``--config_file``."""
    parser = build_parser(cls, prog, description)
    first = parser.parse_args(argv)
    if first.config_file is not None:
        values = read_config_file(first.config_file, cls)
        hints = _resolved_types(cls)
        positional = {f.name for f in dataclasses.fields(cls) if f.metadata.get("positional")}
        parser.set_defaults(**{k: _coerce(v, hints[k], k) for k, v in values.items()})
        first = parser.parse_args(argv)
        for name in positional:  # positionals default to None in argparse; fill them from the file
            if getattr(first, name) is None and name in values:
                setattr(first, name, _coerce(values[name], hints[name], name))
    kwargs = {f.name: getattr(first, f.name) for f in dataclasses.fields(cls)}
    missing = [name for name, f in ((f.name, f) for f in dataclasses.fields(cls))
               if f.metadata.get("positional") and kwargs[name] is None and f.default is _MISSING]
    if missing:
        parser.error(f"missing required argument(s): {', '.join(m.upper() for m in missing)}")
    for f in dataclasses.fields(cls):
        if kwargs[f.name] is None and f.default is _MISSING and f.default_factory is _MISSING:  # type: ignore[misc]
            parser.error(f"missing required option --{f.name}")
    return cls(**kwargs)
