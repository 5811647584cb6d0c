"""Typed YAML: read YAML into dataclasses, checking every value against its type hint.

Nothing here knows what a recipe is (config.py is the schema). What it guarantees: YAML 1.2 scalars
(only true / false are booleans, so `save_strategy: no` stays the string 'no'; 2e-4 is a number), a
duplicate key is an error rather than "the last one wins", and every error is one line that names the
file (or the command line), the line or the dotted field, and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from qlrlora.errors import QLRError


class ConfigError(QLRError):
    pass


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans and floats; duplicate keys refused."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (the earlier value would be ignored)", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_REPLACED = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:float"}
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _REPLACED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _Loader.construct_mapping)


def parse_yaml(text: str, source: str = "<yaml>"):
    """The YAML document in `text`; a syntax error or a duplicate key names the line."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{source}:{at} invalid YAML: {problem}") from None


def read_yaml(path: Path):
    """The YAML document in a file; a file that is not UTF-8 text is an error naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a YAML text file (byte {e.start} is not UTF-8)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror})") from None
    return parse_yaml(text, str(path))


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--section.key=value` (value in YAML) to the raw mapping; errors name the command line."""
    where = f"command line: {item!r}"
    if not item.startswith("--") or "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"{where}: expected --section.key=value, e.g. --train.learning_rate=1e-4")
    key, text = item[2:].split("=", 1)
    *parents, last = key.split(".")
    if not all(parents) or not last:
        raise ConfigError(f"{where}: empty name in {key!r}")
    try:
        value = parse_yaml(text, where) if text else None
    except ConfigError:
        value = text  # not YAML: take it as a plain string, the type check says whether that fits
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: '{part}' is not a mapping in the recipe, so it has no '{last}'")
        node = child
    node[last] = value


def build_dataclass(cls, data: dict, prefix: str, source: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}.{key}'{did_you_mean(key, names)}")
        kwargs[key] = coerce(value, hints[key], f"{prefix}.{key}", source)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {prefix}.{f.name}: missing required field")
    return cls(**kwargs)


def coerce(value: Any, hint: Any, path: str, source: str) -> Any:
    """Check `value` against a type hint; returns it (ints widened to float where a float is expected)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, path, source)
            except ConfigError:
                continue
        raise _type_error(value, hint, path, source)
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{source}: {path}: expected one of {', '.join(map(repr, args))}, got {value!r}"
                f"{did_you_mean(str(value), [str(a) for a in args])}"
            )
        return value
    if origin is list:
        if not isinstance(value, list):
            raise _type_error(value, hint, path, source)
        return [coerce(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _type_error(value, hint, path, source)
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise _type_error(value, hint, path, source)
        return build_dataclass(hint, value, path, source)
    if hint is bool:
        if not isinstance(value, bool):
            raise _type_error(value, hint, path, source)
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(value, hint, path, source)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(value, hint, path, source)
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _type_error(value, hint, path, source)
        return value
    if hint is Any:
        return value
    raise TypeError(f"config field {path} has an unsupported type hint {hint!r}")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if hint is dict or origin is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _type_error(value: Any, hint: Any, path: str, source: str) -> ConfigError:
    return ConfigError(f"{source}: {path}: expected {_describe(hint)}, got {value!r} ({type(value).__name__})")


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
