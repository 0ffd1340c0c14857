"""Typed parameters, groups of them, and the configuration they make up.

Every tunable or fixed setting is declared once as a :class:`Param` inside a
:class:`Group` (see :mod:`cnn_mellin.params`). That one declaration drives the
``.ini`` files, validation, ``cnn-mellin params`` and the search space.
Names are ``group.param``; a :class:`Config` is an immutable mapping from those
names to checked values.
"""

from __future__ import annotations

import configparser
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnn_mellin.errors import ConfigError
from cnn_mellin.files import write_text_atomic

_TYPES = (int, float, bool, str)
_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}


@dataclass(frozen=True)
class Search:
    """Where the search may look: a numeric range (``log``/``step`` optional) or ``choices``."""

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple | None = None

    def __post_init__(self):
        if self.choices is not None:
            if self.low is not None or self.high is not None or not self.choices:
                raise ValueError("Search takes either choices or a low/high range")
            object.__setattr__(self, "choices", tuple(self.choices))
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"Search range needs low <= high, got {self.low}, {self.high}")
        elif self.log and self.low <= 0:
            raise ValueError("a log search range needs low > 0")


@dataclass(frozen=True)
class Param:
    """One setting: its type, default, hard bounds, search range and one-line doc.

    ``active(values, num_coeffs)`` says whether the parameter can matter for a
    configuration (``values``: flat ``group.name`` mapping) on data with
    ``num_coeffs`` coefficients per frame; the search drops inactive ones.
    """

    name: str
    type: type
    default: Any
    doc: str
    low: int | float | None = None
    high: int | float | None = None
    choices: tuple | None = None
    search: Search | None = None
    active: Callable[[Mapping[str, Any], int], bool] | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.type not in _TYPES:
            raise TypeError(f"{self.name}: type must be one of int, float, bool, str")
        if self.choices is not None:
            object.__setattr__(self, "choices", tuple(self.choices))
        problem = self._problem(self.default)
        if problem:
            raise ValueError(f"{self.name}: default {self.default!r} is not {problem}")
        if self.search is not None:
            values = self.search.choices or (self.search.low, self.search.high)
            for value in values:
                if self._problem(value):
                    raise ValueError(
                        f"{self.name}: search value {value!r} outside {self.allowed()}"
                    )

    @property
    def tunable(self) -> bool:
        return self.search is not None

    def allowed(self) -> str:
        """Human description of the values this parameter accepts."""
        if self.type is bool:
            return "true or false"
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        kind = {int: "an integer", float: "a number", str: "a string"}[self.type]
        if self.low is not None and self.high is not None:
            return f"{kind} in [{self.low}, {self.high}]"
        if self.low is not None:
            return f"{kind} >= {self.low}"
        if self.high is not None:
            return f"{kind} <= {self.high}"
        return kind

    def _problem(self, value: Any) -> str | None:
        """None if ``value`` (already of the right Python type) is acceptable."""
        if self.type is bool:
            return None if isinstance(value, bool) else self.allowed()
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            return self.allowed()
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return self.allowed()
            if not math.isfinite(value):
                return self.allowed()
        if self.type is str and not isinstance(value, str):
            return self.allowed()
        if self.choices is not None and value not in self.choices:
            return self.allowed()
        if self.low is not None and value < self.low:
            return self.allowed()
        if self.high is not None and value > self.high:
            return self.allowed()
        return None

    def check(self, value: Any) -> Any:
        """Return ``value`` converted to this parameter's type, or raise ValueError."""
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if self.type is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        problem = self._problem(value)
        if problem:
            raise ValueError(f"expected {problem}, got {value!r}")
        return value

    def parse(self, text: str) -> Any:
        """Parse the text of an ``.ini`` value, or raise ValueError."""
        text = text.strip()
        if self.type is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError(f"expected true or false, got {text!r}")
        if self.type is str:
            return self.check(text)
        try:
            value = self.type(text)
        except ValueError:
            raise ValueError(f"expected {self.allowed()}, got {text!r}") from None
        return self.check(value)

    def format(self, value: Any) -> str:
        """Text for an ``.ini`` file that :meth:`parse` reads back exactly."""
        if self.type is bool:
            return "true" if value else "false"
        if self.type is float:
            return repr(float(value))
        return str(value)


@dataclass(frozen=True)
class Group:
    """A named set of parameters: one ``.ini`` section, one prefix of names."""

    name: str
    doc: str
    params: tuple[Param, ...]

    def __init__(self, name: str, doc: str, params: Iterable[Param]):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "doc", doc)
        object.__setattr__(self, "params", tuple(params))
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"group {name} declares a parameter twice")

    def __getitem__(self, name: str) -> Param:
        for param in self.params:
            if param.name == name:
                return param
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(p.name == name for p in self.params)


def builtin_groups() -> tuple[Group, ...]:
    """The acoustic model's groups (model, training, data): the default configuration's."""
    from cnn_mellin.params import GROUPS

    return GROUPS


def parameters(groups: Iterable[Group] | None = None) -> dict[str, Param]:
    """Every parameter of ``groups`` (default: the built-in ones) by full name ``group.param``."""
    return {
        f"{g.name}.{p.name}": p
        for g in (builtin_groups() if groups is None else groups) for p in g.params
    }


class _GroupView:
    """Attribute access to one group of a :class:`Config` (``cfg.model.window_size``)."""

    def __init__(self, config: Config, group: str):
        self._config = config
        self._group = group

    def __getattr__(self, name: str) -> Any:
        try:
            return self._config[f"{self._group}.{name}"]
        except KeyError:
            raise AttributeError(f"{self._group}.{name}") from None


class Config(Mapping[str, Any]):
    """An immutable, validated configuration: defaults overridden by ``values``.

    Its parameters are those of ``groups`` (default: :func:`builtin_groups`); a trial task
    with parameters of its own (a user's training script) brings its own groups.
    """

    def __init__(
        self, values: Mapping[str, Any] | None = None, groups: Iterable[Group] | None = None
    ):
        self._groups = tuple(builtin_groups() if groups is None else groups)
        params = parameters(self._groups)
        self._params = params
        merged = {name: param.default for name, param in params.items()}
        for name, value in (values or {}).items():
            if name not in params:
                raise ConfigError(f"unknown parameter {name!r}; see 'cnn-mellin params'")
            try:
                merged[name] = params[name].check(value)
            except ValueError as err:
                raise ConfigError(f"{name}: {err}") from None
        self._values = merged

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, group: str) -> _GroupView:
        if group.startswith("_") or group not in {g.name for g in self._groups}:
            raise AttributeError(group)
        return _GroupView(self, group)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self._values == other._values

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __repr__(self) -> str:
        changed = {k: v for k, v in self._values.items() if self._params[k].default != v}
        return f"Config({changed!r})"

    @property
    def groups(self) -> tuple[Group, ...]:
        """The parameter groups this configuration is made of, in ``.ini`` order."""
        return self._groups

    @property
    def params(self) -> dict[str, Param]:
        """The declarations of this configuration's parameters by full name."""
        return dict(self._params)

    def group(self, name: str) -> dict[str, Any]:
        """The values of one group keyed by the short parameter name."""
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self._values.items() if k.startswith(prefix)}

    def replace(self, updates: Mapping[str, Any]) -> Config:
        """A new configuration with ``updates`` (full names) applied and checked."""
        return Config({**self._values, **updates}, self._groups)

    def to_ini(self, comments: bool = True) -> str:
        """The full configuration as ``.ini`` text, one section per group."""
        lines: list[str] = []
        for group in self._groups:
            if lines:
                lines.append("")
            if comments:
                lines.append(f"# {group.doc}")
            lines.append(f"[{group.name}]")
            for param in group.params:
                if comments:
                    lines.append(f"# {param.doc} ({param.allowed()})")
                value = self._values[f"{group.name}.{param.name}"]
                lines.append(f"{param.name} = {param.format(value)}")
        return "\n".join(lines) + "\n"

    def write_ini(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_ini` to ``path`` atomically."""
        write_text_atomic(path, self.to_ini())

    @classmethod
    def from_ini(
        cls, paths: Iterable[str | os.PathLike], base: Config | None = None,
        groups: Iterable[Group] | None = None,
    ) -> Config:
        """Read ``.ini`` files in order (later ones win) on top of ``base`` or the defaults.

        ``groups`` defaults to those of ``base``, else the built-in ones.
        """
        if groups is None and base is not None:
            groups = base.groups
        groups = tuple(builtin_groups() if groups is None else groups)
        values = dict(base._values) if base is not None else {}
        for path in paths:
            values.update(read_ini(path, groups))
        return cls(values, groups)


def read_ini(path: str | os.PathLike, groups: Iterable[Group] | None = None) -> dict[str, Any]:
    """The values set in one ``.ini`` file, checked strictly; raises ConfigError.

    A file that sets nothing is an error too: it is most likely the remains of a failed
    ``best - > file.ini``, and reading it as "all defaults" would hide that.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from None
    values = parse_ini(text, str(path), groups)
    if not values:
        raise ConfigError(f"{path}: sets no parameter (empty .ini file)")
    return values


def parse_ini(
    text: str, source: str = "<string>", groups: Iterable[Group] | None = None
) -> dict[str, Any]:
    """Parse ``.ini`` text as :func:`read_ini` does; ``source`` names it in errors."""
    parser = configparser.ConfigParser(
        interpolation=None, strict=True, default_section="\x00no-default"
    )
    parser.optionxform = str  # keys are case sensitive, as declared
    try:
        parser.read_string(text, source=source)
    except configparser.Error as err:
        first = str(err).splitlines()[0].rstrip(":.")
        raise ConfigError(f"{source}: not a valid .ini file: {first}") from None
    groups = {g.name: g for g in (builtin_groups() if groups is None else groups)}
    values: dict[str, Any] = {}
    for section in parser.sections():
        group = groups.get(section)
        if group is None:
            raise ConfigError(
                f"{source}: unknown section [{section}]; allowed sections: "
                + ", ".join(f"[{g}]" for g in groups)
            )
        for key, raw in parser.items(section):
            if key not in group:
                raise ConfigError(
                    f"{source}: [{section}] unknown key {key!r}; allowed keys: "
                    + ", ".join(p.name for p in group.params)
                )
            try:
                values[f"{section}.{key}"] = group[key].parse(raw)
            except ValueError as err:
                raise ConfigError(f"{source}: [{section}] {key}: {err}") from None
    return values


def compile_patterns(patterns: Iterable[str], option: str = "pattern") -> list[re.Pattern]:
    """Compile regular expressions that must match parameter names in full."""
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ConfigError(f"{option}: bad regular expression {pattern!r}: {err}") from None
    return compiled


def match_names(
    patterns: Iterable[str], names: Iterable[str], option: str = "pattern"
) -> list[str]:
    """The ``names`` (in their order) matched in full by any of ``patterns``."""
    compiled = compile_patterns(patterns, option)
    return [name for name in names if any(p.fullmatch(name) for p in compiled)]
