"""``cnn-mellin optim [--study-name NAME] DB_URL ACTION``: the hyperparameter search.

The ``optim`` command and its ``DB_URL`` are here; each action's parser and handler live
together in a module per group of actions: :mod:`.study` (``init``, ``stage``, ``grow``),
:mod:`.run` (``run``), :mod:`.results` (``important``, ``best``, ``status``, ``report``)
and :mod:`.serve` (``serve``), with :mod:`.common` (argument types, opening the study).
"""

from __future__ import annotations

from cnn_mellin.cli.optim import results, run, serve, study

_URL_HELP = (
    "the study database: postgresql+psycopg2://USER@HOST/DB, mysql+pymysql://USER@HOST/DB "
    "(?read_default_file=~/.my.cnf works), sqlite:///PATH, a journal file path for the "
    "embedded one-machine store, 'default' (exp/optim/studies.journal), or grpc://HOST:PORT "
    "(a storage proxy: 'optim DB_URL serve')"
)


def register(commands) -> None:
    """Add the ``optim`` command and its actions (in the order ``--help`` lists them)."""
    parser = commands.add_parser(
        "optim", help="hyperparameter search on a shared Optuna study",
        description="Create a study, run workers on it, and read its results. Studies are "
        "ordinary Optuna studies: 'optuna trials --study-name NAME --storage URL' works.",
    )
    parser.add_argument(
        "--study-name", default=None, metavar="NAME",
        help="study to use (init default: <stem of the last --read-ini>-<feature>, e.g. "
        "model-mcorr-sm-fbank-81-10ms; other commands: the only study in DB_URL)",
    )
    parser.add_argument("db_url", metavar="DB_URL", help=_URL_HELP)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    study.register_init(actions)
    study.register_stage(actions)
    study.register_grow(actions)
    run.register_run(actions)
    results.register_important(actions)
    results.register_best(actions)
    results.register_status(actions)
    results.register_report(actions)
    serve.register_serve(actions)
