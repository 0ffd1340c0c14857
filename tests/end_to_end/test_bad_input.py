"""Malformed input to every command: a one-line error, a non-zero exit, nothing half-written.

Each case builds its broken input under ``tmp_path`` and names the paths the command must
not leave behind. Cases already covered elsewhere (bad .ini contents, bad regular
expressions, unreachable or unknown database URLs, missing studies, conflicting init:
``test_cli.py``, ``test_optim_cli.py``) are not repeated here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.optim_helpers import FAKE_TASK, fake_study
from tests.training_fixtures import TINY_MODEL, write_store

CASES = {}


def case(name):
    def register(build):
        CASES[name] = build
        return build
    return register


def _store(tmp_path: Path) -> Path:
    return write_store(tmp_path / "store", num_utts=6, seed=1)


def _model(tmp_path: Path) -> Path:
    """A valid model.pt of the tiny model on the tiny store."""
    from cnn_mellin.config import Config
    from cnn_mellin.data.store import read_info
    from cnn_mellin.model import AcousticModel
    from cnn_mellin.modelfile import MODEL_FILE, write_model_file

    store = _store(tmp_path)
    info = read_info(store)
    config = Config(TINY_MODEL)
    folder = tmp_path / "model"
    folder.mkdir()
    model = AcousticModel(config.group("model"), info.num_coeffs)
    write_model_file(folder / MODEL_FILE, model, config.to_ini(), info)
    return folder


def _journal_study(tmp_path: Path, trials: int = 0) -> str:
    url = str(tmp_path / "studies.journal")
    fake_study(url, tmp_path, num_trials=max(trials, 1), whitelist=["training.learning_rate"])
    if trials:
        from cnn_mellin.optim.launch import run_worker

        assert run_worker(url, "fake", seed=1).exit_code == 0
    return url


# -- files given to the global options ----------------------------------------------------

@case("read-ini is a directory")
def _(tmp_path):
    return ["--read-ini", tmp_path, "--print-ini"], []


@case("read-ini is not text")
def _(tmp_path):
    (tmp_path / "bin.ini").write_bytes(b"\xff\xfe\x00\x81[model]\x00")
    return ["--read-ini", tmp_path / "bin.ini", "--print-ini"], []


@case("read-ini is empty")
def _(tmp_path):
    (tmp_path / "empty.ini").write_text("")
    return ["--read-ini", tmp_path / "empty.ini", "--print-ini"], []


@case("seed is not a number")
def _(tmp_path):
    return ["--seed", "abc", "--print-ini"], []


# -- prep -----------------------------------------------------------------------------------

@case("prep timit: no such folder")
def _(tmp_path):
    return ["prep", "timit", tmp_path / "nope", tmp_path / "out", "fbank-81-10ms"], \
        [tmp_path / "out"]


@case("prep timit: not the TIMIT layout")
def _(tmp_path):
    (tmp_path / "timit").mkdir()
    (tmp_path / "timit" / "README").write_text("hello")
    return ["prep", "timit", tmp_path / "timit", tmp_path / "out", "fbank-81-10ms"], \
        [tmp_path / "out"]


@case("prep timit: unknown feature")
def _(tmp_path):
    (tmp_path / "timit").mkdir()
    return ["prep", "timit", tmp_path / "timit", tmp_path / "out", "nosuch-feature"], \
        [tmp_path / "out"]


def _timit_corpus(root: Path, bad_phn: str) -> Path:
    """A tiny TIMIT layout (one train, dev and core test utterance) whose test .PHN is
    ``bad_phn``."""
    import numpy as np
    import soundfile

    from cnn_mellin.data.phones import speaker_list

    good = "0 800 h#\n800 1600 aa\n"
    for part, speaker, phn in (("TRAIN", "FZZZ0", good),
                               ("TEST", speaker_list("dev")[0].upper(), good),
                               ("TEST", speaker_list("core_test")[0].upper(), bad_phn)):
        folder = root / part / "DR1" / speaker
        folder.mkdir(parents=True)
        audio = np.random.default_rng(0).integers(-500, 500, 1600).astype(np.int16)
        soundfile.write(str(folder / "SI1.WAV"), audio, 16000, format="NIST", subtype="PCM_16")
        (folder / "SI1.PHN").write_text(phn)
    return root


@case("prep timit: phone segment past the audio's end")
def _(tmp_path):
    timit = _timit_corpus(tmp_path / "timit", "0 800 h#\n800 2600 aa\n")
    return ["prep", "timit", timit, tmp_path / "out", "raw", "--num-workers", "1"], \
        [tmp_path / "out"]


@case("prep synth: too few utterances")
def _(tmp_path):
    return ["prep", "synth", tmp_path / "out", "--utterances", "2"], [tmp_path / "out"]


@case("prep synth: output folder not empty")
def _(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    return ["prep", "synth", tmp_path / "out", "--utterances", "5"], \
        [tmp_path / "out" / "TRAIN"]


# -- train, decode, attack: stores and checkpoints ------------------------------------------

@case("train: data dir missing")
def _(tmp_path):
    return ["train", tmp_path / "nope", "--model-dir", tmp_path / "m"], [tmp_path / "m"]


@case("train: data dir is a file")
def _(tmp_path):
    (tmp_path / "f").write_text("x")
    return ["train", tmp_path / "f", "--model-dir", tmp_path / "m"], [tmp_path / "m"]


@case("train: store is not HDF5")
def _(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "feats.h5").write_text("not hdf5 at all")
    return ["train", tmp_path / "d", "--model-dir", tmp_path / "m"], [tmp_path / "m"]


@case("train: store truncated")
def _(tmp_path):
    store = _store(tmp_path) / "feats.h5"
    data = store.read_bytes()
    store.write_bytes(data[: len(data) // 3])
    return ["train", store.parent, "--model-dir", tmp_path / "m"], [tmp_path / "m"]


@case("train: store's datasets missing")
def _(tmp_path):
    import h5py

    (tmp_path / "d").mkdir()
    with h5py.File(tmp_path / "d" / "feats.h5", "w") as f:
        f.create_dataset("something", data=[1, 2, 3])
    return ["train", tmp_path / "d", "--model-dir", tmp_path / "m"], [tmp_path / "m"]


@case("train: model dir is a file")
def _(tmp_path):
    store = _store(tmp_path)
    (tmp_path / "m").write_text("x")
    return ["train", store, "--model-dir", tmp_path / "m"], []


@case("train: resume checkpoint corrupted")
def _(tmp_path):
    store = _store(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "last.pt").write_bytes(b"PK\x03\x04 garbage")
    return ["train", store, "--model-dir", tmp_path / "m"], [tmp_path / "m" / "model.pt"]


@case("train: negative data workers")
def _(tmp_path):
    store = _store(tmp_path)
    return ["train", store, "--model-dir", tmp_path / "m", "--num-data-workers", "-1"], \
        [tmp_path / "m"]


@case("decode: model dir missing")
def _(tmp_path):
    return ["decode", tmp_path / "nope", _store(tmp_path)], []


@case("decode: model.pt truncated")
def _(tmp_path):
    model = _model(tmp_path) / "model.pt"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    return ["decode", model.parent, tmp_path / "store"], []


@case("decode: model.pt is text")
def _(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.pt").write_text("weights go here")
    return ["decode", tmp_path / "m", _store(tmp_path)], []


@case("decode: a torch file that is not a model")
def _(tmp_path):
    import torch

    (tmp_path / "m").mkdir()
    torch.save({"format": "other", "weights": torch.zeros(2)}, tmp_path / "m" / "model.pt")
    return ["decode", tmp_path / "m", _store(tmp_path)], []


@case("attack: model.pt truncated")
def _(tmp_path):
    model = _model(tmp_path) / "model.pt"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    return ["attack", model.parent, tmp_path / "store", "--out", tmp_path / "a"], \
        [tmp_path / "a"]


@case("attack: data dir is not a store")
def _(tmp_path):
    model = _model(tmp_path)
    (tmp_path / "empty").mkdir()
    return ["attack", model, tmp_path / "empty", "--out", tmp_path / "a"], [tmp_path / "a"]


# -- optim: URLs, stores, options -------------------------------------------------------------

@case("optim: sqlite file in a missing folder")
def _(tmp_path):
    return ["optim", f"sqlite:///{tmp_path}/no/such/dir/x.db", "status"], \
        [tmp_path / "no"]


@case("optim: malformed URL")
def _(tmp_path):
    return ["optim", "postgresql+psycopg2://[::1", "status"], []


@case("optim: journal path is a directory")
def _(tmp_path):
    (tmp_path / "j").mkdir()
    return ["optim", tmp_path / "j", "status"], []


@case("optim: journal file is garbage")
def _(tmp_path):
    (tmp_path / "j.journal").write_bytes(b"\x00\x01 this is not a journal\n{broken json\n")
    return ["optim", tmp_path / "j.journal", "status"], []


@case("optim: journal file of another program")
def _(tmp_path):
    (tmp_path / "j.journal").write_text('{"op_code": 99, "worker_id": "x"}\n')
    return ["optim", tmp_path / "j.journal", "status"], []


@case("optim init: zero trials")
def _(tmp_path):
    (tmp_path / "data").mkdir()
    url = tmp_path / "s.journal"
    return ["optim", url, "init", tmp_path / "data", "--task", FAKE_TASK, "--num-trials", "0"], \
        [url]


@case("optim init: negative memory limit")
def _(tmp_path):
    (tmp_path / "data").mkdir()
    url = tmp_path / "s.journal"
    return ["optim", url, "init", tmp_path / "data", "--task", FAKE_TASK,
            "--mem-limit-bytes", "-5"], [url]


@case("optim init: unknown pruner")
def _(tmp_path):
    (tmp_path / "data").mkdir()
    url = tmp_path / "s.journal"
    return ["optim", url, "init", tmp_path / "data", "--task", FAKE_TASK,
            "--pruner", "sometimes"], [url]


@case("optim init: asr on a folder without a store")
def _(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("x")
    url = tmp_path / "s.journal"
    return ["optim", url, "init", tmp_path / "data", "--task", "asr"], [url]


@case("optim run: zero workers")
def _(tmp_path):
    return ["optim", _journal_study(tmp_path), "run", "--workers", "0"], \
        [tmp_path / "ckpt" / "fake"]


@case("optim run: unknown sampler")
def _(tmp_path):
    return ["optim", _journal_study(tmp_path), "run", "--sampler", "guess"], \
        [tmp_path / "ckpt" / "fake"]


@case("optim run: zero max trials")
def _(tmp_path):
    return ["optim", _journal_study(tmp_path), "run", "--max-trials", "0"], \
        [tmp_path / "ckpt" / "fake"]


@case("optim best: no completed trial")
def _(tmp_path):
    return ["optim", _journal_study(tmp_path), "best", tmp_path / "best.ini"], \
        [tmp_path / "best.ini"]


@case("optim best: output is a folder")
def _(tmp_path):
    (tmp_path / "out").mkdir()
    return ["optim", _journal_study(tmp_path, trials=2), "best", tmp_path / "out"], []


@case("optim important: top-k zero")
def _(tmp_path):
    return ["optim", _journal_study(tmp_path, trials=2), "important", "--top-k", "0",
            tmp_path / "imp.txt"], [tmp_path / "imp.txt"]


@case("optim report: output is a file")
def _(tmp_path):
    (tmp_path / "rep").write_text("x")
    return ["optim", _journal_study(tmp_path, trials=2), "report", tmp_path / "rep"], []


@case("optim stage: source study missing")
def _(tmp_path):
    url = _journal_study(tmp_path)
    return ["optim", "--study-name", "next", url, "stage", "nosuch", "--top-k", "1",
            "--conf-dir", tmp_path / "conf"], [tmp_path / "conf"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_nonzero_and_writes_nothing(cli, capsys, tmp_path, name):
    argv, absent = CASES[name](tmp_path)
    capsys.readouterr()  # what building the case printed
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, out, err = cli(*argv)
    assert code not in (0, None), (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnn-mellin"), err
    assert "Traceback" not in err
    assert out == ""
    for path in absent:
        assert not Path(path).exists(), f"{path} was written"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    new = [p for p in after if p not in before and "ckpt" not in p.parts]
    assert new == [], f"left behind: {new}"


def test_there_are_at_least_30_cases():
    assert len(CASES) >= 30




def test_prep_timit_names_the_transcript_and_line(cli, tmp_path, caplog):
    bad = _timit_corpus(tmp_path / "bad", "0 800 h#\n700 1600 aa\n")
    code, out, err = cli("prep", "timit", bad, tmp_path / "out", "raw", "--num-workers", "1")
    from cnn_mellin.data.phones import speaker_list

    phn = bad / "TEST" / "DR1" / speaker_list("core_test")[0].upper() / "SI1.PHN"
    assert code == 2 and out == "" and not (tmp_path / "out").exists()
    assert err.strip() == (f"cnn-mellin: error: {phn} line 2: segment 700 1600 aa overlaps "
                           "the segment of line 1 (0 800)")
    # a last segment ending a few samples past the audio: clamped, with a warning (logged to
    # stderr by the command; pytest's log capture takes it here)
    close = _timit_corpus(tmp_path / "close", "0 800 h#\n800 1650 aa\n")
    with caplog.at_level("WARNING", logger="cnn_mellin.data.timit"):
        code, out, err = cli("prep", "timit", close, tmp_path / "out", "raw",
                             "--num-workers", "1")
    assert code == 0 and "wrote" in out, err
    assert "50 samples past the end" in caplog.text and "clamped" in caplog.text
    assert (tmp_path / "out" / "raw" / "test" / "feats.h5").is_file()
