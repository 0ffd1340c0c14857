"""Learning-curve table: per-epoch dev PER and cost of many configurations of the search space.

Trains configurations drawn (seeded, one draw per configuration index) from the search
space of the staged search's sm stage (every ``model.*`` parameter but
``model.convolutional_mellin``, which is drawn 50/50 as lcorr or mcorr), a share of them
with the ``training.*`` space drawn too, and a share "near the base configuration" (one to
three model parameters changed), on the synthetic corpus that ``scripts/staged_search.sh``
used when the table was started (200 utterances, batch 4; the main job has since moved to
600 utterances at batch 16, chosen from this table and the runs in docs/benchmarks.md),
with the main job's train/dev split (``AsrTask``, dev proportion 0.1). Configurations
0 and 1 are the base configuration itself (lcorr, mcorr).

Written incrementally, so that it can be stopped and extended by a later session:

- ``OUT.csv``: one row per configuration and epoch (dev PER, train loss, wall and CPU
  seconds of the epoch and cumulated since the configuration started, set-up included);
- ``OUT.configs.csv``: one row per finished configuration (status ``done``, ``memory``
  (over the memory cap, not trained), ``invalid``, ``diverged``, ``error`` or ``timeout``,
  with the reason), estimated peak bytes, parameter count, the searched values as JSON;
- ``OUT.meta.json``: corpus, settings, and per session the software versions, machine and
  threads.

A configuration without a row in ``OUT.configs.csv`` is unfinished: its epoch rows are
dropped on restart and it is trained again. The replay simulator (``bench/replay.py``)
reads these files.

Usage: ``OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python bench/learning_curves.py``
(see ``--help``).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import logging
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FEATURE = "fbank-81-10ms"
DEV_PROPORTION = 0.1  # the main job's (cnn_mellin.optim.defaults.DEFAULT_DEV_PROPORTION)
SM_BLACKLIST = ("training.*", "data.*", "model.convolutional_mellin")
# training.num_epochs is the table's resource axis (fixed); the seed is not a hyperparameter
TRAINING_BLACKLIST = ("data.*", "model.*", "training.num_epochs", "training.seed")

CURVE_FIELDS = [
    "config_id", "epoch", "dev_per", "train_loss", "epoch_seconds", "seconds",
    "epoch_cpu_seconds", "cpu_seconds",
]
CONFIG_FIELDS = [
    "config_id", "kind", "mellin", "status", "reason", "epochs_run", "seconds", "cpu_seconds",
    "best_dev_per", "peak_bytes", "num_params", "session", "finished_at", "params",
]

log = logging.getLogger("learning_curves")


class Timeout(Exception):
    """Raised from the epoch callback when a configuration exceeds its wall-time cap."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "bench/results/learning_curves"),
                   help="output prefix (OUT.csv, OUT.configs.csv, OUT.meta.json)")
    p.add_argument("--data", default=str(ROOT / "data/curves"),
                   help="corpus and features (built here if missing)")
    p.add_argument("--utterances", type=int, default=200,
                   help="training utterances spoken (the table's 200)")
    p.add_argument("--synth-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=24,
                   help="epochs per configuration (cosine schedule over these epochs)")
    p.add_argument("--batch-size", type=int, default=4, help="the table's 4")
    p.add_argument("--seed", type=int, default=0, help="seed of the configuration draws")
    p.add_argument("--training-share", type=float, default=0.15,
                   help="share of configurations that also draw training.* (per session: "
                        "each row records its kind)")
    p.add_argument("--near-share", type=float, default=0.1,
                   help="share of configurations that change 1-3 model parameters of the base")
    p.add_argument("--mem-limit-bytes", type=float, default=5e8,
                   help="estimated peak over this: recorded as 'memory', not trained")
    p.add_argument("--max-config-cpu-seconds", type=float, default=500.0,
                   help="stop a configuration after this many CPU seconds ('timeout'; "
                        "CPU rather than wall time, which other jobs on the machine inflate)")
    p.add_argument("--max-configs", type=int, default=100000,
                   help="configuration indices 0..N-1 (the table's target)")
    p.add_argument("--until", default=None,
                   help="start no configuration after this local time (HH:MM)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    return p.parse_args(argv)


def ensure_corpus(data: Path, utterances: int, synth_seed: int) -> Path:
    """The train features dir, building corpus and features as the main job does."""
    from cnn_mellin.data.synth import prepare_synth
    from cnn_mellin.data.timit import prepare_timit

    train_dir = data / FEATURE / "train"
    if not (train_dir / "feats.h5").exists():
        if not (data / "corpus").exists():
            prepare_synth(data / "corpus", utterances=utterances, seed=synth_seed, num_workers=1)
        prepare_timit(data / "corpus", data, [FEATURE], num_workers=1)
    return train_dir


def base_config(epochs: int, batch_size: int, mellin: bool):
    """The table's base: the defaults with a warm-up of half an epoch (what
    ``conf/optim/demo.ini`` held when the table was started; pinned here so that a later
    session extends the table in the same regime), with the table's epochs and batch."""
    from cnn_mellin.config import Config

    return Config({}).replace({
        "training.warmup_epochs": 0.5,
        "training.num_epochs": epochs, "data.batch_size": batch_size,
        "model.convolutional_mellin": mellin,
    })


def draw(names, seed: int) -> dict:
    """Values of ``names`` drawn by Optuna's random sampler from the declared ranges."""
    import optuna

    from cnn_mellin.optim import space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return space.suggest(study.ask(), names)


def plan(index: int, args, num_coeffs: int) -> tuple[str, bool, dict]:
    """(kind, mellin, searched values) of configuration ``index``; depends only on the index."""
    from cnn_mellin.optim import space

    if index < 2:
        return "base", bool(index), {}
    rng = random.Random(f"{args.seed}:{index}")
    u = rng.random()
    kind = ("training" if u < args.training_share
            else "near" if u < args.training_share + args.near_share else "model")
    mellin = rng.random() < 0.5
    base = base_config(args.epochs, args.batch_size, mellin)
    model_names = space.select(base, num_coeffs, blacklist=list(SM_BLACKLIST)).names
    draw_seed = rng.randrange(2**31)
    if kind == "near":
        values = draw(model_names, draw_seed)
        changed = rng.sample(sorted(values), rng.randint(1, 3))
        return kind, mellin, {name: values[name] for name in changed}
    values = draw(model_names, draw_seed)
    if kind == "training":
        names = space.select(base, num_coeffs, blacklist=list(TRAINING_BLACKLIST)).names
        values.update(draw(names, draw_seed + 1))
    return kind, mellin, values


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _append(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def _machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": model, "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}


def _versions() -> dict:
    import subprocess
    from importlib.metadata import version

    import optuna
    import torch

    try:  # the package version alone does not say which code trained
        head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return {"torch": torch.__version__, "optuna": optuna.__version__,
            "cnn-mellin": version("cnn-mellin"), "git": head}


def space_json(num_coeffs: int) -> dict:
    """The searched distributions (Optuna JSON) of both draws, as the code declares them now."""
    import optuna

    from cnn_mellin.optim import space

    out = {}
    for blacklist in (SM_BLACKLIST, TRAINING_BLACKLIST):
        for mellin in (False, True):
            base = base_config(1, 4, mellin)
            names = space.select(base, num_coeffs, blacklist=list(blacklist)).names
            for name, dist in space.distributions(names).items():
                out[name] = optuna.distributions.distribution_to_json(dist)
    mellin = space.distributions(["model.convolutional_mellin"])["model.convolutional_mellin"]
    out["model.convolutional_mellin"] = optuna.distributions.distribution_to_json(mellin)
    return out


def open_table(args, corpus: dict, num_coeffs: int) -> tuple[Path, Path, int, set[int]]:
    """Check/extend the meta file, drop unfinished rows; (curves, configs, session, done)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    curves, configs, meta_path = (Path(f"{out}.csv"), Path(f"{out}.configs.csv"),
                                  Path(f"{out}.meta.json"))
    settings = {
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
        "mem_limit_bytes": args.mem_limit_bytes,
        "max_config_cpu_seconds": args.max_config_cpu_seconds,
        "base": "defaults + warmup_epochs 0.5, num_epochs and batch_size as above",
        "sm_blacklist": list(SM_BLACKLIST), "training_blacklist": list(TRAINING_BLACKLIST),
        "device": "cpu",
    }
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {
        "corpus": corpus, "settings": settings, "sessions": []}
    for key in ("training_share", "near_share"):  # per session since the second session
        if key in meta["settings"]:
            meta["sessions"][0][key] = meta["settings"].pop(key)
    for key, now in (("corpus", corpus), ("settings", settings)):
        if meta[key] != now:
            sys.exit(f"{meta_path}: {key} differ from this run's ({meta[key]} != {now}); "
                     "use another --out")
    meta["sessions"].append({
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": _versions(), "machine": _machine(), "torch_threads": args.threads,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "training_share": args.training_share, "near_share": args.near_share,
        "loadavg_at_start": os.getloadavg(), "command": " ".join(sys.argv),
        "space": space_json(num_coeffs),
    })
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, meta_path)
    done = {int(r["config_id"]) for r in _read_csv(configs)}
    rows = _read_csv(curves)
    kept = [r for r in rows if int(r["config_id"]) in done]
    if len(kept) != len(rows):  # an interrupted configuration: it runs again
        tmp = curves.with_suffix(".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, CURVE_FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, curves)
    return curves, configs, len(meta["sessions"]) - 1, done


def run_one(index, args, task, train_utts, dev_utts, num_coeffs, curves_path) -> dict:
    """Train configuration ``index``; its epoch rows are appended as they come."""
    from cnn_mellin.errors import ConfigError
    from cnn_mellin.model import AcousticModel
    from cnn_mellin.training import TrainingDiverged, train

    kind, mellin, values = plan(index, args, num_coeffs)
    row = {"config_id": index, "kind": kind, "mellin": int(mellin), "status": "done",
           "reason": "", "epochs_run": 0, "seconds": 0.0, "cpu_seconds": 0.0,
           "best_dev_per": "", "peak_bytes": "", "num_params": "",
           "params": json.dumps(values, sort_keys=True)}
    try:
        config = base_config(args.epochs, args.batch_size, mellin).replace(values)
        task.check(config)
    except ConfigError as err:
        return {**row, "status": "invalid", "reason": str(err).replace("\n", " ")}
    row["num_params"] = sum(
        p.numel() for p in AcousticModel(config.group("model"), num_coeffs).parameters())
    peak = task.peak_memory(config, "cpu").bytes
    row["peak_bytes"] = int(peak)
    if peak > args.mem_limit_bytes:
        return {**row, "status": "memory",
                "reason": f"estimated peak {peak} bytes > {int(args.mem_limit_bytes)}"}

    start, cpu_start = time.perf_counter(), time.process_time()
    last = {"t": start, "cpu": cpu_start, "epoch": 0, "best": math.inf}

    def on_epoch(epoch: int, train_loss: float, dev_error: float) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        _append(curves_path, CURVE_FIELDS, {
            "config_id": index, "epoch": epoch, "dev_per": f"{dev_error:.6g}",
            "train_loss": f"{train_loss:.6g}", "epoch_seconds": f"{now - last['t']:.3f}",
            "seconds": f"{now - start:.3f}", "epoch_cpu_seconds": f"{cpu - last['cpu']:.3f}",
            "cpu_seconds": f"{cpu - cpu_start:.3f}",
        })
        last.update(t=now, cpu=cpu, epoch=epoch)
        if math.isfinite(dev_error):
            last["best"] = min(last["best"], dev_error)
        log.info("config %d epoch %d: dev PER %.4f, loss %.3f, %.1f s", index, epoch,
                 dev_error, train_loss, now - start)
        if cpu - cpu_start > args.max_config_cpu_seconds and epoch < args.epochs:
            raise Timeout(f"stopped after epoch {epoch}: {cpu - cpu_start:.0f} CPU s > "
                          f"{args.max_config_cpu_seconds:.0f}")

    model_dir = Path(tempfile.mkdtemp(prefix=f"curve-{index}-", dir=Path(args.data)))
    try:
        train(config, task.info["data_dir"], None, model_dir=model_dir, device="cpu",
              train_utts=train_utts, dev_utts=dev_utts, epoch_callback=on_epoch)
    except TrainingDiverged as err:
        row.update(status="diverged", reason=str(err).replace("\n", " "))
    except Timeout as err:
        row.update(status="timeout", reason=str(err))
    except Exception as err:  # recorded, and the table goes on
        log.warning("config %d failed:\n%s", index, traceback.format_exc())
        row.update(status="error", reason=f"{type(err).__name__}: {err}".replace("\n", " "))
    finally:
        shutil.rmtree(model_dir, ignore_errors=True)
    row.update(epochs_run=last["epoch"], seconds=round(last["t"] - start, 3),
               cpu_seconds=round(last["cpu"] - cpu_start, 3),
               best_dev_per="" if math.isinf(last["best"]) else f"{last['best']:.6g}")
    return row


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    from cnn_mellin.data.store import read_info
    from cnn_mellin.tasks.asr import AsrTask

    data = Path(args.data).resolve()
    train_dir = ensure_corpus(data, args.utterances, args.synth_seed)
    base = base_config(args.epochs, args.batch_size, False)
    try:  # the task interface since the pluggable-task refactor
        info = AsrTask.prepare({"data_dir": str(train_dir), "dev_proportion": DEV_PROPORTION},
                               base)
    except TypeError:  # before it: prepare(data_dir, config, dev_proportion)
        info = AsrTask.prepare(train_dir, base, DEV_PROPORTION)
    task = AsrTask(info)
    train_utts, dev_utts = task.split(read_info(train_dir).utt_ids)
    corpus = {
        "generator": "cnn-mellin prep synth --utterances N; cnn-mellin prep timit ... " + FEATURE,
        "utterances": args.utterances, "synth_seed": args.synth_seed, "feature": FEATURE,
        "dev_proportion": DEV_PROPORTION, "split_by": task.info["split_by"],
        "train_utts": len(train_utts), "dev_utts": len(dev_utts),
        "fingerprint": task.info["fingerprint"],
    }
    curves, configs, session, done = open_table(args, corpus, task.num_coeffs)
    log.info("%d configurations finished before; %d train / %d dev utterances", len(done),
             len(train_utts), len(dev_utts))
    until = None
    if args.until:
        hh, mm = (int(x) for x in args.until.split(":"))
        until = dt.datetime.now().replace(hour=hh, minute=mm, second=0, microsecond=0)
    for index in range(args.max_configs):
        if index in done:
            continue
        if until is not None and dt.datetime.now() >= until:
            log.info("--until %s reached", args.until)
            break
        row = run_one(index, args, task, train_utts, dev_utts, task.num_coeffs, curves)
        row.update(session=session,
                   finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        _append(configs, CONFIG_FIELDS, row)
        log.info("config %d (%s, %s): %s %s, %s epochs, %.0f s", index, row["kind"],
                 "mcorr" if row["mellin"] else "lcorr", row["status"], row["reason"],
                 row["epochs_run"], float(row["seconds"]))


if __name__ == "__main__":
    main()
