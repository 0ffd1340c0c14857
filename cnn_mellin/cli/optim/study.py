"""``optim init``, ``stage`` and ``grow``: the actions that create a study or raise its budget."""

from __future__ import annotations

import sys
from pathlib import Path

from cnn_mellin.cli.optim.common import integer, open_study, quiet_optuna


def register_init(actions) -> None:
    """``init [DATA_DIR]`` and its options."""
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
    init.add_argument("--num-data-workers", type=integer, default=0, metavar="N",
                      help="data-loader processes per trial (default 0; at most the CPUs a "
                      "worker's job has)")
    init.add_argument("--mem-limit-bytes", type=integer, default=None, metavar="N",
                      help="device memory one trial may use; larger configurations are pruned "
                      "before training (default: no limit)")
    init.add_argument("--num-trials", type=integer, default=DEFAULT_NUM_TRIALS,
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
    init.add_argument("--max-retries", type=integer, default=DEFAULT_MAX_RETRIES, metavar="N",
                      help="retries of a trial whose worker died (default %(default)s)")
    add_task_arguments(init)


def register_stage(actions) -> None:
    """``stage FROM_STUDY``: the next stage of a search."""
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
    which.add_argument("--top-k", type=integer, default=None, metavar="K",
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


def register_grow(actions) -> None:
    """``grow N``: more trials for the study's budget."""
    grow = actions.add_parser(
        "grow", help="add N trials to the study's budget",
        description="Raise the study's budget by N trials (e.g. 128 more after a first "
        "round): N fresh trials are enqueued and the study's num_trials grows by N. Workers "
        "still running take them; start new ones if all have left. Each call adds N again.",
    )
    grow.add_argument("more", type=integer, metavar="N", help="how many trials to add (>= 1)")
    grow.set_defaults(func=run_grow, needs_device=False)


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
    """``init``: validate the settings, create the study."""
    from cnn_mellin.optim.study import default_study_name, init_study

    quiet_optuna(args)
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
    """``grow``: raise the study's budget."""
    from cnn_mellin.errors import ConfigError
    from cnn_mellin.optim.budget import grow

    if args.more < 1:
        raise ConfigError(f"grow needs N >= 1 more trials, got {args.more}")
    study, _ = open_study(args)
    old, new = grow(study, args.more)
    sys.stdout.write(f"study {study.study_name}: budget raised from {old} to {new} trials\n")
    return 0


def run_stage(args, config) -> int:
    """``stage``: important -> best -> init, with lineage."""
    from cnn_mellin.cli.task_options import config_groups
    from cnn_mellin.errors import ConfigError
    from cnn_mellin.optim.stage import run_stage as stage

    quiet_optuna(args)
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
