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
guard process (this package run with ``--guard``): pruning, ``--timeout``, a stopped
worker, or a worker that died outright all end the whole group (SIGTERM, then SIGKILL
after ``--stop-grace`` seconds). The group's peak memory is recorded (resident memory;
GPU memory through NVML when ``pynvml`` is installed); over the study's limit the script
is stopped and the trial pruned as ``memory``. stdout and stderr go to files in the
trial's folder, recorded in the trial (``command_log``).

Modules: :mod:`.spec` (the space ``.ini`` and the command template), :mod:`.process`
(starting, measuring and stopping the script's process group), :mod:`.guard` (the guard
process), :mod:`.protocol` (the script's environment and its metrics lines),
:mod:`.resume` (a trial's folders and its earlier attempts), :mod:`.task` (the task).
"""

from cnn_mellin.tasks.command.process import group_pids, stop_group
from cnn_mellin.tasks.command.spec import (
    BUILTINS,
    GROUP,
    parse_space,
    placeholders,
    read_space,
    render,
)
from cnn_mellin.tasks.command.task import CommandFailed, CommandTask

__all__ = [
    "BUILTINS", "CommandFailed", "CommandTask", "GROUP", "group_pids", "parse_space",
    "placeholders", "read_space", "render", "stop_group",
]
