"""``cnn-mellin optim [--study-name NAME] DB_URL init|run|important|best|status|report|serve``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cnn_mellin.files import write_text_atomic

_URL_HELP = (
    "the study database: postgresql+psycopg2://USER@HOST/DB, mysql+pymysql://USER@HOST/DB "
    "(?read_default_file=~/.my.cnf works), sqlite:///PATH, a journal file path for the "
    "embedded one-machine store, 'default' (exp/optim/studies.journal), or grpc://HOST:PORT "
    "(a storage proxy: 'optim DB_URL serve')"
)


def _int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


def register(commands) -> None:
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
    _register_init(actions)
    _register_stage(actions)
    grow = actions.add_parser(
        "grow", help="add N trials to the study's budget",
        description="Raise the study's budget by N trials (e.g. 128 more after a first "
        "round): N fresh trials are enqueued and the study's num_trials grows by N. Workers "
        "still running take them; start new ones if all have left. Each call adds N again.",
    )
    grow.add_argument("more", type=_int, metavar="N", help="how many trials to add (>= 1)")
    grow.set_defaults(func=run_grow, needs_device=False)
    _register_run(actions)
    _register_important(actions)
    _register_best(actions)
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
    shown.add_argument("--watch", nargs="?", type=_seconds, const=5.0, default=None,
                       metavar="SECONDS", help="redraw the progress every SECONDS (default 5)")
    status.set_defaults(func=run_status, needs_device=False)
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
    _register_serve(actions)


def _register_serve(actions) -> None:
    from cnn_mellin.optim.defaults import PROXY_PORT, PROXY_THREADS

    serve = actions.add_parser(
        "serve", help="run Optuna's gRPC storage proxy in front of DB_URL (for 100+ workers)",
        description="Run Optuna's gRPC storage proxy for the PostgreSQL or MySQL/MariaDB "
        "database DB_URL until SIGTERM or Ctrl-C: workers and every other optim command "
        "then use grpc://HOST:PORT as their DB_URL, and only the proxy connects to the "
        "database (at most --threads connections). The database and Optuna's tables are "
        "created if missing. No authentication: whoever reaches the port can read and write "
        "the studies.",
    )
    serve.add_argument("--host", default="localhost",
                       help="address to listen on (default localhost; 0.0.0.0 for workers "
                       "on other machines)")
    serve.add_argument("--port", type=_int, default=PROXY_PORT,
                       help=f"port to listen on (default {PROXY_PORT}; 0: any free port, "
                       "see --address-file)")
    serve.add_argument("--threads", type=_int, default=PROXY_THREADS, metavar="N",
                       help=f"threads serving calls, each with at most one database "
                       f"connection (default {PROXY_THREADS})")
    serve.add_argument("--address-file", default=None, metavar="FILE",
                       help="write grpc://HOST:PORT there once listening (removed on exit): "
                       "how worker jobs find the proxy job")
    serve.set_defaults(func=run_serve, needs_device=False)


def _register_init(actions) -> None:
    init = actions.add_parser(
        "init", help="create the study (validated; same arguments again: no-op)",
        description="Validate the data and the search space, then create the study with its "
        "base configuration (from the global --read-ini), searched parameters, budget and "
        "limits. Parameters that cannot matter given the base configuration are dropped with "
        "a warning. Re-running with the same arguments does nothing; with different ones it "
        "is an error. A MySQL/PostgreSQL database that does not exist yet is created. Each "
        "task adds options of its own (below).",
    )
    _add_init_arguments(init)
    init.set_defaults(func=run_init, needs_device=False)


def _add_init_arguments(init, whitelist: bool = True) -> None:
    from cnn_mellin.cli.task_options import add_task_arguments
    from cnn_mellin.optim.defaults import (
        DEFAULT_HEARTBEAT_S,
        DEFAULT_MAX_RETRIES,
        DEFAULT_NUM_TRIALS,
        PRUNERS,
    )

    init.add_argument("data_dir", metavar="DATA_DIR", nargs="?", default=None,
                      help="the task's data: for asr the training data (a folder with "
                      "feats.h5), the dev part split off it by --dev-proportion")
    if whitelist:
        which = init.add_mutually_exclusive_group()
        which.add_argument("--blacklist", nargs="+", default=[], metavar="RE",
                           help="do not search parameters whose full name matches one of these")
        which.add_argument("--whitelist", nargs="+", default=None, metavar="RE",
                           help="search only parameters whose full name matches one of these")
    init.add_argument("--num-data-workers", type=_int, default=0, metavar="N",
                      help="data-loader processes per trial (default 0; at most the CPUs a "
                      "worker's job has)")
    init.add_argument("--mem-limit-bytes", type=_int, default=None, metavar="N",
                      help="device memory one trial may use; larger configurations are pruned "
                      "before training (default: no limit)")
    init.add_argument("--num-trials", type=_int, default=DEFAULT_NUM_TRIALS,
                      metavar="N", help="trials in COMPLETE or PRUNED the study ends with "
                      f"(default {DEFAULT_NUM_TRIALS})")
    init.add_argument("--max-trial-seconds", type=float, default=None, metavar="S",
                      help="a trial still running after S seconds of its attempt is pruned "
                      "at its next report (prune kind timeout; the base configuration never "
                      "is; default: no limit)")
    init.add_argument("--max-trial-time-ratio", type=float, default=None, metavar="R",
                      help="a trial that took more than R times as long as the base "
                      "configuration's trial to reach an epoch is pruned there (prune kind "
                      "timeout): a limit that travels between machines (default: none)")
    init.add_argument("--pruner", choices=PRUNERS, default="hyperband",
                      help="early stopping of poor trials, decided from half the epochs on "
                      "(default hyperband: one rung at half, keeps the best third)")
    init.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                      help="where trials keep epoch checkpoints for resuming after a worker "
                      "dies (default exp/optim/checkpoints/NAME)")
    init.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_S,
                      metavar="S", help=f"seconds between worker heartbeats (default "
                      f"{DEFAULT_HEARTBEAT_S:g})")
    init.add_argument("--heartbeat-grace", type=float, default=None, metavar="S",
                      help="seconds without a heartbeat before a worker counts as dead "
                      "(default 3 intervals)")
    init.add_argument("--max-retries", type=_int, default=DEFAULT_MAX_RETRIES, metavar="N",
                      help="retries of a trial whose worker died (default %(default)s)")
    add_task_arguments(init)


def _register_stage(actions) -> None:
    from cnn_mellin.optim.defaults import EVALUATORS

    stage = actions.add_parser(
        "stage", help="important -> best -> init: the next stage from FROM_STUDY, with lineage",
        description="Start the next stage of a search from FROM_STUDY in one command: rank its "
        "parameters ('important'), write the kept ones to CONF_DIR/NAME.params and its best "
        "configuration to CONF_DIR/NAME.ini ('best'), then 'init' the study NAME (--study-name, "
        "required) with --read-ini CONF_DIR/NAME.ini (then the global --read-ini files) and "
        "--whitelist of the kept parameters. Same files and study as the three commands; the "
        "new study records its lineage (parent, kept parameters with their importance, carried "
        "values), which 'status' and 'report' show.",
    )
    stage.add_argument("from_study", metavar="FROM_STUDY", help="the earlier stage's study")
    which = stage.add_mutually_exclusive_group(required=True)
    which.add_argument("--top-k", type=_int, default=None, metavar="K",
                       help="keep the K most important parameters")
    which.add_argument("--threshold", type=float, default=None, metavar="X",
                       help="keep those with normalised importance >= X")
    carry = stage.add_mutually_exclusive_group()
    carry.add_argument("--independent", action="store_true",
                       help="carry each parameter's value with the lowest median error "
                       "(best --independent) instead of the best trial's")
    carry.add_argument("--from-base", action="store_true",
                       help="carry FROM_STUDY's base configuration instead of its best "
                       "trial's; the new stage tries that base first, then the base with "
                       "the best trial's values of the kept parameters: for an earlier "
                       "stage whose trials are long enough to rank parameters but too short "
                       "to choose a configuration")
    stage.add_argument("--evaluator", choices=EVALUATORS, default="fanova",
                       help="importance evaluator (default fanova)")
    stage.add_argument("--conf-dir", default="exp/conf", metavar="DIR",
                       help="where NAME.params and NAME.ini go (default exp/conf)")
    _add_init_arguments(stage, whitelist=False)
    stage.set_defaults(func=run_stage, needs_device=False)


def _register_run(actions) -> None:
    from cnn_mellin.optim.defaults import DEFAULT_MAX_OUTAGE_S, SAMPLERS

    run = actions.add_parser(
        "run", help="run a worker (or --workers K) until the study's budget is done",
        description="Pull trials from the study until it has its number of trials in "
        "COMPLETE or PRUNED, counted across all workers. Trials of workers that die are "
        "failed and retried from their last epoch checkpoint. SIGTERM/SIGINT re-enqueue the "
        "running trial before exiting (an asr trial first checkpoints the optimiser step it "
        "is at; its retry resumes there). A worker with nothing left to claim exits unless "
        "it is the one standing by for retries of trials still running. Threads: the job's "
        "CPU allocation (SLURM_CPUS_PER_TASK, CPU affinity).",
    )
    run.add_argument("--sampler", choices=SAMPLERS, default="random",
                     help="how parameters are chosen (default random)")
    run.add_argument("--workers", type=_int, default=1, metavar="K",
                     help="worker processes to start here (default 1); with --device cuda "
                     "and several GPUs they are spread over them")
    run.add_argument("--max-trials", type=_int, default=None, metavar="N",
                     help="stop each worker after N trials (default: until the budget is done)")
    run.add_argument("--max-outage", type=float, default=DEFAULT_MAX_OUTAGE_S, metavar="S",
                     help="how long a worker keeps retrying when it loses the database "
                     "(a server restart) before it stops with an error; its trial is then "
                     f"retried by another worker (default {DEFAULT_MAX_OUTAGE_S:g})")
    run.add_argument("--keep-checkpoints", action="store_true",
                     help="keep every trial's resume files (default: a trial that ended "
                     "COMPLETE or PRUNED keeps only what its results point to, e.g. asr's "
                     "model.pt)")
    run.add_argument("--data-dir", default=None, metavar="DIR",
                     help="the study's data folder as this machine sees it (joining from "
                     "another cluster; the data must be the same: it is checked)")
    run.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                     help="where this worker keeps trial checkpoints instead of the folder "
                     "recorded at init (joining from another cluster)")
    run.set_defaults(func=run_run, needs_device=True)


def _register_important(actions) -> None:
    from cnn_mellin.optim.defaults import EVALUATORS

    important = actions.add_parser(
        "important", help="searched parameters by importance, one per line",
        description="Rank the searched parameters by importance over completed trials "
        "(fANOVA by default, fixed seed: the same study gives the same output) and write "
        "their names, one per line, most important first.",
    )
    which = important.add_mutually_exclusive_group()
    which.add_argument("--top-k", type=_int, default=None, metavar="K",
                       help="keep the K most important")
    which.add_argument("--threshold", type=float, default=None, metavar="X",
                       help="keep those with normalised importance >= X")
    important.add_argument("--evaluator", choices=EVALUATORS, default="fanova",
                           help="importance evaluator (default fanova)")
    important.add_argument("out", nargs="?", default="-", metavar="OUT",
                           help="output file, or - for standard output (default)")
    important.set_defaults(func=run_important, needs_device=False)


def _register_best(actions) -> None:
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


def _emit(text: str, out: str) -> None:
    if out == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)


def _quiet_optuna(args) -> None:
    """Optuna's own INFO lines ("A new study created ...") only with --verbose."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.DEBUG if args.verbose else optuna.logging.WARNING)


def _open(args):
    from cnn_mellin.optim.storage import load_study, open_storage
    from cnn_mellin.optim.study import read_settings

    _quiet_optuna(args)
    study = load_study(open_storage(args.db_url), args.study_name, args.db_url)
    return study, read_settings(study)


def _settings(args, config, name, whitelist, blacklist):
    """``init``'s settings from its arguments (validated, nothing written)."""
    from cnn_mellin.cli.task_options import task_options
    from cnn_mellin.optim.study import build_settings

    _, options = task_options(args)
    options.pop("data_dir")
    settings = build_settings(
        config, args.data_dir, task=args.task, task_options=options,
        whitelist=whitelist, blacklist=blacklist, num_trials=args.num_trials,
        mem_limit_bytes=args.mem_limit_bytes, pruner=args.pruner,
        num_data_workers=args.num_data_workers,
        checkpoint_dir=args.checkpoint_dir or Path("exp/optim/checkpoints") / name,
        heartbeat_interval=args.heartbeat_interval, heartbeat_grace=args.heartbeat_grace,
        max_retries=args.max_retries, max_trial_seconds=args.max_trial_seconds,
        max_trial_time_ratio=args.max_trial_time_ratio,
    )
    from cnn_mellin.optim.feasible import check_space

    # refuses a space where nothing fits; _report_init prints the share that does
    args.feasible = check_space(settings, args.device or "cpu", seed=args.seed or 0)
    return settings


def run_init(args, config) -> int:
    from cnn_mellin.optim.study import default_study_name, init_study

    _quiet_optuna(args)
    name = args.study_name or default_study_name(args.data_dir, args.read_ini, args.task)
    settings = _settings(args, config, name, args.whitelist, args.blacklist)
    _report_init(args, name, settings, init_study(args.db_url, name, settings))
    return 0


def _report_init(args, name, settings, result) -> None:
    from cnn_mellin.optim.storage import display_url

    where = display_url(args.db_url)
    if result.created_database:
        sys.stdout.write(f"created database {result.created_database} ({where})\n")
    if result.created:
        sys.stdout.write(
            f"created study {name} in {where}: {settings.num_trials} trials, searching "
            f"{len(settings.searched)} parameters\n"
        )
    else:
        sys.stdout.write(f"study {name} in {where} already has these settings; nothing to do\n")
    if getattr(args, "feasible", None) is not None:
        sys.stdout.write(f"feasible: {args.feasible.describe()}\n")


def run_grow(args, config) -> int:
    from cnn_mellin.errors import ConfigError
    from cnn_mellin.optim.budget import grow

    if args.more < 1:
        raise ConfigError(f"grow needs N >= 1 more trials, got {args.more}")
    study, _ = _open(args)
    old, new = grow(study, args.more)
    sys.stdout.write(f"study {study.study_name}: budget raised from {old} to {new} trials\n")
    return 0


def run_stage(args, config) -> int:
    from cnn_mellin.cli.task_options import config_groups
    from cnn_mellin.errors import ConfigError
    from cnn_mellin.optim.stage import run_stage as stage

    _quiet_optuna(args)
    if args.study_name is None:
        raise ConfigError("stage needs --study-name: the name of the new stage's study")
    result = stage(
        args.db_url, args.from_study, args.study_name, conf_dir=args.conf_dir,
        build=lambda carried, kept: _settings(args, carried, args.study_name, kept, []),
        read_ini=args.read_ini, groups=config_groups(args), top_k=args.top_k,
        threshold=args.threshold, independent=args.independent, evaluator=args.evaluator,
        from_base=args.from_base, device=args.device or "cpu",
    )
    sys.stdout.write(f"{result.params_path}\n{result.ini_path}\n")
    _report_init(args, args.study_name, result.init.settings, result.init)
    return 0


def run_run(args, config) -> int:
    _quiet_optuna(args)
    if not sys.stderr.isatty():  # logs and pipes get the log lines only
        return _run(args)
    from cnn_mellin.optim.progress import RunBar

    with RunBar(args.db_url, args.study_name):
        return _run(args)


def _run(args) -> int:
    from cnn_mellin.optim.launch import run_worker, run_workers

    folders = {"keep_checkpoints": args.keep_checkpoints, "data_dir": args.data_dir,
               "checkpoint_dir": args.checkpoint_dir}
    if args.workers != 1:  # run_workers refuses fewer than one
        return run_workers(
            args.workers, args.db_url, args.study_name, device=args.device,
            sampler=args.sampler, seed=args.seed, max_trials=args.max_trials,
            max_outage_s=args.max_outage, verbose=args.verbose, **folders,
        )
    summary = run_worker(
        args.db_url, args.study_name, device=args.device, sampler=args.sampler,
        seed=args.seed, max_trials=args.max_trials, max_outage_s=args.max_outage, **folders,
    )
    return summary.exit_code


def run_important(args, config) -> int:
    from cnn_mellin.optim.importance import important_text, ranked_trials, trust_note

    study, settings = _open(args)
    _emit(important_text(study, settings, top_k=args.top_k, threshold=args.threshold,
                         evaluator=args.evaluator), args.out)
    # standard output holds the names alone (the recipe reads them back as a whitelist)
    sys.stderr.write(f"{study.study_name}: {trust_note(len(ranked_trials(study)))}\n")
    return 0


def run_best(args, config) -> int:
    from cnn_mellin.optim.best import best_text

    study, settings = _open(args)
    _emit(best_text(study, settings, settings.build_task(), independent=args.independent),
          args.out)
    return 0


def run_status(args, config) -> int:
    from cnn_mellin.optim.status import format_status, status_json, study_status

    study, settings = _open(args)
    if args.watch is not None:
        from cnn_mellin.optim.progress import watch

        return watch(study, settings.num_trials, args.watch)
    status = study_status(study, settings)
    sys.stdout.write(status_json(status) if args.json else format_status(status))
    return 0


def run_serve(args, config) -> int:
    from cnn_mellin.optim.serve import serve

    _quiet_optuna(args)
    return serve(args.db_url, host=args.host, port=args.port, threads=args.threads,
                 address_file=args.address_file)


def run_report(args, config) -> int:
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
    _quiet_optuna(args)
    storage = open_storage(args.db_url)
    studies = []
    for name in names:
        study = load_study(storage, name, args.db_url)
        studies.append((study, read_settings(study)))
    for path in write_report(studies, args.out_dir, storage=display_url(args.db_url),
                             png=not args.no_png):
        sys.stdout.write(f"{path}\n")
    return 0
