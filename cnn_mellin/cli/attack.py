"""``cnn-mellin attack MODEL_DIR DATA_DIR --out DIR``: gradient inversion on a trained model."""

from __future__ import annotations

import argparse
import sys


def _groups(args):
    from cnn_mellin.params.attack import GROUPS

    return GROUPS


def register(commands) -> None:
    parser = commands.add_parser(
        "attack", help="gradient-inversion attack on a trained model",
        description="Reconstruct utterances' features from the gradients they induce in a "
        "trained model (the victim), as an attacker who sees the gradient of one utterance, "
        "its length and its phones would. Settings come from the [attack] and [defence] "
        "sections of --read-ini files (see 'cnn-mellin params --task attack'). Per utterance "
        "OUT holds the reconstruction (.safetensors), its loss/MAE curves (.curves.csv) and a "
        "PNG of the original above the reconstruction; summary.csv has MAE, SNR and the "
        "victim's PER of both. Re-running resumes from the per-chunk checkpoints in OUT.",
    )
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="the victim: a folder with model.pt from 'cnn-mellin train'")
    parser.add_argument("data_dir", metavar="DATA_DIR",
                        help="feature store with the utterances (features of the victim's kind)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--utterances", type=int, default=8, metavar="N",
                        help="how many utterances to attack (default %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=1.0, metavar="S",
                        help="longest utterance chosen, in seconds (default %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, needs_device=False, config_groups=_groups)


def run(args: argparse.Namespace, config) -> int:
    import csv
    import io
    from pathlib import Path

    import torch
    from tqdm import tqdm

    from cnn_mellin.attack import attack_one, select_utterances, write_outputs
    from cnn_mellin.data.store import read_info
    from cnn_mellin.files import write_text_atomic
    from cnn_mellin.modelfile import load_model_file

    victim = load_model_file(args.model_dir)
    info = read_info(args.data_dir)
    utts = select_utterances(victim, info, args.utterances, args.max_seconds)
    out = Path(args.out)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    attack, defence = config.group("attack"), config.group("defence")
    torch.manual_seed(attack["seed"])
    rows = []
    bar = tqdm(utts, unit="utt", disable=args.quiet or not sys.stderr.isatty())
    for utt in bar:
        bar.set_postfix_str(utt)
        result, row = attack_one(victim, args.data_dir, utt, attack, defence,
                                 checkpoint=out / "checkpoints" / f"{utt}.pt")
        write_outputs(out, utt, victim, args.data_dir, result, row)
        rows.append(row)
        bar.write(f"{utt}: MAE {row['mae']:.4f}, SNR {row['snr_db']:.2f} dB, PER "
                  f"{row['per_reconstruction']:.3f} (original {row['per_original']:.3f})")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "summary.csv", text.getvalue())
    mean = sum(r["mae"] for r in rows) / len(rows)
    snr = sum(r["snr_db"] for r in rows) / len(rows)
    sys.stdout.write(f"{len(rows)} utterances: mean MAE {mean:.4f}, mean SNR {snr:.2f} dB "
                     f"-> {out / 'summary.csv'}\n")
    return 0
