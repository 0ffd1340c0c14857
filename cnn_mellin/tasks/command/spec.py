"""The researcher's spec of a ``command`` study: the search-space ``.ini`` and the command
template, parsed and checked at ``optim init``."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cnn_mellin.config import Group, Param, Search
from cnn_mellin.errors import ConfigError

GROUP = "script"
BUILTINS = ("trial", "checkpoint_dir", "metrics", "params", "device", "data_dir")
_PLACEHOLDER = re.compile(r"(?<!\$)\{([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPES = {"int": int, "float": float, "bool": bool, "str": str}
_KEYS = ("type", "default", "doc", "low", "high", "choices", "search", "log", "step")
_SHELL_WORDS = {
    "cd", "exec", "env", "export", "set", "source", ".", "if", "for", "while", "case", "time",
    "nice", "timeout", "{", "(", "!", "true", "false", "test", "[", "eval", "command",
}


# -- the search space -----------------------------------------------------------------------


def _values(text: str, kind: type) -> list[Any]:
    items = [t for t in re.split(r"[,\s]+" if kind is not str else r"\s*,\s*|\s+", text) if t]
    return [_parse_value(item, kind) for item in items]


def _parse_value(text: str, kind: type) -> Any:
    return Param("_", kind, _neutral(kind), "").parse(text)


def _neutral(kind: type) -> Any:
    return {int: 0, float: 0.0, bool: False, str: ""}[kind]


def parse_space(text: str, source: str) -> Group:
    """The ``script`` parameter group declared by a space ``.ini``; ConfigError naming the spot."""
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, default_section="\x00none",
        inline_comment_prefixes=(";",),
    )
    parser.optionxform = str
    try:
        parser.read_string(text, source=source)
    except configparser.Error as err:
        first = str(err).splitlines()[0].rstrip(":.")
        raise ConfigError(f"{source}: not a valid .ini file: {first}") from None
    params = []
    for section in parser.sections():
        where = f"{source}: [{section}]"
        if not _NAME.match(section) or section in BUILTINS:
            raise ConfigError(
                f"{where}: a parameter name must be a Python identifier other than "
                + ", ".join(BUILTINS)
            )
        entries = dict(parser.items(section))
        unknown = sorted(set(entries) - set(_KEYS))
        if unknown:
            raise ConfigError(
                f"{where} unknown key {unknown[0]!r}; allowed keys: " + ", ".join(_KEYS)
            )
        if entries.get("type") not in _TYPES:
            raise ConfigError(f"{where} type: expected one of {', '.join(_TYPES)}")
        kind = _TYPES[entries["type"]]
        if "default" not in entries:
            raise ConfigError(f"{where}: a default is required")
        try:
            params.append(_param(section, kind, entries))
        except ValueError as err:
            raise ConfigError(f"{where} {err}") from None
    if not params:
        raise ConfigError(f"{source}: declares no parameter (one section per parameter)")
    return Group(GROUP, f"Parameters of the tuned command (declared in {source}).", params)


def _param(name: str, kind: type, entries: Mapping[str, str]) -> Param:
    def number(key: str):
        if key not in entries:
            return None
        try:
            return _parse_value(entries[key], kind if kind in (int, float) else float)
        except ValueError as err:
            raise ValueError(f"{key}: {err}") from None

    choices = None
    if "choices" in entries:
        try:
            choices = tuple(_values(entries["choices"], kind))
        except ValueError as err:
            raise ValueError(f"choices: {err}") from None
    search = None
    if "search" in entries:
        text = entries["search"]
        try:
            if kind in (bool, str) or "," in text:
                search = Search(choices=tuple(_values(text, kind)))
            else:
                bounds = _values(text, kind)
                if len(bounds) != 2:
                    raise ValueError("expected LOW HIGH or a comma-separated list of choices")
                log = Param("log", bool, False, "").parse(entries.get("log", "false"))
                search = Search(bounds[0], bounds[1], log=log, step=number("step"))
        except ValueError as err:
            raise ValueError(f"search: {err}") from None
    elif "log" in entries or "step" in entries:
        raise ValueError("log and step need a search range")
    try:
        default = Param(name, kind, _neutral(kind), "").parse(entries["default"])
    except ValueError as err:
        raise ValueError(f"default: {err}") from None
    return Param(
        name, kind, default, entries.get("doc", ""), low=number("low"), high=number("high"),
        choices=choices, search=search,
    )


def read_space(path: str | os.PathLike) -> tuple[str, Group]:
    """The text of a space ``.ini`` and the group it declares."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"--space {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"--space {path}: cannot read: {err}") from None
    return text, parse_space(text, str(path))


# -- the command line -----------------------------------------------------------------------


def placeholders(template: str) -> list[str]:
    """The ``{name}`` placeholders of a command template, in order."""
    return _PLACEHOLDER.findall(template)


def render(template: str, values: Mapping[str, str]) -> str:
    """``template`` with each placeholder replaced by its (already quoted) value."""
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def check_template(template: str, group: Group) -> None:
    """ConfigError unless every placeholder of ``template`` names a parameter or a builtin."""
    if not template.strip():
        raise ConfigError("--command is empty")
    names = {p.name for p in group.params}
    known = set(BUILTINS) | names | {f"{GROUP}.{n}" for n in names}
    for name in placeholders(template):
        if name not in known:
            raise ConfigError(
                f"--command: placeholder {{{name}}} names no parameter of the space "
                f"(declared: {', '.join(sorted(names))}; also: {', '.join(BUILTINS)})"
            )


def check_program(template: str, cwd: Path) -> None:
    """Fail at init on a first word that cannot be run (best effort: shell syntax passes)."""
    try:
        words = shlex.split(render(template, _Blank()))
    except ValueError as err:
        raise ConfigError(f"--command: not a valid shell command line: {err}") from None
    words = [w for w in words if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", w)]
    if not words or words[0] in _SHELL_WORDS or any(c in words[0] for c in "$`;&|<>()"):
        return
    program = words[0]
    if "/" in program:
        path = Path(program) if os.path.isabs(program) else cwd / program
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ConfigError(f"--command: {program} is not an executable file (in {cwd})")
    elif shutil.which(program) is None:
        raise ConfigError(f"--command: {program!r} not found on PATH")


class _Blank(dict):
    def __missing__(self, key):
        return "x"
