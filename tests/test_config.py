"""The configuration system: declarations, checking and the .ini round trip."""

from __future__ import annotations

import math

import pytest

from cnn_mellin.config import (
    Config,
    Param,
    Search,
    match_names,
    parameters,
    parse_ini,
    read_ini,
)
from cnn_mellin.errors import ConfigError


def _other_value(param: Param):
    """A valid value different from the default, exercising the type's formatting."""
    default = param.default
    if param.type is bool:
        return not default
    if param.choices is not None:
        return next(c for c in param.choices if c != default)
    if param.search is not None and param.search.choices is not None:
        others = [c for c in param.search.choices if c != default]
        if others:
            return others[0]
    if param.type is str:
        return default + "x"
    low = param.low if param.low is not None else default - 10
    high = param.high if param.high is not None else default + 10
    if param.type is int:
        return high if default != high else low
    candidate = low + (high - low) / 3.0  # not representable in short decimal: exact repr matters
    return candidate if candidate != default else low + (high - low) * 2.0 / 7.0


def test_every_parameter_round_trips_through_ini():
    params = parameters()
    changed = {name: _other_value(p) for name, p in params.items()}
    config = Config(changed)
    for name, value in changed.items():
        assert config[name] == value, name
    again = Config(parse_ini(config.to_ini()))
    assert again == config
    assert dict(again) == dict(config)


def test_defaults_round_trip_and_write_ini(tmp_path):
    config = Config()
    path = tmp_path / "all.ini"
    config.write_ini(path)
    assert Config.from_ini([path]) == config
    assert not [p for p in tmp_path.iterdir() if p.name != "all.ini"]  # no temp file left


def test_declarations_are_consistent():
    for name, param in parameters().items():
        group, short = name.split(".")
        assert short == param.name
        assert param.doc and "=" not in param.doc, name  # docs become .ini comments
        assert param.check(param.default) == param.default


def test_group_view_and_group_dict():
    config = Config()
    name, param = next(iter(parameters().items()))
    group, short = name.split(".")
    assert getattr(getattr(config, group), short) == param.default
    assert config.group(group)[short] == param.default
    with pytest.raises(AttributeError):
        config.nosuchgroup  # noqa: B018


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("[nosuch]\nx = 1\n", "unknown section [nosuch]"),
        ("[data]\nnosuch = 1\n", "unknown key 'nosuch'"),
        ("[data]\nbatch_size = many\n", "batch_size: expected an integer"),
        ("[data]\nbatch_size = 0\n", "expected an integer in [1, 4096], got 0"),
        ("[data]\nbatch_size = 2.5\n", "batch_size"),
        ("[data]\nsubset = nan\n", "subset"),
        ("batch_size = 3\n", "not a valid .ini file"),
        ("[data]\nbatch_size = 3\nbatch_size = 4\n", "not a valid .ini file"),
    ],
)
def test_bad_ini_text(text, fragment):
    with pytest.raises(ConfigError) as info:
        parse_ini(text, "x.ini")
    message = str(info.value)
    assert fragment in message
    assert message.startswith("x.ini")
    assert "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_ini(tmp_path / "absent.ini")


def test_later_ini_wins(tmp_path):
    first, second = tmp_path / "a.ini", tmp_path / "b.ini"
    first.write_text("[data]\nbatch_size = 3\nnum_buckets = 4\n")
    second.write_text("[data]\nbatch_size = 5\n")
    config = Config.from_ini([first, second])
    assert (config["data.batch_size"], config["data.num_buckets"]) == (5, 4)
    config = Config.from_ini([second, first])
    assert (config["data.batch_size"], config["data.num_buckets"]) == (3, 4)


def test_bool_and_float_parsing():
    param = Param("flag", bool, False, "A flag.")
    assert [param.parse(t) for t in ("true", "Yes", "1", "off")] == [True, True, True, False]
    number = Param("x", float, 0.5, "A number.", low=0.0, high=1.0)
    value = 1.0 / 3.0
    assert number.parse(number.format(value)) == value
    with pytest.raises(ValueError):
        number.parse("inf")
    assert not math.isnan(number.check(1))


def test_bad_declarations_are_caught():
    with pytest.raises(ValueError):
        Param("x", int, 0, "doc", low=1)
    with pytest.raises(ValueError):
        Param("x", int, 1, "doc", low=1, high=5, search=Search(1, 9))
    with pytest.raises(ValueError):
        Search(0.0, 1.0, log=True)


def test_match_names_full_match_and_bad_regex():
    names = ["model.window_size", "model.window_stride", "training.seed"]
    assert match_names(["model.window_.*"], names) == names[:2]
    assert match_names(["window_size"], names) == []
    with pytest.raises(ConfigError, match="bad regular expression"):
        match_names(["model.("], names, "--whitelist")


@pytest.mark.parametrize("text", ["", "# best - failed\n", "[model]\n"])
def test_an_ini_that_sets_nothing_is_an_error_naming_the_file(tmp_path, text, cli):
    # the recipe writes `best - | sed ... > file.ini`; a failed best leaves an empty file,
    # which must not be read as "all defaults"
    path = tmp_path / "lg.ini"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"lg\.ini: sets no parameter"):
        Config.from_ini([path])
    code, out, err = cli("--read-ini", path, "--print-ini")
    assert code == 2 and out == "" and f"{path}: sets no parameter" in err
