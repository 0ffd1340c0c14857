"""``cnn-mellin prep timit|synth``: corpora to HDF5 feature stores."""

from __future__ import annotations

import sys


def register(commands) -> None:
    parser = commands.add_parser(
        "prep", help="prepare data: TIMIT or a synthetic corpus to HDF5 features",
        description="Prepare data for training.",
    )
    which = parser.add_subparsers(dest="corpus", metavar="CORPUS", required=True)
    timit = which.add_parser(
        "timit",
        help="TIMIT layout -> OUT_DIR/<feature>/{train,dev,test}/feats.h5",
        description="Read a corpus in the TIMIT layout (TRAIN|TEST/DR*/SPEAKER/*.WAV + .PHN, any "
        "letter case), drop SA sentences, map 61 phones to 48 (39 kept for scoring), split "
        "train / dev (50 speakers) / core test (24 speakers) and write one HDF5 file per "
        "partition and feature. Each .PHN is checked against its audio first: segments out of "
        "order, overlapping or ending past the audio are an error naming the file and line, and "
        "nothing is written (a last segment at most 160 samples, one 10 ms frame, past the end "
        "is clamped with a warning).",
    )
    timit.add_argument("timit_dir", metavar="TIMIT_DIR")
    timit.add_argument("out_dir", metavar="OUT_DIR")
    timit.add_argument(
        "features", nargs="+", metavar="FEATURE",
        help="fbank-81-10ms, sigbank-41-2ms and/or raw",
    )
    timit.add_argument(
        "--num-workers", type=int, default=None,
        help="processes computing features (default: the number of CPU cores)",
    )
    timit.set_defaults(func=run_timit, needs_device=False)
    synth = which.add_parser(
        "synth",
        help="a small TIMIT-shaped corpus spoken by espeak-ng",
        description="Write a TIMIT-shaped corpus (NIST SPHERE .WAV, .PHN, .WRD, .TXT) spoken by "
        "espeak-ng with several voices and rates; dev and test speakers use held-out voices and "
        "sentences. The same arguments give byte-identical files.",
    )
    synth.add_argument("out_dir", metavar="OUT_DIR")
    synth.add_argument(
        "--utterances", type=int, default=None, metavar="N",
        help="number of training utterances (default 600; dev and test get a fifth each)",
    )
    synth.add_argument("--synth-seed", type=int, default=0, help="seed of the sentence generator")
    synth.add_argument(
        "--max-words", type=int, default=None, metavar="N",
        help="sentences of at most N words (default: 10 to 18 words; below 10: 2 to N words, "
        "about a second of speech for 2 or 3, e.g. for the attack's short utterances)",
    )
    synth.set_defaults(func=run_synth, needs_device=False)


def run_timit(args, config) -> int:
    from cnn_mellin.data.timit import prepare_timit

    summary = prepare_timit(
        args.timit_dir, args.out_dir, args.features, num_workers=args.num_workers
    )
    sys.stdout.write(f"{summary}\n")
    return 0


def run_synth(args, config) -> int:
    from cnn_mellin.data.synth import prepare_synth

    summary = prepare_synth(args.out_dir, utterances=args.utterances, seed=args.synth_seed,
                            max_words=args.max_words)
    sys.stdout.write(f"{summary}\n")
    return 0
