#!/usr/bin/env python3
"""A training script of the kind researchers tune by hand: a GRU + CTC phone recogniser.

It knows nothing of cnn-mellin: it reads a feature store (``feats.h5``, as ``cnn-mellin prep``
writes it), trains with the flags below, and appends one JSON line per epoch to ``--metrics``
(``{"epoch": 3, "train_loss": ..., "dev_per": ..., "lr": ...}``). It saves a checkpoint to
``--checkpoint-dir`` after every epoch and resumes from it when restarted, and it stops with
exit status 3 on a non-finite loss, as the seeds' scripts learned to. Under
``optim ... init --task command`` the defaults of ``--data``, ``--checkpoint-dir`` and
``--metrics`` come from the environment cnn-mellin sets; see README.md, "Tune your own script".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torchaudio


def parse_args(argv=None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=env("CNN_MELLIN_DATA_DIR"),
                        help="folder with feats.h5 (default $CNN_MELLIN_DATA_DIR)")
    parser.add_argument("--checkpoint-dir", default=env("CNN_MELLIN_CHECKPOINT_DIR"))
    parser.add_argument("--metrics", default=env("CNN_MELLIN_METRICS"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), default="adamw")
    parser.add_argument("--weight-decay", type=float, default=1e-2)
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--clip", type=float, default=5.0, help="gradient-norm clip (0: off)")
    parser.add_argument("--noise", type=float, default=0.0, help="white-noise std on the input")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--amp", choices=("true", "false"), default="false",
                        help="mixed precision (bf16 autocast; CUDA only)")
    parser.add_argument("--dev-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.data:
        parser.error("--data (or $CNN_MELLIN_DATA_DIR) is required")
    return args


def load(data_dir: str):
    """(features, targets) per utterance, normalised per coefficient, and the phone count."""
    path = Path(data_dir)
    path = path / "feats.h5" if path.is_dir() else path
    with h5py.File(path, "r") as store:
        ids = [u.decode() if isinstance(u, bytes) else u for u in store["utt_ids"][()]]
        mean, std = store["mean"][()], store["std"][()]
        phones = len(json.loads(store.attrs["phones"]))
        utts = [((store["feats"][u][()] - mean) / std, store["targets"][u][()].astype(np.int64))
                for u in ids]
    return utts, phones


class Recogniser(torch.nn.Module):
    def __init__(self, coeffs: int, hidden: int, layers: int, classes: int):
        super().__init__()
        self.rnn = torch.nn.GRU(coeffs, hidden, layers, batch_first=True, bidirectional=True)
        self.out = torch.nn.Linear(2 * hidden, classes)

    def forward(self, x):
        return self.out(self.rnn(x)[0]).log_softmax(-1)


def batches(utts, size: int, rng: random.Random | None):
    order = list(range(len(utts)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        chunk = [utts[j] for j in order[i:i + size]]
        feats = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(f) for f, _ in chunk], True)
        lengths = torch.tensor([len(f) for f, _ in chunk])
        yield feats.float(), lengths, [torch.from_numpy(t) for _, t in chunk]


def per(model, utts, blank: int, device) -> float:
    errors = total = 0
    model.eval()
    with torch.no_grad():
        for feats, lengths, targets in batches(utts, 16, None):
            best = model(feats.to(device)).argmax(-1).cpu()
            for row, n, ref in zip(best, lengths, targets, strict=True):
                hyp = torch.unique_consecutive(row[:n])
                hyp = hyp[hyp != blank].tolist()
                errors += torchaudio.functional.edit_distance(ref.tolist(), hyp)
                total += len(ref)
    model.train()
    return errors / max(total, 1)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    utts, phones = load(args.data)
    split = max(1, int(len(utts) * args.dev_share))
    dev, train = utts[:split], utts[split:]
    blank = phones
    model = Recogniser(train[0][0].shape[1], args.hidden, args.layers, phones + 1).to(device)
    make = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    extra = {"momentum": 0.9} if args.optimizer == "sgd" else {}
    optimizer = make[args.optimizer](model.parameters(), lr=args.lr,
                                     weight_decay=args.weight_decay, **extra)
    warmup = max(1, args.warmup_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    ctc = torch.nn.CTCLoss(blank=blank, zero_infinity=True)
    amp = args.amp == "true" and device.type == "cuda"
    start = 0
    checkpoint = Path(args.checkpoint_dir) / "last.pt" if args.checkpoint_dir else None
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.setstate(state["python_rng"])
        torch.set_rng_state(state["torch_rng"])
        start = state["epoch"]
        print(f"resuming after epoch {start}", flush=True)
    for epoch in range(start + 1, args.epochs + 1):
        began, losses = time.monotonic(), []
        for feats, lengths, targets in batches(train, args.batch_size, rng):
            feats = feats.to(device)
            if args.noise > 0:
                feats = feats + args.noise * torch.randn_like(feats)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = model(feats)
            loss = ctc(logits.float().transpose(0, 1), torch.cat(targets).to(device), lengths,
                       torch.tensor([len(t) for t in targets]))
            if not math.isfinite(loss.item()):
                print(f"non-finite loss at epoch {epoch}", file=sys.stderr)
                return 3
            optimizer.zero_grad()
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        record = {"epoch": epoch, "train_loss": sum(losses) / len(losses),
                  "dev_per": per(model, dev, blank, device), "lr": schedule.get_last_lr()[0],
                  "seconds": round(time.monotonic() - began, 3)}
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "schedule": schedule.state_dict(), "python_rng": rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "epoch": epoch}, tmp)
            os.replace(tmp, checkpoint)
        line = json.dumps(record)
        print(line, flush=True)
        if args.metrics:
            with open(args.metrics, "a") as handle:
                handle.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
