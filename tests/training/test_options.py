"""The options of issue 12: their effect on a batch or a step, their ``active`` rules, exact
resume with each of them on, ``metrics.jsonl``, the autocast dtype and fp16 loss-scale
back-offs."""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import pytest
import torch

from cnn_mellin.config import Config, parameters
from cnn_mellin.errors import UserError
from cnn_mellin.modelfile import load_checkpoint_file, save_atomic
from cnn_mellin.training import TrainingDiverged, autocast_dtype, train
from cnn_mellin.training import step as step_module
from cnn_mellin.training.augment import Augmenter
from cnn_mellin.training.metrics import FIELDS, METRICS_FILE
from cnn_mellin.training.schedule import LRSchedule
from tests.training_fixtures import tiny_config, write_store

TIMING = ("seconds", "cpu_seconds", "peak_memory_bytes")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("stores")
    train_dir = write_store(root / "train", 32, seed=0)
    return train_dir, write_store(root / "dev", 10, seed=1, prefix="d")


def _defaults(group: str) -> dict:
    return Config().group(group)


def _untimed(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


# ---- augmentation: constant offsets and the probability of time masks ----

def _batch(n=64, t=40, f=3):
    return torch.zeros(n, t, f), torch.full((n,), t)


def test_constant_offset_is_one_value_per_utterance_and_coefficient():
    feats, lens = _batch()
    std = torch.tensor([1.0, 2.0, 0.5])
    aug = Augmenter({**_defaults("training"), "num_freq_masks": 0, "max_freq_warp": 0,
                     "constant_offset_std": 0.5}, mean=torch.zeros(3), std=std)
    assert aug.active
    out, out_lens = aug(feats, lens, torch.Generator().manual_seed(0))
    assert torch.equal(out_lens, lens)
    assert torch.equal(out, out[:, :1].expand_as(out))  # constant along time
    per_utt = out[:, 0]
    assert (per_utt != 0).all()
    assert torch.allclose(per_utt.std(0), 0.5 * std, rtol=0.3)
    again, _ = aug(feats, lens, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_time_mask_probability_picks_the_masked_utterances():
    feats, lens = _batch(n=400, t=100, f=2)
    feats = feats + 1.0  # masks write the mean, 0
    base = {**_defaults("training"), "num_freq_masks": 0, "max_freq_warp": 0,
            "num_time_masks": 2, "max_time_mask": 10, "time_mask_max_proportion": 0.2}

    def masked(prob, seed=0):
        out, _ = Augmenter({**base, "time_mask_prob": prob})(
            feats, lens, torch.Generator().manual_seed(seed))
        return (out == 0).all(-1).any(-1)  # (N,) some frame masked

    assert not masked(0.0).any()
    always = masked(1.0)
    share = float(masked(0.3).float().mean())
    assert 0.2 < share < 0.4 and float(always.float().mean()) > 0.9
    # the masked utterances under 0.3 are a subset of those masked under 1.0: the same
    # bands, only some utterances dropped
    assert not (masked(0.3) & ~always).any()


# ---- schedule: warmup in steps, learning-rate reduction on bad steps ----

def _rates(params, steps, steps_per_epoch=10, bad_at=()):
    schedule = LRSchedule({**_defaults("training"), "lr_schedule": "none",
                           "learning_rate": 1.0, "warmup_epochs": 0.0, **params},
                          steps_per_epoch)
    out = []
    for step in range(steps):
        out.append(schedule.lr())
        if step in bad_at:
            schedule.bad_step()
        schedule.step()
    return out, schedule


def test_warmup_steps_replace_warmup_epochs():
    by_epochs, _ = _rates({"warmup_epochs": 1.0}, 12)
    assert by_epochs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    by_steps, _ = _rates({"warmup_epochs": 1.0, "warmup_steps": 4}, 12)
    assert by_steps == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 9)
    # the same number of steps whatever the epoch length
    assert _rates({"warmup_steps": 4}, 12, steps_per_epoch=3)[0] == by_steps


def test_bad_steps_scale_every_later_rate():
    rates, schedule = _rates({"bad_step_lr_factor": 0.5}, 6, bad_at=(1, 3))
    assert rates == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.25])
    restored = LRSchedule({**_defaults("training"), "lr_schedule": "none", "learning_rate": 1.0,
                           "warmup_epochs": 0.0}, 10)
    restored.load_state_dict(schedule.state_dict())
    assert restored.lr() == pytest.approx(0.25)
    off, _ = _rates({}, 6, bad_at=(1, 3))
    assert off == [1.0] * 6  # factor 1 (the default): never


def _nan_for_some_batches(real):
    """NaN loss for batches whose targets sum to a multiple of 4: the same batches in every
    run, so a resumed run sees the same bad steps."""

    def loss(log_probs, out_lens, targets, target_lens, valid):
        value = real(log_probs, out_lens, targets, target_lens, valid)
        return value * math.nan if int(targets.sum()) % 4 == 0 else value

    return loss


def test_bad_steps_lower_the_learning_rate_in_training(stores, tmp_path, monkeypatch):
    train_dir, dev_dir = stores
    monkeypatch.setattr(step_module, "ctc_loss", _nan_for_some_batches(step_module.ctc_loss))
    config = tiny_config(num_epochs=2, lr_schedule="none", warmup_epochs=0.0,
                         learning_rate=0.01, bad_step_lr_factor=0.5)
    result = train(config, train_dir, dev_dir, model_dir=tmp_path / "a")
    assert result.skipped_steps_total > 0
    last = load_checkpoint_file(tmp_path / "a" / "last.pt")
    assert last["schedule"]["bad_scale"] == 0.5 ** result.skipped_steps_total
    same = train(config.replace({"training.bad_step_lr_factor": 1.0}), train_dir, dev_dir,
                 model_dir=tmp_path / "b")
    assert same.skipped_steps_total == result.skipped_steps_total
    assert same.history[-1]["lr"] == 0.01 and result.history[-1]["lr"] < 0.01


# ---- active rules ----

def test_new_parameters_are_inactive_where_they_cannot_matter():
    params = parameters()
    values = dict(Config())
    assert not params["training.time_mask_prob"].active(values, 81)  # no time masks
    assert params["training.time_mask_prob"].active({**values, "training.num_time_masks": 1}, 81)
    assert not params["training.amp_dtype"].active(values, 81)
    assert params["training.amp_dtype"].active({**values, "training.mixed_precision": True}, 81)
    assert params["training.warmup_epochs"].active(values, 81)
    assert not params["training.warmup_epochs"].active({**values, "training.warmup_steps": 10},
                                                       81)
    assert params["model.layer_norm"].active(values, 81)
    assert not params["model.layer_norm"].active({**values, "model.recurrent_layers": 0}, 81)
    for name in ("training.constant_offset_std", "training.warmup_steps",
                 "training.bad_step_lr_factor", "training.amp_dtype", "training.time_mask_prob",
                 "model.layer_norm", "model.input_dropout", "model.input_smoothing_width"):
        assert params[name].tunable, name


def test_defaults_leave_the_new_options_off():
    config = Config()
    assert not config["model.layer_norm"] and config["model.input_dropout"] == 0
    assert config["model.input_smoothing_width"] == 0
    assert config["training.constant_offset_std"] == 0 and config["training.time_mask_prob"] == 1
    assert config["training.warmup_steps"] == 0 and config["training.bad_step_lr_factor"] == 1
    assert not config["training.mixed_precision"] and config["training.amp_dtype"] == "auto"


# ---- exact resume with each option on ----

class _Stop(Exception):
    pass


def _stop_after(epoch):
    def callback(done, *_):
        if done == epoch:
            raise _Stop

    return callback


OPTIONS = {
    "layer_norm": {"model.layer_norm": True, "model.recurrent_layers": 2},
    "input_dropout": {"model.input_dropout": 0.2},
    "input_smoothing_width": {"model.input_smoothing_width": 1.5},
    "constant_offset_std": {"training.constant_offset_std": 0.3},
    "time_mask_prob": {"training.num_time_masks": 2, "training.max_time_mask": 4,
                       "training.time_mask_prob": 0.5},
    "warmup_steps": {"training.warmup_steps": 11, "training.lr_schedule": "cosine"},
    "bad_step_lr_factor": {"training.bad_step_lr_factor": 0.7},
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_interrupted_and_resumed_run_equals_straight_run(stores, tmp_path, monkeypatch, option):
    train_dir, dev_dir = stores
    if option == "bad_step_lr_factor":
        monkeypatch.setattr(step_module, "ctc_loss", _nan_for_some_batches(step_module.ctc_loss))
    config = tiny_config(num_epochs=3, learning_rate=0.05, warmup_epochs=0.5).replace(
        OPTIONS[option])
    straight = train(config, train_dir, dev_dir, model_dir=tmp_path / "straight")
    with pytest.raises(_Stop):
        train(config, train_dir, dev_dir, model_dir=tmp_path / "cut",
              epoch_callback=_stop_after(2))
    resumed = train(config, train_dir, dev_dir, model_dir=tmp_path / "cut")
    assert resumed.resumed_from_epoch == 2
    a = load_checkpoint_file(tmp_path / "straight" / "last.pt")
    b = load_checkpoint_file(tmp_path / "cut" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["schedule"] == b["schedule"]
    assert _untimed(resumed.history) == _untimed(straight.history)
    if option == "bad_step_lr_factor":
        assert straight.skipped_steps_total > 0


# ---- metrics.jsonl ----

def _metrics(model_dir):
    return pd.read_json(model_dir / METRICS_FILE, lines=True)


def test_metrics_file_round_trips_through_pandas(stores, tmp_path):
    train_dir, dev_dir = stores
    # clipping at 0.01: the recorded norms are from before clipping, so larger
    result = train(tiny_config(num_epochs=3, max_grad_norm=0.01), train_dir, dev_dir,
                   model_dir=tmp_path)
    frame = _metrics(tmp_path)
    assert list(frame.columns) == list(FIELDS)
    assert frame["epoch"].tolist() == [1, 2, 3]
    for column in FIELDS:
        assert frame[column].tolist() == pytest.approx([h[column] for h in result.history])
    assert (frame["grad_norm_mean"] > 0.01).all()
    assert (frame["grad_norm_max"] >= frame["grad_norm_mean"]).all()
    assert (frame["peak_memory_bytes"] > 2**20).all()
    assert (frame["skipped_steps"] == 0).all() and (frame["scaler_backoffs"] == 0).all()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_metrics_without_dev_data_write_null(stores, tmp_path):
    train_dir, _ = stores
    train(tiny_config(num_epochs=1), train_dir, model_dir=tmp_path)
    line = json.loads((tmp_path / METRICS_FILE).read_text())
    assert line["dev_error"] is None
    assert math.isnan(_metrics(tmp_path)["dev_error"][0])


def test_metrics_survive_a_resume_without_duplicates(stores, tmp_path):
    train_dir, dev_dir = stores
    config = tiny_config(num_epochs=4, noise_std=0.1)
    straight = train(config, train_dir, dev_dir, model_dir=tmp_path / "straight")
    with pytest.raises(_Stop):
        train(config, train_dir, dev_dir, model_dir=tmp_path / "cut",
              epoch_callback=_stop_after(2))
    assert _metrics(tmp_path / "cut")["epoch"].tolist() == [1, 2]
    # a kill after epoch 3's metrics line but before its checkpoint would leave a line
    # the checkpoint does not know: resuming replaces it rather than repeating epoch 3
    path = tmp_path / "cut" / METRICS_FILE
    path.write_text(path.read_text() + json.dumps({"epoch": 3, "train_loss": 99.0}) + "\n")
    train(config, train_dir, dev_dir, model_dir=tmp_path / "cut")
    frame = _metrics(tmp_path / "cut")
    assert frame["epoch"].tolist() == [1, 2, 3, 4]
    expected = pd.DataFrame(_untimed(straight.history))
    pd.testing.assert_frame_equal(frame.drop(columns=list(TIMING)), expected)


def test_checkpoint_from_before_the_new_parameters_resumes(stores, tmp_path):
    train_dir, dev_dir = stores
    config = tiny_config(num_epochs=2)
    with pytest.raises(_Stop):
        train(config, train_dir, dev_dir, model_dir=tmp_path, epoch_callback=_stop_after(1))
    state = load_checkpoint_file(tmp_path / "last.pt")
    new = ("layer_norm", "input_dropout", "input_smoothing_width", "constant_offset_std",
           "time_mask_prob", "warmup_steps", "bad_step_lr_factor", "amp_dtype")
    state["signature"]["config"] = "\n".join(
        line for line in state["signature"]["config"].splitlines()
        if line.split(" = ")[0] not in new)
    del state["schedule"]["bad_scale"]
    save_atomic(state, tmp_path / "last.pt")
    result = train(config, train_dir, dev_dir, model_dir=tmp_path)
    assert result.resumed_from_epoch == 1 and result.epochs_run == 2
    with pytest.raises(UserError, match=r"training.warmup_steps \(0 -> 3\)"):
        train(config.replace({"training.warmup_steps": 3}), train_dir, dev_dir,
              model_dir=tmp_path)


# ---- mixed precision: the autocast dtype and fp16 loss-scale back-offs ----

MIXED = {**Config().group("training"), "mixed_precision": True}


@pytest.fixture
def fake_gpu(monkeypatch):
    """Pretend CUDA is there with a GPU of the given compute capability."""

    def install(capability, emulates_bf16=True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(torch.cuda, "device", lambda device: _Nothing())
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(
            torch.cuda, "is_bf16_supported",
            lambda including_emulation=True: capability[0] >= 8 or (
                including_emulation and emulates_bf16))

    return install


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_autocast_dtype_is_none_without_mixed_precision_or_cuda(fake_gpu):
    assert autocast_dtype({**MIXED, "mixed_precision": False}, "cuda") is None
    assert autocast_dtype(MIXED, "cpu") is None
    fake_gpu((8, 0))
    assert autocast_dtype({**MIXED, "mixed_precision": False}, "cuda:0") is None
    assert autocast_dtype(MIXED, torch.device("cpu")) is None


def test_auto_takes_bf16_only_where_it_is_native(fake_gpu, caplog):
    fake_gpu((7, 5))  # a T4: torch.cuda.is_bf16_supported() says yes (emulation)
    assert torch.cuda.is_bf16_supported()
    assert autocast_dtype(MIXED, "cuda") is torch.float16
    assert autocast_dtype({**MIXED, "amp_dtype": "fp16"}, "cuda") is torch.float16
    with caplog.at_level(logging.WARNING, logger="cnn_mellin.training"):
        assert autocast_dtype({**MIXED, "amp_dtype": "bf16"}, "cuda") is torch.bfloat16
    assert "only emulates bf16" in caplog.text
    fake_gpu((8, 0))  # an A100
    assert autocast_dtype(MIXED, "cuda:0") is torch.bfloat16
    assert autocast_dtype({**MIXED, "amp_dtype": "fp16"}, "cuda") is torch.float16


def test_bf16_on_a_gpu_without_it_is_a_user_error(fake_gpu):
    fake_gpu((6, 1), emulates_bf16=False)
    assert autocast_dtype(MIXED, "cuda") is torch.float16
    with pytest.raises(UserError, match="amp_dtype: Fake GPU cannot run bf16"):
        autocast_dtype({**MIXED, "amp_dtype": "bf16"}, "cuda")


def test_rocm_counts_as_native_bf16(fake_gpu, monkeypatch):
    fake_gpu((9, 0))
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda device=None: pytest.fail("not asked on ROCm"))
    assert autocast_dtype(MIXED, "cuda") is torch.bfloat16


def _nan_gradient(real):
    def loss(log_probs, *args):  # finite value, NaN gradient
        return real(log_probs, *args) + torch.sqrt(log_probs.sum() * 0.0)

    return loss


def test_fp16_loss_scale_backoffs_are_not_bad_steps(stores, tmp_path, monkeypatch):
    train_dir, dev_dir = stores
    monkeypatch.setattr(step_module, "ctc_loss", _nan_gradient(step_module.ctc_loss))
    config = tiny_config(num_epochs=3, max_bad_steps=5, bad_step_lr_factor=0.5)
    # float32 without a loss scaler: 5 bad steps in a row end the run
    with pytest.raises(TrainingDiverged, match="5 consecutive"):
        train(config, train_dir, dev_dir, model_dir=tmp_path / "fp32")
    # with the fp16 loss scaler (on the CPU here: float32 maths, the scaler's logic): the
    # scale starts at 2**16 and halves on each overflow; 16 back-offs bring it to 1, and
    # only then are non-finite gradients bad steps (5 more: diverged in epoch 3)
    monkeypatch.setattr(step_module, "needs_loss_scaling", lambda dtype: True)
    seen = []
    with pytest.raises(TrainingDiverged, match=r"5 consecutive .*\(epoch 3,"):
        train(config, train_dir, dev_dir, model_dir=tmp_path / "fp16",
              epoch_callback=lambda *args: seen.append(args))
    history = load_checkpoint_file(tmp_path / "fp16" / "last.pt")["history"]
    assert [h["scaler_backoffs"] for h in history] == [8, 8]  # 8 steps per epoch
    assert [h["skipped_steps"] for h in history] == [0, 0]
    assert [h["lr"] for h in history] == [h["lr"] for h in train(
        tiny_config(num_epochs=3), train_dir, dev_dir, model_dir=tmp_path / "plain").history][:2]
    assert len(seen) == 2
