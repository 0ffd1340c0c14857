"""The command-line shell: global options, error policy, params listing."""

from __future__ import annotations

import pytest

from cnn_mellin.config import Config, parameters
from tests.conftest import run_cli

BAD_INI = {
    "unknown section": "[nosuch]\nx = 1\n",
    "unknown key": "[data]\nnosuch = 1\n",
    "wrong type": "[data]\nbatch_size = lots\n",
    "out of bounds": "[data]\nbatch_size = 100000\n",
    "malformed": "this is not an ini file\n",
}


def _one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("cnn-mellin")


@pytest.mark.parametrize("kind", sorted(BAD_INI))
def test_bad_ini_is_one_line_exit_2(cli, tmp_path, kind):
    path = tmp_path / "bad.ini"
    path.write_text(BAD_INI[kind])
    code, out, err = cli("--read-ini", path, "--print-ini")
    _one_line_error(code, err)
    assert str(path) in err
    assert out == ""


def test_missing_ini_file(cli, tmp_path):
    code, _, err = cli("--read-ini", tmp_path / "nope.ini", "--print-ini")
    _one_line_error(code, err)
    assert "nope.ini" in err


def test_bad_regex(cli):
    code, _, err = cli("params", "model.(")
    _one_line_error(code, err)
    assert "bad regular expression" in err


def test_bad_option_value_is_one_line(cli):
    code, _, err = cli("--device", "gpu0", "params")
    _one_line_error(code, err)
    assert "cpu, cuda" in err


def test_print_ini_is_accepted_by_read_ini(cli, tmp_path):
    code, out, err = cli("--seed", "7", "--print-ini")
    assert code == 0, err
    path = tmp_path / "printed.ini"
    path.write_text(out)
    code, again, err = cli("--read-ini", path, "--print-ini")
    assert code == 0, err
    assert again == out
    assert Config.from_ini([path])["training.seed"] == 7


def test_read_ini_order_later_wins(cli, tmp_path):
    (tmp_path / "a.ini").write_text("[data]\nbatch_size = 3\n")
    (tmp_path / "b.ini").write_text("[data]\nbatch_size = 9\n")
    _, out_ab, _ = cli("--read-ini", tmp_path / "a.ini", "--read-ini", tmp_path / "b.ini",
                       "--print-ini")
    _, out_ba, _ = cli("--read-ini", tmp_path / "b.ini", "--read-ini", tmp_path / "a.ini",
                       "--print-ini")
    assert "\nbatch_size = 9\n" in out_ab and "\nbatch_size = 3\n" not in out_ab
    assert "\nbatch_size = 3\n" in out_ba


def test_params_lists_tunable_parameters(cli):
    code, out, _ = cli("params")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()]
    tunable = [n for n, p in parameters().items() if p.tunable]
    assert listed == tunable
    code, out, _ = cli("params", "data\\..*", "--all")
    assert [line.split()[0] for line in out.splitlines()] == [
        n for n in parameters() if n.startswith("data.")
    ]
    assert "[4, 64] log" in out  # data.batch_size's search range
    code, _, err = cli("params", "nothing.matches")
    assert code == 1 and "no parameter" in err


def test_help_names_every_command(cli):
    code, out, _ = cli("--help")
    assert code == 0
    for command in ("prep", "train", "decode", "attack", "optim", "params"):
        assert command in out
    code, out, _ = cli("optim", "--help")
    assert code == 0
    for command in ("init", "run", "important", "best", "status", "report"):
        assert command in out


def test_attack_needs_its_output_folder(cli, tmp_path):
    code, _, err = cli("attack", tmp_path, tmp_path)
    assert code == 2
    assert "the following arguments are required: --out" in err


@pytest.mark.slow
def test_real_process_error_has_no_traceback(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[model]\nnosuch = 1\n")
    result = run_cli("--read-ini", path, "--print-ini")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    ok = run_cli("--print-ini")
    assert ok.returncode == 0 and "[model]" in ok.stdout
