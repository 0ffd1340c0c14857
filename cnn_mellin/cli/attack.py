"""``cnn-mellin attack``: gradient-inversion attack on a trained model (not in this version)."""

from __future__ import annotations

import sys


def register(commands) -> None:
    parser = commands.add_parser(
        "attack",
        help="gradient-inversion attack on a trained model (not available in this version)",
        description="Reconstruct an utterance's features from the gradients it induces in a "
        "trained model (DESIGN.md §6). Not available in this version: the command exits with 3.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR")
    parser.add_argument("data_dir", metavar="DATA_DIR")
    parser.set_defaults(func=run, needs_device=False)


def run(args, config) -> int:
    sys.stderr.write(
        "cnn-mellin: error: the attack task is not available in this version of cnn-mellin "
        "(only train, decode and the asr search task are)\n"
    )
    return 3
