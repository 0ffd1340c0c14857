"""``cnn-mellin train`` and ``cnn-mellin decode``: one model, trained or scored."""

from __future__ import annotations

import sys


def register(commands) -> None:
    parser = commands.add_parser(
        "train",
        help="train one acoustic model with CTC",
        description="Train the acoustic model of the effective configuration with CTC on the "
        "HDF5 features in DATA_DIR, scoring the 39-phone error rate on DEV_DIR after every "
        "epoch. MODEL_DIR gets model.pt (the best epoch by dev error), last.pt (the resume "
        "checkpoint, written every epoch; running the same command again resumes) and "
        "metrics.jsonl (one JSON line per epoch: losses, dev PER, learning rate, gradient "
        "norms, skipped steps, seconds, peak memory; pandas.read_json(path, lines=True)).",
    )
    parser.add_argument("data_dir", metavar="DATA_DIR", help="training partition (holds feats.h5)")
    parser.add_argument(
        "dev_dir", metavar="DEV_DIR", nargs="?", default=None,
        help="dev partition; without it the training loss selects the best epoch",
    )
    parser.add_argument("--model-dir", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--num-data-workers", type=int, default=0, metavar="N",
        help="loader worker processes (default 0: load in the training process; at most "
        "the CPUs this process may use)",
    )
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="no progress bar (epoch summaries are logged)"
    )
    parser.set_defaults(func=run_train)

    decode = commands.add_parser(
        "decode",
        help="greedy CTC decoding and phone error rate",
        description="Decode DATA_DIR with MODEL_DIR/model.pt (greedy CTC), print the phone error "
        "rate with 39-phone scoring and optionally write each utterance's hypothesis.",
    )
    decode.add_argument("model_dir", metavar="MODEL_DIR")
    decode.add_argument("data_dir", metavar="DATA_DIR")
    decode.add_argument(
        "--out", metavar="FILE", default=None,
        help="write 'UTT_ID PHONE...' per utterance (39-phone symbols) to FILE ('-': stdout)",
    )
    decode.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    decode.set_defaults(func=run_decode)


def run_train(args, config) -> int:
    from cnn_mellin.errors import UserError
    from cnn_mellin.training import TrainingDiverged, train

    if args.num_data_workers < 0:
        raise UserError(f"--num-data-workers must be >= 0, got {args.num_data_workers}")
    try:
        result = train(
            config, args.data_dir, args.dev_dir, model_dir=args.model_dir, device=args.device,
            num_workers=args.num_data_workers, progress=not args.quiet,
        )
    except TrainingDiverged as err:
        sys.stderr.write(f"cnn-mellin: training diverged: {err}\n")
        return 1
    sys.stdout.write(
        f"epochs {result.epochs_run}, best epoch {result.best_epoch}, "
        f"best dev PER {result.best_dev_error:.4f}, final dev PER "
        f"{result.final_dev_error:.4f}, skipped steps {result.skipped_steps_total}, "
        f"model {result.model_path}\n"
    )
    return 0


def run_decode(args, config) -> int:
    from cnn_mellin.decoding import decode
    from cnn_mellin.files import write_text_atomic

    to_stdout = args.out == "-"
    result = decode(args.model_dir, args.data_dir, args.device)
    lines = "".join(" ".join([utt, *phones]) + "\n" for utt, phones in result.hypotheses.items())
    if to_stdout:
        sys.stdout.write(lines)
    elif args.out is not None:
        write_text_atomic(args.out, lines)
    if not args.quiet:
        stream = sys.stderr if to_stdout else sys.stdout
        stream.write(f"PER {result.per:.4f} over {result.num_utts} utterances\n")
    return 0
