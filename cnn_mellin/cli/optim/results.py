"""``optim important``, ``best``, ``status`` and ``report``: reading a study's results."""

from __future__ import annotations

import sys

from cnn_mellin.cli.optim.common import emit, integer, open_study, quiet_optuna, seconds


def register_important(actions) -> None:
    """``important [OUT]``: parameters by importance."""
    from cnn_mellin.optim.defaults import EVALUATORS

    important = actions.add_parser(
        "important", help="searched parameters by importance, one per line",
        description="Rank the searched parameters by importance over completed trials "
        "(fANOVA by default, fixed seed: the same study gives the same output) and write "
        "their names, one per line, most important first.",
    )
    which = important.add_mutually_exclusive_group()
    which.add_argument("--top-k", type=integer, default=None, metavar="K",
                       help="keep the K most important")
    which.add_argument("--threshold", type=float, default=None, metavar="X",
                       help="keep those with normalised importance >= X")
    important.add_argument("--evaluator", choices=EVALUATORS, default="fanova",
                           help="importance evaluator (default fanova)")
    important.add_argument("out", nargs="?", default="-", metavar="OUT",
                           help="output file, or - for standard output (default)")
    important.set_defaults(func=run_important, needs_device=False)


def register_best(actions) -> None:
    """``best [OUT.ini]``: the best configuration."""
    best = actions.add_parser(
        "best", help="the best configuration as an .ini",
        description="Write the best trial's full configuration as an .ini readable by "
        "--read-ini; with --independent, each searched parameter's value with the lowest "
        "median error, repaired into a valid combination.",
    )
    best.add_argument("--independent", action="store_true",
                      help="choose each searched parameter on its own (lowest median error), "
                      "then fit the study's memory limit with the best trial's values")
    best.add_argument("out", nargs="?", default="-", metavar="OUT.ini",
                      help="output file, or - for standard output (default)")
    best.set_defaults(func=run_best, needs_device=False)


def register_status(actions) -> None:
    """``status [--json | --watch [SECONDS]]``."""
    status = actions.add_parser(
        "status", help="progress against the budget, best trial, running trials, failures",
        description="Show the study's progress against its budget, the best trial, running "
        "trials and every failure and prune. With --watch, redraw the progress (done, "
        "running, waiting, failed, best so far, ETA from the finished trials' durations) "
        "every SECONDS until the budget is done or Ctrl-C; not on a terminal, one line each "
        "time.",
    )
    shown = status.add_mutually_exclusive_group()
    shown.add_argument("--json", action="store_true", help="print JSON instead of text")
    shown.add_argument("--watch", nargs="?", type=seconds, const=5.0, default=None,
                       metavar="SECONDS", help="redraw the progress every SECONDS (default 5)")
    status.set_defaults(func=run_status, needs_device=False)


def register_report(actions) -> None:
    """``report OUT_DIR [--studies NAME...] [--no-png]``."""
    report = actions.add_parser(
        "report", help="index.html (figures also as PNG) and trials.csv into OUT_DIR",
        description="Write into OUT_DIR one page, index.html, that tells how the study went "
        "(budget, best trial and its configuration, stage lineage, history, importance as "
        "'important' ranks it, parallel coordinates, learning curves, memory, prune and "
        "failure reasons, a timeline per worker); it works opened from disk, offline. Each "
        "figure is also written as a PNG (needs a Chrome or Chromium; without one, a warning "
        "and no PNG), the trials as trials.csv.",
    )
    report.add_argument("out_dir", metavar="OUT_DIR",
                        help="folder to write; an earlier report there is replaced, any other "
                        "non-empty folder refused")
    report.add_argument("--studies", nargs="+", default=None, metavar="NAME",
                        help="report on several studies of DB_URL in one page, in this order "
                        "(e.g. the sm, md and lg stages of a search), instead of "
                        "--study-name; give OUT_DIR first: report OUT_DIR --studies A B")
    report.add_argument("--no-png", action="store_true",
                        help="write no PNG (skips starting a browser)")
    report.set_defaults(func=run_report, needs_device=False)


def run_important(args, config) -> int:
    """``important``: rank the searched parameters."""
    from cnn_mellin.optim.importance import important_text, ranked_trials, trust_note

    study, settings = open_study(args)
    emit(important_text(study, settings, top_k=args.top_k, threshold=args.threshold,
                        evaluator=args.evaluator), args.out)
    # standard output holds the names alone (the recipe reads them back as a whitelist)
    sys.stderr.write(f"{study.study_name}: {trust_note(len(ranked_trials(study)))}\n")
    return 0


def run_best(args, config) -> int:
    """``best``: write the best configuration."""
    from cnn_mellin.optim.best import best_text

    study, settings = open_study(args)
    emit(best_text(study, settings, settings.build_task(), independent=args.independent),
         args.out)
    return 0


def run_status(args, config) -> int:
    """``status``: print the progress once, or watch it."""
    from cnn_mellin.optim.status import format_status, status_json, study_status

    study, settings = open_study(args)
    if args.watch is not None:
        from cnn_mellin.optim.progress import watch

        return watch(study, settings.num_trials, args.watch)
    status = study_status(study, settings)
    sys.stdout.write(status_json(status) if args.json else format_status(status))
    return 0


def run_report(args, config) -> int:
    """``report``: write the report page on one or several studies."""
    from cnn_mellin.errors import ConfigError
    from cnn_mellin.optim.report import write_report
    from cnn_mellin.optim.storage import display_url, load_study, open_storage
    from cnn_mellin.optim.study import read_settings

    if args.studies and args.study_name:
        raise ConfigError("give --study-name (one study) or report --studies (several), not both")
    names = args.studies or [args.study_name]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"--studies names {repeated[0]} more than once")
    quiet_optuna(args)
    storage = open_storage(args.db_url)
    studies = []
    for name in names:
        study = load_study(storage, name, args.db_url)
        studies.append((study, read_settings(study)))
    for path in write_report(studies, args.out_dir, storage=display_url(args.db_url),
                             png=not args.no_png):
        sys.stdout.write(f"{path}\n")
    return 0
