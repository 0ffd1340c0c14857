"""The hyperparameter-search service on shared Optuna studies (``cnn-mellin optim``).

One module per concern: :mod:`storage` (URL → storage), :mod:`serve` (the storage proxy),
:mod:`space` (search space), :mod:`study` (init and stored settings), :mod:`feasible`
(draws that fit before a trial exists), :mod:`budget` (exact budget, retries),
:mod:`heartbeat` (dead-worker detection), :mod:`worker` (the run loop), with
:mod:`algorithms` (samplers, pruners), :mod:`admission` (memory), :mod:`outcome` (a trial's
end), :mod:`stop` (SIGTERM/SIGINT) and :mod:`launch` (starting workers), :mod:`pool`,
:mod:`standby` and :mod:`gpushare` (workers sharing a machine),
:mod:`importance`, :mod:`best`, :mod:`stage`, :mod:`status`, :mod:`progress`,
:mod:`report`. The public names below
are imported on first use, so that ``cnn-mellin --help`` does not load Optuna.
"""

import importlib

_PUBLIC = {
    "DEFAULT_JOURNAL": "storage", "StorageError": "storage", "display_url": "storage",
    "load_study": "storage", "open_storage": "storage",
    "StudySettings": "study", "build_settings": "study", "init_study": "study",
    "read_settings": "study",
    "Worker": "worker", "run_worker": "launch", "run_workers": "launch",
    "important_text": "importance", "best_text": "best", "study_status": "status",
    "write_report": "report",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
