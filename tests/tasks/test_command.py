"""The ``command`` task: a user's script as a trial (space .ini, substitution, metrics, process
groups, memory, resume), through the real worker loop and real worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState

from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError
from cnn_mellin.optim.attrs import PRUNE_KIND, PRUNE_REASON, RESUMED_FROM
from cnn_mellin.optim.attrs import WORKER as WORKER_ATTR
from cnn_mellin.optim.launch import run_worker
from cnn_mellin.optim.study import build_settings, init_study
from cnn_mellin.tasks.command.process import group_pids
from cnn_mellin.tasks.command.spec import parse_space, placeholders, render
from tests.optim_helpers import ROOT, env, load, start_worker, states, wait_all
from tests.training_fixtures import write_store

pytest_plugins = ["tests.optim_fixtures"]

EXAMPLE = ROOT / "examples" / "tune_your_script"

SPACE = """
[x]
type = float
default = 0.5
low = 0
high = 1
search = 0.0 1.0
doc = Where the value is lowest near 0.3.

[mode]
type = str
default = ok
search = ok
doc = How the script misbehaves.

[epochs]
type = int
default = 3
low = 1
doc = Epochs.

[epoch_s]
type = float
default = 0.0
doc = Seconds per epoch.
"""

# a script of the kind the command task runs: resumes from $CNN_MELLIN_CHECKPOINT_DIR, reports
# one JSON line per epoch to $CNN_MELLIN_METRICS, and misbehaves as its --mode says
SCRIPT = r'''
import json, math, os, sys, time
x, mode, epochs, epoch_s = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
ckpt = os.path.join(os.environ["CNN_MELLIN_CHECKPOINT_DIR"], "epoch")
with open(os.path.join(os.environ["CNN_MELLIN_CHECKPOINT_DIR"], "pids"), "a") as f:
    f.write(f"{os.getpid()}\n")
start = int(open(ckpt).read()) if os.path.exists(ckpt) else 0
params = json.load(open(os.environ["CNN_MELLIN_PARAMS"]))
assert params["x"] == x, params
if mode == "crash":
    sys.exit("Traceback: something the script did not expect")
if mode == "hog":
    hog = bytearray(300_000_000)
    for i in range(0, len(hog), 4096):
        hog[i] = 1
    time.sleep(30)
if mode == "child":  # a helper process the script leaves behind
    import subprocess
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with open(os.path.join(os.environ["CNN_MELLIN_CHECKPOINT_DIR"], "pids"), "a") as f:
        f.write(f"{helper.pid}\n")
out = open(os.environ["CNN_MELLIN_METRICS"], "a")
for epoch in range(start + 1, epochs + 1):
    time.sleep(epoch_s)
    value = (x - 0.3) ** 2 + 1 / epoch
    if mode == "nan" and epoch == 2:
        value = math.nan
    line = {"epoch": epoch, "dev_per": value, "loss": 1.0}
    if mode == "nokey":
        del line["dev_per"]
    text = "this is not json" if mode == "garbage" else json.dumps(line)
    out.write(text + "\n")  # the metrics line first, then the checkpoint, as scripts do
    out.flush()
    with open(ckpt + ".tmp", "w") as f:
        f.write(str(epoch))
    os.replace(ckpt + ".tmp", ckpt)
'''


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    space = tmp_path / "space.ini"
    space.write_text(SPACE)
    return path, space


def command_study(
    url, tmp_path, script, name="cmd", num_trials=4, base=None, mem_limit_bytes=None,
    **options,
):
    """A command study of SCRIPT in ``url``; ``options`` are the task's own."""
    from cnn_mellin.tasks.command.spec import read_space

    path, space = script
    task_options = {
        "command": f"{sys.executable} {path} {{x}} {{mode}} {{epochs}} {{script.epoch_s}}",
        "space": str(space), "cwd": str(tmp_path), "stop_grace": 2.0, **options,
    }
    settings = build_settings(
        Config(base or {}, (read_space(space)[1],)), None, task="command",
        task_options=task_options, num_trials=num_trials, pruner="none",
        checkpoint_dir=tmp_path / "ckpt" / name, heartbeat_interval=1.0,
        mem_limit_bytes=mem_limit_bytes,
    )
    init_study(url, name, settings)
    return settings


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def script_pids(tmp_path) -> list[int]:
    return [int(p) for f in (tmp_path / "ckpt").rglob("pids") for p in f.read_text().split()]


# -- the space and the command line ---------------------------------------------------------


def test_example_space_declares_typed_parameters_with_search_ranges():
    group = parse_space((EXAMPLE / "space.ini").read_text(), "space.ini")
    config = Config(None, (group,))
    assert config["script.lr"] == 0.003 and config["script.optimizer"] == "adamw"
    assert group["lr"].search.log and group["lr"].search.low == 1e-4
    assert group["hidden"].search.choices == (16, 32, 64, 128)
    assert group["amp"].search is None and group["amp"].type is bool
    with pytest.raises(ConfigError, match=r"script\.lr: expected a number in \[1e-06, 1.0\]"):
        config.replace({"script.lr": 2.0})


@pytest.mark.parametrize("text, message", [
    ("[lr]\ntype = float\n", r"\[lr\]: a default is required"),
    ("[lr]\ntype = double\ndefault = 1\n", r"\[lr\] type: expected one of int, float"),
    ("[lr]\ntype = float\ndefault = 1\nrange = 1 2\n", r"\[lr\] unknown key 'range'"),
    ("[lr]\ntype = float\ndefault = x\n", r"\[lr\] default: expected a number"),
    ("[lr]\ntype = float\ndefault = 1\nsearch = 1 2 3\n", r"\[lr\] search: expected LOW HIGH"),
    ("[lr]\ntype = float\ndefault = 1\nsearch = 0 1\nlog = true\n",
     r"\[lr\] search: a log search range needs low > 0"),
    ("[2lr]\ntype = float\ndefault = 1\n", r"\[2lr\]: a parameter name must be"),
    ("[trial]\ntype = int\ndefault = 1\n", r"\[trial\]: a parameter name must be"),
    ("# nothing\n", "declares no parameter"),
    ("[lr\n", "not a valid .ini file"),
])
def test_bad_space_files_are_one_line_errors_naming_the_spot(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_space(text, "my-space.ini")
    assert str(info.value).startswith("my-space.ini") and "\n" not in str(info.value)


def test_placeholders_are_substituted_shell_quoted_and_shell_variables_left_alone():
    template = "train --lr {lr} --name {script.name} --home ${HOME} --awk '{print $1}'"
    assert placeholders(template) == ["lr", "script.name"]
    assert render(template, {"lr": "0.1", "script.name": "'a b'"}) == \
        "train --lr 0.1 --name 'a b' --home ${HOME} --awk '{print $1}'"


def test_read_ini_overrides_and_best_ini_read_back_for_a_command_study(cli, tmp_path, script):
    path, space = script
    override = tmp_path / "override.ini"
    override.write_text("[script]\nx = 0.25\n")
    code, out, err = cli(
        "--read-ini", override, "--print-ini", "optim", tmp_path / "s.journal", "init",
        "--task", "command", "--space", space, "--command", "true {x}",
    )
    assert code == 0, err
    assert "[script]\n" in out and "x = 0.25\n" in out
    code, out, err = cli("--read-ini", override, "optim", tmp_path / "s.journal", "init")
    assert code == 2 and "unknown section [script]" in err  # not a command study's space
    code, out, err = cli("params", "--task", "command", "--space", space)
    assert code == 0 and out.startswith("script.x ") and "script.mode" in out


@pytest.mark.parametrize("argv, message", [
    (["--space", "SPACE", "--command", "true {nope}"], "placeholder {nope} names no parameter"),
    (["--space", "SPACE", "--command", "no-such-program-here {x}"], "not found on PATH"),
    (["--space", "SPACE", "--command", "./missing.sh {x}"], "is not an executable file"),
    (["--space", "SPACE", "--command", "echo 'unclosed {x}"], "not a valid shell command"),
    (["--space", "SPACE"], "--task command needs --command"),
    (["--space", "nowhere.ini", "--command", "true"], "nowhere.ini: no such file"),
    (["--command", "true"], "--task command needs --space"),
    (["--space", "SPACE", "--command", "true", "--cwd", "nowhere"], "no such directory"),
    (["--space", "SPACE", "--command", "true", "--timeout", "0"], "--timeout: invalid value"),
    (["--space", "SPACE", "--command", "true", "--direction", "up"], "invalid choice: 'up'"),
    (["--space", "SPACE", "--command", "true", "--dev-proportion", "0.2"],
     "--dev-proportion is an option of --task asr, not of --task command"),
])
def test_bad_command_init_arguments_are_one_line_errors(cli, tmp_path, script, argv, message):
    _, space = script
    argv = [str(space) if a == "SPACE" else a for a in argv]
    journal = tmp_path / "s.journal"
    code, out, err = cli("optim", journal, "init", "--task", "command", *argv)
    assert code == 2, (out, err)
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not journal.exists()


# -- trials through the real worker loop ----------------------------------------------------


def test_command_trials_report_each_epoch_and_the_last_value(tmp_path, script):
    url = str(tmp_path / "s.journal")
    command_study(url, tmp_path, script, num_trials=3, base={"script.epoch_s": 0.2})
    summary = run_worker(url, "cmd", seed=3)
    assert summary.outcomes["complete"] == 3
    study = load(url, "cmd")
    for trial in study.trials:
        x = trial.params["script.x"]
        assert trial.value == pytest.approx((x - 0.3) ** 2 + 1 / 3)
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert Path(trial.user_attrs["command_log"]).is_file()
        assert trial.user_attrs["peak_bytes"] > 0
    best = min(study.trials, key=lambda t: t.value)
    from cnn_mellin.optim.best import best_text
    from cnn_mellin.optim.study import read_settings

    settings = read_settings(study)
    text = best_text(study, settings, settings.build_task())
    command = [line for line in text.splitlines() if line.startswith("# command: ")][0]
    assert f" {best.params['script.x']!r} ok 3 0.2" in command
    ini = tmp_path / "best.ini"
    ini.write_text(text)
    assert Config.from_ini([ini], groups=settings.build_task().groups())["script.x"] == \
        best.params["script.x"]
    independent = best_text(study, settings, settings.build_task(), independent=True)
    assert "[script]" in independent
    from cnn_mellin.optim.importance import important_text

    assert important_text(study, settings, top_k=1) == "script.x\n"  # the one that varies


def test_a_pruned_trial_stops_its_script_and_every_process_it_started(tmp_path, script):
    import optuna

    from cnn_mellin.optim.study import read_settings
    from cnn_mellin.tasks import TrialContext

    path, space = script
    space.write_text(SPACE.replace("search = ok", "search = child"))
    url = str(tmp_path / "s.journal")
    command_study(url, tmp_path, script, num_trials=1,
                  base={"script.epochs": 50, "script.epoch_s": 0.2})
    task = read_settings(load(url, "cmd")).build_task()
    reported = []

    def report(epoch, value):  # what the worker does when its pruner says stop
        reported.append(epoch)
        if epoch == 2:
            raise optuna.TrialPruned("pruned at epoch 2")

    context = TrialContext(device="cpu", checkpoint_dir=tmp_path / "ckpt" / "trial-0",
                           num_data_workers=0, report=report, trial_number=0)
    started = time.monotonic()
    with pytest.raises(optuna.TrialPruned):
        task.run(task.config({"script.mode": "child"}), context)
    assert reported == [1, 2] and time.monotonic() - started < 15
    pids = script_pids(tmp_path)
    assert len(pids) == 2 and not any(alive(p) for p in pids)


@pytest.mark.parametrize("mode, state, kind, reason", [
    ("crash", TrialState.PRUNED, "exit", "exited with status 1: Traceback: something"),
    ("nokey", TrialState.PRUNED, "metrics", "no metrics line had the key 'dev_per'"),
    ("garbage", TrialState.PRUNED, "metrics", "metrics line 1 is not a JSON object"),
    ("nan", TrialState.PRUNED, "nonfinite", "non-finite value nan at epoch 2"),
])
def test_bad_scripts_end_the_trial_with_a_one_line_reason_and_the_worker_goes_on(
    tmp_path, script, mode, state, kind, reason
):
    url = str(tmp_path / "s.journal")
    path, space = script
    space.write_text(SPACE.replace("search = ok", f"search = {mode}"))
    command_study(url, tmp_path, script, num_trials=2)
    summary = run_worker(url, "cmd")
    assert summary.exit_code == 0
    study = load(url, "cmd")
    assert [t.state for t in study.trials] == [state, state]
    for trial in study.trials:
        assert trial.user_attrs[PRUNE_KIND] == kind
        assert reason in trial.user_attrs[PRUNE_REASON]
        assert "\n" not in trial.user_attrs[PRUNE_REASON]


def test_a_command_that_cannot_run_fails_its_trials_and_stops_the_worker(tmp_path, script):
    url = str(tmp_path / "s.journal")
    path, space = script
    command_study(url, tmp_path, script, num_trials=5, command="sh -c 'exit 127' {x}")
    summary = run_worker(url, "cmd")
    assert summary.exit_code == 1  # three failures in a row: the set-up is broken
    study = load(url, "cmd")
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(failed) == 3
    assert "could not run (exit 127)" in failed[0].user_attrs["fail_reason"]


def test_timeout_and_pruning_stop_the_whole_process_group(tmp_path, script):
    url = str(tmp_path / "s.journal")
    path, space = script
    space.write_text(SPACE.replace("search = ok", "search = child"))
    command_study(url, tmp_path, script, num_trials=1, timeout=2.0,
                  base={"script.epochs": 50, "script.epoch_s": 0.5})
    started = time.monotonic()
    run_worker(url, "cmd")
    assert time.monotonic() - started < 20
    trial = load(url, "cmd").trials[0]
    assert trial.state == TrialState.PRUNED and trial.user_attrs[PRUNE_KIND] == "timeout"
    pids = script_pids(tmp_path)
    assert len(pids) == 2  # the script and the helper it started: both gone
    assert not any(alive(p) for p in pids)


def test_memory_over_the_limit_stops_the_script_and_records_the_constraint(tmp_path, script):
    url = str(tmp_path / "s.journal")
    path, space = script
    space.write_text(SPACE.replace("search = ok", "search = hog"))
    command_study(url, tmp_path, script, num_trials=1, mem_limit_bytes=150_000_000)
    run_worker(url, "cmd")
    trial = load(url, "cmd").trials[0]
    assert trial.state == TrialState.PRUNED and trial.user_attrs[PRUNE_KIND] == "memory"
    assert trial.user_attrs["peak_bytes"] > 150_000_000
    assert trial.system_attrs["constraints:memory"] > 0
    assert not any(alive(p) for p in script_pids(tmp_path))


def _wait_for_epoch(tmp_path, epoch: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ckpt in (tmp_path / "ckpt").rglob("epoch"):
            if ckpt.read_text().strip() and int(ckpt.read_text()) >= epoch:
                return
        time.sleep(0.1)
    raise AssertionError(f"no trial reached epoch {epoch}")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_two_workers_budget_exact_a_killed_worker_leaves_no_process_and_its_retry_resumes(
    request, tmp_path, script, kind
):
    url = str(tmp_path / "s.journal") if kind == "journal" else request.getfixturevalue("pg_db")[0]
    command_study(url, tmp_path, script, num_trials=4,
                  base={"script.epochs": 6, "script.epoch_s": 0.4})
    victim = start_worker(url, "cmd", "--max-outage", "30")
    _wait_for_epoch(tmp_path, 2)
    pids = script_pids(tmp_path)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "the killed worker's script outlived it"
    workers = [start_worker(url, "cmd") for _ in range(2)]
    for code, err in wait_all(workers, timeout=300):
        assert code == 0, err
    study = load(url, "cmd")
    counts = states(study)
    assert counts.get("COMPLETE", 0) + counts.get("PRUNED", 0) == 4
    retry = [t for t in study.trials if t.state == TrialState.COMPLETE and RESUMED_FROM in
             t.user_attrs]
    assert len(retry) == 1 and retry[0].user_attrs[RESUMED_FROM] >= 2
    assert sorted(retry[0].intermediate_values) == [1, 2, 3, 4, 5, 6]
    assert retry[0].user_attrs[WORKER_ATTR]["pid"] != victim.pid


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_example_script_two_workers_budget_exact(request, tmp_path, kind):
    data = write_store(tmp_path / "data", 24, seed=0)
    url = str(tmp_path / "s.journal") if kind == "journal" else request.getfixturevalue("pg_db")[0]
    init = subprocess.run(
        [sys.executable, "-m", "cnn_mellin", "optim", url, "init", str(data), "--task", "command",
         "--space", str(EXAMPLE / "space.ini"), "--num-trials", "3", "--pruner", "none",
         "--whitelist", "script.lr", "script.optimizer", "--checkpoint-dir", str(tmp_path / "c"),
         "--command", f"{sys.executable} {EXAMPLE / 'train_gru_ctc.py'} --data {{data_dir}} "
         "--epochs 2 --lr {lr} --optimizer {optimizer} --hidden 8"],
        cwd=tmp_path, env=env(), capture_output=True, text=True,
    )
    assert init.returncode == 0, init.stderr
    workers = [start_worker(url, "command-data") for _ in range(2)]
    for code, err in wait_all(workers, timeout=300):
        assert code == 0, err
    study = load(url, "command-data")
    assert states(study) == {"COMPLETE": 3}
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == [1, 2]
        lines = Path(trial.user_attrs["command_log"]).read_text().splitlines()
        assert json.loads(lines[-1])["epoch"] == 2


def test_group_pids_sees_a_session():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"],
                               start_new_session=True)
    try:
        assert group_pids(process.pid) == [process.pid]
    finally:
        process.kill()
        process.wait()


def test_the_guard_started_from_a_shell_stops_only_its_own_session():
    # found by hand: run without a session of its own, the guard's clean-up after the
    # command ended used to kill every process of its caller's session
    caller = subprocess.run(
        [sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-m', "
         "'cnn_mellin.tasks.command', '--guard', '1', '/bin/true']); print('caller alive')"],
        capture_output=True, text=True, timeout=60, start_new_session=True, env=env(),
    )
    assert caller.returncode == 0 and "caller alive" in caller.stdout, caller


def test_a_retry_reports_what_the_killed_attempt_wrote_but_never_reported(tmp_path, script):
    # a worker killed after the script wrote epoch 2's line (and checkpoint) but before the
    # worker read it: the retry, resuming at epoch 3, reports epoch 2 from that attempt's file
    from cnn_mellin.optim.study import read_settings
    from cnn_mellin.tasks import TrialContext

    url = str(tmp_path / "s.journal")
    command_study(url, tmp_path, script, num_trials=1, base={"script.epochs": 4})
    task = read_settings(load(url, "cmd")).build_task()
    trial_dir = tmp_path / "ckpt" / "trial-0"
    (trial_dir / "attempt-0").mkdir(parents=True)
    (trial_dir / "attempt-0" / "metrics.jsonl").write_text(
        '{"epoch": 1, "dev_per": 0.9}\n{"epoch": 2, "dev_per": 0.8}\n')
    (trial_dir / "checkpoint").mkdir()
    (trial_dir / "checkpoint" / "epoch").write_text("2")
    reported = []
    context = TrialContext(device="cpu", checkpoint_dir=trial_dir, num_data_workers=0,
                           report=lambda epoch, value: reported.append(epoch), trial_number=5)
    result = task.run(task.config({"script.x": 0.3, "script.epochs": 4}), context)
    assert reported == [1, 2, 3, 4]
    assert result.resumed_from_epoch == 2 and result.epochs == 4
    assert result.value == pytest.approx(1 / 4)
