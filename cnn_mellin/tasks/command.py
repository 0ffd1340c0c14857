"""The ``command`` task: tune any training script without rewriting it.

``optim init --task command --command 'python train.py --lr {lr} ...' --space space.ini``
stores the command template and the script's search space. The space is an ``.ini`` with
one section per parameter, declared as the built-in ones are (type, default, bounds,
search range, log scale, choices, doc); its parameters are named ``script.<name>``, so
``--whitelist``, ``--read-ini`` (section ``[script]``), ``important``, ``best`` and
``params --task command --space FILE`` treat them like any other::

    [lr]
    type = float
    default = 0.001
    low = 1e-8              ; hard bounds (optional)
    high = 1.0
    search = 1e-5 0.1       ; LOW HIGH (numbers), or a comma-separated list of choices
    log = true              ; log-scale range (optional); step = S (optional)
    doc = Peak learning rate.

    [optimizer]
    type = str
    default = adamw
    search = adam, adamw, sgd
    doc = Optimiser.

Per trial the command runs through ``/bin/sh -c`` in ``--cwd`` with ``{name}`` (or
``{script.name}``) replaced by the trial's value, shell-quoted, and ``{trial}``,
``{checkpoint_dir}``, ``{metrics}``, ``{params}``, ``{device}``, ``{data_dir}`` by the
trial's own; ``${VAR}`` is left to the shell. Its environment carries the same:
``CNN_MELLIN_PARAMS`` (a JSON file of the values, short names), ``CNN_MELLIN_METRICS``
(the file the script appends its metrics to, one JSON object per line, e.g.
``{"epoch": 3, "dev_per": 0.31}``), ``CNN_MELLIN_CHECKPOINT_DIR`` (the same folder for a
trial and its retries, so a script that saves there resumes after a killed worker),
``CNN_MELLIN_TRIAL``, ``CNN_MELLIN_DEVICE``, ``CUDA_VISIBLE_DEVICES``,
``CNN_MELLIN_MEM_LIMIT_BYTES`` and ``CNN_MELLIN_DATA_DIR`` when set.

Each metrics line with ``--metric`` is an intermediate value for the pruner, at its
``epoch`` (or ``step``; else its line count); the trial's value is the last such value,
or the best with ``--objective best``. The script runs as a process group under a small
guard process (this module run with ``--guard``): pruning, ``--timeout``, a stopped
worker, or a worker that died outright all end the whole group (SIGTERM, then SIGKILL
after ``--stop-grace`` seconds). The group's peak memory is recorded (resident memory;
GPU memory through NVML when ``pynvml`` is installed); over the study's limit the script
is stopped and the trial pruned as ``memory``. stdout and stderr go to files in the
trial's folder, recorded in the trial (``command_log``).
"""

from __future__ import annotations

import configparser
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cnn_mellin.config import Config, Group, Param, Search
from cnn_mellin.errors import ConfigError
from cnn_mellin.tasks.base import (
    MemoryExceeded,
    PruneTrial,
    Task,
    TaskOption,
    TaskResult,
    TrialContext,
)

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
_POLL_S = 0.1
_MEMORY_EVERY_S = 0.5


class CommandFailed(RuntimeError):
    """The command could not run at all (not found, not executable): a broken set-up."""


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


def _check_template(template: str, group: Group) -> None:
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


def _check_program(template: str, cwd: Path) -> None:
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


# -- process groups -------------------------------------------------------------------------


def _sessions() -> dict[int, tuple[int, int]]:
    """pid -> (session id, resident pages) of every process, from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found[int(entry)] = (int(fields[3]), int(fields[21]))
    return found


def group_pids(leader: int) -> list[int]:
    """The processes of the session ``leader`` started (the guard and the script's tree)."""
    return sorted(pid for pid, (sid, _) in _sessions().items() if sid == leader)


def _resident_bytes(leader: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    return sum(
        rss * page for pid, (sid, rss) in _sessions().items() if sid == leader and pid != leader
    )


def _gpu_bytes(pids: set[int]) -> int | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        total = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in pids and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
        return total
    except pynvml.NVMLError:
        return None


def stop_group(leader: int, grace_s: float, reap=None) -> None:
    """SIGTERM the process group of ``leader``, SIGKILL whatever is left after ``grace_s``.

    ``reap`` (e.g. ``Popen.poll``) is called while waiting so that an exited leader does
    not linger as a zombie that keeps the group alive.
    """
    def alive() -> bool:
        if reap is not None:
            reap()
        try:
            os.killpg(leader, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return bool(group_pids(leader))

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(leader, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not alive():
                return
            time.sleep(0.05)


def _guard(grace_s: float, argv: list[str]) -> int:
    """Run ``argv`` in this (new) process group; end the group when told or orphaned.

    The worker that started this guard may be killed outright (SIGKILL): then this guard
    is re-parented, notices, and stops the script's whole group, so nothing is left behind.
    """
    if os.getsid(0) != os.getpid():  # not started as a session leader: become one, so that
        try:  # stopping "the group" can never reach the caller's own processes
            os.setsid()
        except PermissionError:
            sys.stderr.write("cnn-mellin: the guard must start a session of its own (run it "
                             "with start_new_session=True)\n")
            return 2
    parent = os.getppid()
    stopping = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stopping.append(signum))
    child = subprocess.Popen(argv)
    while True:
        try:
            code = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if stopping or os.getppid() != parent:
            _stop_others(grace_s, child)
            code = child.wait()
            break
    _stop_others(grace_s, None)  # helpers the script left running
    return code if code >= 0 else 128 - code


def _stop_others(grace_s: float, child) -> None:
    me = os.getpid()
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        others = [p for p in group_pids(os.getsid(0)) if p != me]
        if not others:
            return
        for pid in others:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if child is not None:
                child.poll()
            if not [p for p in group_pids(os.getsid(0)) if p != me]:
                return
            time.sleep(0.05)


# -- metrics ---------------------------------------------------------------------------------


class _MetricsReader:
    """Reads the complete lines appended to a metrics file since the last call."""

    def __init__(self, path: Path, metric: str):
        self.path = path
        self.metric = metric
        self._offset = 0
        self._partial = b""
        self.lines = 0
        self.values: list[tuple[int, float]] = []
        self.keys: set[str] = set()

    def read(self, final: bool = False) -> list[tuple[int, float]]:
        """New (step, value) pairs; PruneTrial on a line that is not a JSON object."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        if final and self._partial.strip():
            chunks.append(self._partial)
            self._partial = b""
        new = []
        for chunk in chunks:
            text = chunk.decode("utf-8", "replace").strip()
            if not text:
                continue
            self.lines += 1
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                raise PruneTrial(
                    f"metrics line {self.lines} is not a JSON object: {text[:80]}", "metrics"
                )
            self.keys.update(record)
            if self.metric not in record:
                continue
            value = record[self.metric]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PruneTrial(
                    f"metrics line {self.lines}: {self.metric} is {value!r}, not a number",
                    "metrics",
                )
            step = record.get("epoch", record.get("step"))
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                step = len(self.values) + 1
            self.values.append((step, float(value)))
            new.append((step, float(value)))
        return new


# -- the task ----------------------------------------------------------------------------------


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
        _check_template(template, group)
        cwd = Path(os.path.abspath(options.get("cwd") or "."))
        if not cwd.is_dir():
            raise ConfigError(f"--cwd {cwd}: no such directory")
        _check_program(template, cwd)
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
        attempt = context.checkpoint_dir / f"attempt-{context.trial_number}"
        state = context.checkpoint_dir / "checkpoint"
        state.mkdir(parents=True, exist_ok=True)
        attempt.mkdir(parents=True, exist_ok=True)
        metrics, params_file = attempt / "metrics.jsonl", attempt / "params.json"
        metrics.unlink(missing_ok=True)
        values = {p.name: config[f"{GROUP}.{p.name}"] for p in self.params().values()}
        params_file.write_text(json.dumps(values, indent=1) + "\n")
        env = self._environment(context, state, metrics, params_file)
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
        reader = _MetricsReader(metrics, self.info["metric"])
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "cnn_mellin.tasks.command", "--guard", str(grace),
                 "/bin/sh", "-c", line],
                cwd=self.info["cwd"], env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
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
        values: dict[int, float] = {}
        attempts = sorted(
            (int(d.name.split("-", 1)[1]), d) for d in context.checkpoint_dir.glob("attempt-*")
            if d.name.split("-", 1)[1].isdigit() and d.name != f"attempt-{context.trial_number}"
        )
        for _, folder in attempts:
            reader = _MetricsReader(folder / "metrics.jsonl", self.info["metric"])
            try:
                reader.read(final=True)
            except PruneTrial:  # that attempt's own problem; keep what it reported before
                pass
            values.update(reader.values)
        for step in sorted(values):
            context.report(step, values[step])
        return sorted(values.items())

    def _environment(self, context, state: Path, metrics: Path, params_file: Path) -> dict:
        env = dict(os.environ)
        env.update({
            "CNN_MELLIN_PARAMS": str(params_file), "CNN_MELLIN_METRICS": str(metrics),
            "CNN_MELLIN_CHECKPOINT_DIR": str(state), "CNN_MELLIN_TRIAL": str(context.trial_number),
        })
        device = context.device
        if device.startswith("cuda"):
            index = device.partition(":")[2] or "0"
            visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
            if visible and index.isdigit() and int(index) < len(visible):
                index = visible[int(index)]
            env["CUDA_VISIBLE_DEVICES"] = index
            env["CNN_MELLIN_DEVICE"] = "cuda"
        else:
            env["CNN_MELLIN_DEVICE"] = device
            if device == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
        if context.mem_limit_bytes is not None:
            env["CNN_MELLIN_MEM_LIMIT_BYTES"] = str(context.mem_limit_bytes)
        if self.info.get("data_dir"):
            env["CNN_MELLIN_DATA_DIR"] = self.info["data_dir"]
        torch = sys.modules.get("torch")  # a worker of a pool shares the cores: so does its script
        if "OMP_NUM_THREADS" not in os.environ and torch is not None:
            env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
        return env

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
                used, method = self._memory(process.pid, context.device)
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
    def _memory(leader: int, device: str) -> tuple[int, str]:
        if device.startswith("cuda"):
            gpu = _gpu_bytes(set(group_pids(leader)))
            if gpu is not None:
                return gpu, "GPU memory of the process tree (NVML)"
        return _resident_bytes(leader), "resident memory of the process tree"

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


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "--guard":
        sys.exit("usage: python -m cnn_mellin.tasks.command --guard GRACE_S ARGV...")
    sys.exit(_guard(float(sys.argv[2]), sys.argv[3:]))
