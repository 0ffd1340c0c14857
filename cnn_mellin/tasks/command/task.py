"""The ``command`` task itself: options, ``prepare`` at init, and one trial's run."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cnn_mellin.config import Config, Group
from cnn_mellin.errors import ConfigError
from cnn_mellin.tasks.base import (
    MemoryExceeded,
    PruneTrial,
    Task,
    TaskOption,
    TaskResult,
    TrialContext,
)
from cnn_mellin.tasks.command.process import group_memory, group_pids, start_guarded, stop_group
from cnn_mellin.tasks.command.protocol import MetricsReader, script_environment
from cnn_mellin.tasks.command.resume import earlier_values, trial_folders
from cnn_mellin.tasks.command.spec import (
    BUILTINS,
    GROUP,
    check_program,
    check_template,
    parse_space,
    read_space,
    render,
)

_POLL_S = 0.1
_MEMORY_EVERY_S = 0.5


class CommandFailed(RuntimeError):
    """The command could not run at all (not found, not executable): a broken set-up."""


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise ValueError(text)
    return value


class CommandTask(Task):
    """Runs the user's command per trial and reads the metrics it reports."""

    name = "command"
    summary = "run your own training command per trial; value: the --metric it reports"
    OPTIONS = (
        TaskOption("--command", "the command line, with {name} placeholders for the "
                   "parameters of --space (run by /bin/sh)", metavar="CMD", required=True),
        TaskOption("--space", "the .ini declaring the command's parameters (one section per "
                   "parameter: type, default, low, high, search, log, step, choices, doc)",
                   metavar="FILE", required=True),
        TaskOption("--metric", "the key of the metrics lines that is the trial value "
                   "(default %(default)s)", default="dev_per", metavar="KEY"),
        TaskOption("--direction", "whether the metric is better low or high (default "
                   "%(default)s)", default="minimize", choices=("minimize", "maximize")),
        TaskOption("--objective", "the trial value: the last reported value of the metric or "
                   "the best (default %(default)s)", default="last", choices=("last", "best")),
        TaskOption("--cwd", "folder the command runs in (default: the current one)",
                   metavar="DIR"),
        TaskOption("--timeout", "seconds a trial may run before it is stopped and pruned "
                   "(default: no limit)", type=_seconds, metavar="S"),
        TaskOption("--stop-grace", "seconds between SIGTERM and SIGKILL when a trial is "
                   "stopped (default %(default)s)", type=float, default=10.0, metavar="S"),
    )

    @classmethod
    def groups_for(cls, options: Mapping[str, Any]) -> tuple[Group, ...]:
        if options.get("space") is None:
            raise ConfigError("--task command needs --space")
        return (read_space(options["space"])[1],)

    @classmethod
    def prepare(cls, options: Mapping[str, Any], config: Config) -> dict:
        text, group = read_space(options["space"])
        template = options["command"]
        check_template(template, group)
        cwd = Path(os.path.abspath(options.get("cwd") or "."))
        if not cwd.is_dir():
            raise ConfigError(f"--cwd {cwd}: no such directory")
        check_program(template, cwd)
        data_dir = options.get("data_dir")
        if data_dir is not None:
            data_dir = os.path.abspath(data_dir)
            if not os.path.exists(data_dir):
                raise ConfigError(f"DATA_DIR {data_dir}: no such file or directory")
        if not options["metric"]:
            raise ConfigError("--metric is empty")
        grace = float(options["stop_grace"])
        if not 0 <= grace < math.inf:
            raise ConfigError(f"--stop-grace must be 0 or more seconds, got {grace}")
        return {
            "command": template, "space": text, "space_file": os.path.abspath(options["space"]),
            "metric": options["metric"], "direction": options["direction"],
            "objective": options["objective"], "cwd": str(cwd),
            "timeout": options.get("timeout"), "stop_grace": grace, "data_dir": data_dir,
        }

    def groups(self) -> tuple[Group, ...]:
        return (parse_space(self.info["space"], self.info.get("space_file", "space")),)

    @property
    def direction(self) -> str:
        return self.info["direction"]

    def command_line(self, config: Config, builtins: Mapping[str, str]) -> str:
        """The shell command of ``config``: parameters and ``builtins`` substituted, quoted."""
        params = self.params()
        values = dict(builtins)
        for full, param in params.items():
            text = shlex.quote(param.format(config[full]))
            values[full] = values[param.name] = text
        return render(self.info["command"], values)

    def describe(self, config: Config) -> list[str]:
        builtins = {name: f'"$CNN_MELLIN_{name.upper()}"' for name in BUILTINS}
        if self.info.get("data_dir"):
            builtins["data_dir"] = shlex.quote(self.info["data_dir"])
        return [f"command: {self.command_line(config, builtins)}", f"in: {self.info['cwd']}"]

    def max_epochs(self, config: Config, searched: list[str]) -> int | None:
        return None

    def run(self, config: Config, context: TrialContext) -> TaskResult:
        state, attempt = trial_folders(context.checkpoint_dir, context.trial_number)
        metrics, params_file = attempt / "metrics.jsonl", attempt / "params.json"
        metrics.unlink(missing_ok=True)
        values = {p.name: config[f"{GROUP}.{p.name}"] for p in self.params().values()}
        params_file.write_text(json.dumps(values, indent=1) + "\n")
        env = script_environment(context, state, metrics, params_file, self.info.get("data_dir"))
        builtins = {
            "trial": str(context.trial_number), "checkpoint_dir": shlex.quote(str(state)),
            "metrics": shlex.quote(str(metrics)), "params": shlex.quote(str(params_file)),
            "device": shlex.quote(env["CNN_MELLIN_DEVICE"]),
            "data_dir": shlex.quote(self.info.get("data_dir") or ""),
        }
        line = self.command_line(config, builtins)
        log = attempt / "output.log"
        context.record("command_log", str(log))
        context.record("command_line", line)
        grace = float(self.info.get("stop_grace", 10.0))
        earlier = self._earlier_values(context)
        reader = MetricsReader(metrics, self.info["metric"])
        process = start_guarded(line, grace, self.info["cwd"], env, log)
        peak = [0, "resident memory of the process tree"]
        try:
            code = self._watch(process, reader, context, peak)
            for step, value in reader.read(final=True):
                context.report(step, value)
        finally:
            if process.poll() is None or group_pids(process.pid):
                stop_group(process.pid, grace, process.poll)
            process.poll()
            if peak[0]:
                context.record_peak(peak[0], peak[1])
        if code != 0:
            self._failed(code, log)
        if not reader.values and not earlier:
            seen = ", ".join(sorted(reader.keys)) or "none"
            raise PruneTrial(
                f"no metrics line had the key {self.info['metric']!r} (lines: {reader.lines}, "
                f"keys seen: {seen}); the script writes them to $CNN_MELLIN_METRICS",
                "metrics",
            )
        steps = dict(earlier)
        steps.update(reader.values)  # a resumed script may report an epoch again
        reported = [steps[step] for step in sorted(steps)]
        if self.info.get("objective") == "best":
            value = min(reported) if self.direction == "minimize" else max(reported)
        else:
            value = reported[-1]
        first = reader.values[0][0] if reader.values else max(steps) + 1
        return TaskResult(
            value=value, epochs=max(steps), peak_bytes=peak[0] or None, peak_method=peak[1],
            resumed_from_epoch=first - 1 if first > 1 else None,
            attrs={"command_exit": code},
        )

    def _earlier_values(self, context: TrialContext) -> list[tuple[int, float]]:
        """Report again what earlier attempts of this trial wrote (a worker killed between
        the script's line and its own report lost it); returns those (step, value)."""
        values = earlier_values(context.checkpoint_dir, context.trial_number, self.info["metric"])
        for step in sorted(values):
            context.report(step, values[step])
        return sorted(values.items())

    def _watch(self, process, reader, context: TrialContext, peak: list) -> int:
        started = time.monotonic()
        timeout = self.info.get("timeout")
        limit = context.mem_limit_bytes
        next_memory = 0.0
        while True:
            try:
                code = process.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                code = None
            for step, value in reader.read():
                context.report(step, value)
            now = time.monotonic()
            if code is not None:
                return code
            if now >= next_memory:
                next_memory = now + _MEMORY_EVERY_S
                used, method = group_memory(process.pid, context.device)
                if used > peak[0]:
                    peak[0], peak[1] = used, method
                if limit is not None and used > limit:
                    raise MemoryExceeded(
                        f"the command used {used} bytes ({method}), over the limit of {limit} "
                        "bytes; stopped", used, method,
                    )
            if timeout is not None and now - started > timeout:
                raise PruneTrial(f"stopped after the --timeout of {timeout:g} s", "timeout")

    @staticmethod
    def _failed(code: int, log: Path) -> None:
        try:
            tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            tail = []
        last = " ".join(tail[-1].split())[:300] if tail else "no output"
        if code in (126, 127):
            raise CommandFailed(f"the command could not run (exit {code}): {last}")
        if code > 128:
            try:
                name = signal.Signals(code - 128).name
            except ValueError:
                name = f"signal {code - 128}"
            raise PruneTrial(f"the command was killed by {name}: {last}", "exit")
        raise PruneTrial(f"the command exited with status {code}: {last}", "exit")
