"""HDF5 feature stores of cnn_mellin.data.store."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest

from cnn_mellin.data.phones import PHONES48, map_48_to_39
from cnn_mellin.data.store import STORE_FILE, StoreReader, StoreWriter, read_info
from cnn_mellin.errors import DataError


def _utterances(seed: int = 0, count: int = 5, width: int = 3):
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(count):
        feats = rng.normal(i, 1 + i, (int(rng.integers(5, 40)), width)).astype(np.float32)
        out[f"spk{i}_si{i}"] = (feats, rng.integers(0, 48, int(rng.integers(1, 9))))
    return out


def _write(data_dir, utterances, shift=10.0, width=3):
    config = {"name": "test", "kind": "fbank", "num_coeffs": width}
    with StoreWriter(data_dir, "fbank-81-10ms", config, width, shift, PHONES48, map_48_to_39,
                     split="train", source={"corpus": "here"}) as writer:
        for utt, (feats, targets) in utterances.items():
            writer.add(utt, feats, targets)


def test_round_trip(tmp_path):
    utterances = _utterances()
    _write(tmp_path / "train", utterances)
    assert [p.name for p in (tmp_path / "train").iterdir()] == [STORE_FILE]
    info = read_info(tmp_path / "train")
    assert info.path == tmp_path / "train" / STORE_FILE
    assert (info.feature, info.num_coeffs, info.frame_shift_ms) == ("fbank-81-10ms", 3, 10.0)
    assert info.utt_ids == list(utterances)
    assert info.num_frames == [f.shape[0] for f, _ in utterances.values()]
    assert info.num_targets == [t.size for _, t in utterances.values()]
    assert info.phones == PHONES48 and info.phone_map_39 == map_48_to_39
    assert info.feature_config["name"] == "test" and info.version == 1
    assert (info.split, info.source) == ("train", {"corpus": "here"})
    stacked = np.concatenate([f for f, _ in utterances.values()]).astype(np.float64)
    np.testing.assert_allclose(info.mean, stacked.mean(0), rtol=1e-5)
    np.testing.assert_allclose(info.std, stacked.std(0), rtol=1e-4)
    assert info.mean.dtype == info.std.dtype == np.float32
    reader = StoreReader(info.path)
    for utt, (feats, targets) in utterances.items():
        got_feats, got_targets = reader.read(utt)
        np.testing.assert_array_equal(got_feats, feats)
        np.testing.assert_array_equal(got_targets, targets)
        assert got_targets.dtype == np.int64
    with pytest.raises(DataError, match="no utterance 'nope'"):
        reader.read("nope")
    clone = pickle.loads(pickle.dumps(reader))  # what a spawned loader worker receives
    np.testing.assert_array_equal(clone.read("spk0_si0")[0], utterances["spk0_si0"][0])


def test_raw_store_has_no_frame_shift(tmp_path):
    _write(tmp_path, _utterances(width=1), shift=None, width=1)
    assert read_info(tmp_path).frame_shift_ms is None
    assert read_info(tmp_path / STORE_FILE).num_coeffs == 1  # the file itself is accepted too


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "train"
    with pytest.raises(ValueError, match="shape"):
        with StoreWriter(target, "raw", {}, 1, None, PHONES48, map_48_to_39) as writer:
            writer.add("a", np.zeros((4, 1)), [1])
            writer.add("b", np.zeros((4, 2)), [1])
    assert list(target.iterdir()) == []
    with pytest.raises(DataError, match="no utterances"):
        with StoreWriter(target, "raw", {}, 1, None, PHONES48, map_48_to_39):
            pass
    assert list(target.iterdir()) == []


def test_commit_replaces_an_older_store(tmp_path):
    _write(tmp_path, _utterances(count=2))
    _write(tmp_path, _utterances(count=4))
    assert len(read_info(tmp_path).utt_ids) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [STORE_FILE]


def test_bad_data_dirs_are_one_line_errors(tmp_path):
    cases = []
    cases.append((tmp_path / "missing", "does not exist"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "is empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    cases.append((tmp_path / "other", "has no feats.h5"))
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / STORE_FILE).write_text("not hdf5")
    cases.append((tmp_path / "text", "not an HDF5 file"))
    (tmp_path / "file.npy").write_bytes(b"\x93NUMPY")
    cases.append((tmp_path / "file.npy", "not an HDF5 file"))
    (tmp_path / "foreign").mkdir()
    with h5py.File(tmp_path / "foreign" / STORE_FILE, "w") as f:
        f["x"] = np.zeros(3)
    cases.append((tmp_path / "foreign", "not a cnn-mellin feature store"))
    (tmp_path / "partial").mkdir()
    with h5py.File(tmp_path / "partial" / STORE_FILE, "w") as f:
        f.attrs["format"] = "cnn-mellin-feats"
        f.attrs["version"] = 1
    cases.append((tmp_path / "partial", "missing utt_ids"))
    (tmp_path / "future").mkdir()
    with h5py.File(tmp_path / "future" / STORE_FILE, "w") as f:
        f.attrs["format"] = "cnn-mellin-feats"
        f.attrs["version"] = 99
    cases.append((tmp_path / "future", "store version 99"))
    for path, message in cases:
        with pytest.raises(DataError, match=message) as caught:
            read_info(path)
        assert "\n" not in str(caught.value)
