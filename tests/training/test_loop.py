"""The trainer on tiny stores: learning, determinism, resume, robustness, callbacks."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from cnn_mellin.decoding import decode
from cnn_mellin.errors import ConfigError, DataError, UserError
from cnn_mellin.modelfile import load_checkpoint_file
from cnn_mellin.training import TrainingDiverged, train
from cnn_mellin.training import step as step_module
from cnn_mellin.training.metrics import FIELDS
from tests.training_fixtures import tiny_config, write_store


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
    dev_dir = write_store(root / "dev", 10, seed=1, prefix="d")
    return train_dir, dev_dir


def _weights(model_dir, name="last.pt"):
    state = load_checkpoint_file(model_dir / name)
    return state["model"] if "model" in state else state["state_dict"]


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


FAST = {"learning_rate": 0.05, "warmup_epochs": 0.5, "lr_schedule": "none"}


def test_training_learns_and_model_file_scores_as_reported(stores, tmp_path):
    train_dir, dev_dir = stores
    result = train(tiny_config(num_epochs=10, **FAST), train_dir, dev_dir, model_dir=tmp_path)
    errors = [h["dev_error"] for h in result.history]
    assert result.epochs_run == 10 and len(errors) == 10
    assert min(errors) < 0.3 and errors[0] > 0.5
    assert result.best_dev_error == min(errors)
    assert result.history[result.best_epoch - 1]["dev_error"] == result.best_dev_error
    assert result.final_dev_error == errors[-1]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert set(result.history[0]) == set(FIELDS)
    # model.pt is the best epoch by actual dev error and decodes to that error on its own
    assert result.model_path == tmp_path / "model.pt"
    decoded = decode(tmp_path, dev_dir)
    assert decoded.per == pytest.approx(result.best_dev_error)
    assert decoded.num_utts == 10 and len(decoded.hypotheses) == 10
    assert all(isinstance(p, str) for h in decoded.hypotheses.values() for p in h)


def test_checkpoints_load_with_weights_only(stores, tmp_path):
    train_dir, dev_dir = stores
    train(tiny_config(num_epochs=1), train_dir, dev_dir, model_dir=tmp_path)
    for name in ("last.pt", "model.pt"):
        obj = torch.load(tmp_path / name, weights_only=True)
        assert isinstance(obj, dict)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"model", "optimizer", "schedule", "scaler", "rng", "epoch", "history"} <= set(last)
    assert {"torch", "numpy", "python", "cuda"} <= set(last["rng"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_same_seed_same_result_other_seed_differs(stores, tmp_path):
    train_dir, dev_dir = stores
    config = tiny_config(num_epochs=3, noise_std=0.1, num_time_masks=1, **FAST)
    a = train(config, train_dir, dev_dir, model_dir=tmp_path / "a")
    b = train(config, train_dir, dev_dir, model_dir=tmp_path / "b")
    train(config.replace({"training.seed": 1}), train_dir, dev_dir, model_dir=tmp_path / "c")
    timing = ("seconds", "cpu_seconds", "peak_memory_bytes")
    strip = [{k: v for k, v in h.items() if k not in timing} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k not in timing} for h in b.history]
    assert _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "c"))


class _Stop(Exception):
    pass


def test_callback_sees_each_epoch_and_its_exception_stops_cleanly_then_resume_matches(
    stores, tmp_path
):
    train_dir, dev_dir = stores
    config = tiny_config(num_epochs=4, noise_std=0.2, max_time_warp=2, **FAST)
    straight = train(config, train_dir, dev_dir, model_dir=tmp_path / "straight")

    seen = []

    def callback(epoch, train_loss, dev_error):
        seen.append((epoch, train_loss, dev_error))
        if epoch == 2:
            raise _Stop

    with pytest.raises(_Stop):
        train(config, train_dir, dev_dir, model_dir=tmp_path / "cut", epoch_callback=callback)
    assert [s[0] for s in seen] == [1, 2]
    assert seen[1][1] == straight.history[1]["train_loss"]
    assert seen[1][2] == straight.history[1]["dev_error"]
    assert load_checkpoint_file(tmp_path / "cut" / "last.pt")["epoch"] == 2

    # the restored epochs are replayed first: a process killed between checkpoint and
    # callback must not lose that epoch's report
    seen.clear()
    resumed = train(config, train_dir, dev_dir, model_dir=tmp_path / "cut",
                    epoch_callback=lambda *args: seen.append(args))
    assert [s[0] for s in seen] == [1, 2, 3, 4]
    assert [s[2] for s in seen] == [h["dev_error"] for h in straight.history]
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_run == 4
    assert straight.resumed_from_epoch is None
    assert _same_weights(_weights(tmp_path / "straight"), _weights(tmp_path / "cut"))
    assert resumed.final_dev_error == straight.final_dev_error
    assert resumed.best_epoch == straight.best_epoch

    # a finished run is not trained again
    again = train(config, train_dir, dev_dir, model_dir=tmp_path / "cut")
    assert again.resumed_from_epoch == 4 and again.epochs_run == 4
    assert again.history == resumed.history


def test_resume_with_another_configuration_is_a_user_error(stores, tmp_path):
    train_dir, dev_dir = stores
    train(tiny_config(num_epochs=1), train_dir, dev_dir, model_dir=tmp_path)
    with pytest.raises(UserError, match="training.learning_rate"):
        train(tiny_config(num_epochs=1, learning_rate=0.5), train_dir, dev_dir,
              model_dir=tmp_path)
    with pytest.raises(UserError, match="different dev data"):
        train(tiny_config(num_epochs=1), train_dir, train_dir, model_dir=tmp_path)


def test_non_finite_losses_are_skipped_and_counted(stores, tmp_path, monkeypatch):
    train_dir, dev_dir = stores
    real = step_module.ctc_loss
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * math.nan if calls["n"] % 3 == 0 else loss

    monkeypatch.setattr(step_module, "ctc_loss", flaky)
    result = train(tiny_config(num_epochs=2), train_dir, dev_dir, model_dir=tmp_path)
    batches_per_epoch = 8  # 32 utterances, batch size 4
    assert result.skipped_steps_total == (2 * batches_per_epoch) // 3
    assert sum(h["skipped_steps"] for h in result.history) == result.skipped_steps_total
    assert math.isfinite(result.history[-1]["train_loss"])
    for value in _weights(tmp_path).values():
        assert torch.isfinite(value).all()


def test_non_finite_gradients_are_skipped(stores, tmp_path, monkeypatch):
    train_dir, dev_dir = stores
    real = step_module.ctc_loss
    calls = {"n": 0}

    def nan_gradient(log_probs, *args):
        calls["n"] += 1
        loss = real(log_probs, *args)
        if calls["n"] == 2:
            # finite value, NaN gradient: d/dx sqrt(0 * x) at 0 is inf * 0
            loss = loss + torch.sqrt(log_probs.sum() * 0.0)
        return loss

    monkeypatch.setattr(step_module, "ctc_loss", nan_gradient)
    result = train(tiny_config(num_epochs=1), train_dir, dev_dir, model_dir=tmp_path)
    assert result.skipped_steps_total == 1
    for value in _weights(tmp_path).values():
        assert torch.isfinite(value).all()


def test_too_many_consecutive_bad_steps_raise_training_diverged(stores, tmp_path, monkeypatch):
    train_dir, dev_dir = stores
    real = step_module.ctc_loss
    calls = {"n": 0}

    def broken_after_three(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * math.inf if calls["n"] > 3 else loss

    monkeypatch.setattr(step_module, "ctc_loss", broken_after_three)
    with pytest.raises(TrainingDiverged, match="5 consecutive"):
        train(tiny_config(num_epochs=2, max_bad_steps=5), train_dir, dev_dir,
              model_dir=tmp_path)
    assert calls["n"] == 3 + 5


def test_over_long_targets_are_reported_not_crashed_on(tmp_path, caplog):
    train_dir = write_store(tmp_path / "train", 12, seed=3, long_targets={"u004"})
    dev_dir = write_store(tmp_path / "dev", 4, seed=4, prefix="d")
    with caplog.at_level(logging.WARNING, logger="cnn_mellin.training"):
        result = train(tiny_config(num_epochs=1), train_dir, dev_dir, model_dir=tmp_path / "m")
    assert result.impossible_utts == ["u004"]
    assert "u004" in caplog.text and "CTC cannot align" in caplog.text
    assert math.isfinite(result.history[0]["train_loss"])


def test_feasibility_counts_repeated_neighbours():
    targets = torch.tensor([[1, 1, 2, 0], [1, 2, 3, 4]])
    lens = torch.tensor([3, 4])
    # "1 1 2" needs a blank between the 1s: 4 outputs; "1 2 3 4" needs 4
    assert step_module.ctc_feasible(targets, lens, torch.tensor([3, 4])).tolist() == [False, True]
    assert step_module.ctc_feasible(targets, lens, torch.tensor([4, 3])).tolist() == [True, False]


def test_all_utterances_too_short_is_a_data_error(tmp_path):
    train_dir = write_store(tmp_path / "train", 3, seed=3, long_targets={"u000", "u001", "u002"})
    with pytest.raises(DataError, match="every utterance"):
        train(tiny_config(num_epochs=1), train_dir, model_dir=tmp_path / "m")


def test_without_dev_data_training_loss_selects_the_model(stores, tmp_path):
    train_dir, _ = stores
    result = train(tiny_config(num_epochs=2, **FAST), train_dir, model_dir=tmp_path)
    assert all(math.isnan(h["dev_error"]) for h in result.history)
    assert math.isnan(result.best_dev_error)
    assert result.best_epoch == 2  # the loss fell
    assert (tmp_path / "model.pt").exists()


def test_dev_utterances_from_the_training_store(stores, tmp_path):
    train_dir, _ = stores
    ids = [f"u{i:03d}" for i in range(32)]
    result = train(tiny_config(num_epochs=1), train_dir, model_dir=tmp_path,
                   train_utts=ids[:24], dev_utts=ids[24:])
    assert math.isfinite(result.final_dev_error)
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["signature"]["dev_utts"] == ids[24:]
    with pytest.raises(DataError, match="both the training and dev"):
        train(tiny_config(num_epochs=1), train_dir, model_dir=tmp_path / "x",
              train_utts=ids[:25], dev_utts=ids[24:])


def test_early_stopping_stops_and_is_remembered(stores, tmp_path):
    train_dir, dev_dir = stores
    # a threshold of 1 means no later epoch can count as an improvement
    config = tiny_config(num_epochs=6, early_stopping_patience=2, early_stopping_threshold=1.0,
                         early_stopping_burnin=1)
    result = train(config, train_dir, dev_dir, model_dir=tmp_path)
    assert result.stopped_early and result.epochs_run == 4  # burn-in 1, best at 2, bad 3 and 4
    again = train(config, train_dir, dev_dir, model_dir=tmp_path)
    assert again.epochs_run == 4 and again.stopped_early


def test_gradient_accumulation_and_schedule_steps(stores, tmp_path):
    train_dir, dev_dir = stores
    train(tiny_config(num_epochs=2, grad_accumulation=3), train_dir, dev_dir, model_dir=tmp_path)
    last = load_checkpoint_file(tmp_path / "last.pt")
    assert last["schedule"]["steps"] == 2 * math.ceil(8 / 3)


def test_every_augmentation_and_optimizer_option_trains(stores, tmp_path):
    train_dir, dev_dir = stores
    augment = {
        "noise_std": 0.1, "num_time_masks": 2, "max_time_mask": 5, "num_freq_masks": 1,
        "max_freq_mask": 2, "max_time_warp": 3, "max_freq_warp": 1,
        "random_shift_proportion": 0.05,
    }
    for i, (opt, schedule) in enumerate(
        [("adamw", "plateau"), ("sgd", "none"), ("rmsprop", "cosine")]
    ):
        config = tiny_config(num_epochs=2, optimizer=opt, lr_schedule=schedule,
                             weight_decay=1e-4, learning_rate=1e-3, **augment)
        result = train(config, train_dir, dev_dir, model_dir=tmp_path / str(i))
        assert result.epochs_run == 2 and result.skipped_steps_total == 0
        assert math.isfinite(result.history[-1]["train_loss"])


def test_bad_arguments(stores, tmp_path):
    train_dir, dev_dir = stores
    with pytest.raises(UserError, match="model directory"):
        train(tiny_config(), train_dir, dev_dir)
    with pytest.raises(DataError):
        train(tiny_config(), tmp_path / "nowhere", dev_dir, model_dir=tmp_path / "m")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA is not available"):
            train(tiny_config(), train_dir, dev_dir, model_dir=tmp_path / "m", device="cuda")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_loader_workers_do_not_change_the_result(stores, tmp_path):
    train_dir, dev_dir = stores
    config = tiny_config(num_epochs=2, noise_std=0.1, **FAST)
    a = train(config, train_dir, dev_dir, model_dir=tmp_path / "a")
    b = train(config, train_dir, dev_dir, model_dir=tmp_path / "b", num_workers=1)
    assert _same_weights(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert a.final_dev_error == b.final_dev_error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("amp_dtype", ["auto", "bf16", "fp16"])
def test_mixed_precision_on_cuda(stores, tmp_path, amp_dtype):
    from cnn_mellin.training import autocast_dtype
    from cnn_mellin.training.precision import native_bf16

    train_dir, dev_dir = stores
    if amp_dtype == "bf16" and not native_bf16(torch.device("cuda")):
        pytest.skip("this GPU only emulates bf16")
    config = tiny_config(num_epochs=3, mixed_precision=True, amp_dtype=amp_dtype, **FAST)
    dtype = autocast_dtype(config.group("training"), "cuda")
    assert dtype in (torch.bfloat16, torch.float16)
    result = train(config, train_dir, dev_dir, model_dir=tmp_path, device="cuda")
    assert result.epochs_run == 3
    assert math.isfinite(result.history[-1]["train_loss"])
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    last = load_checkpoint_file(tmp_path / "last.pt")
    # fp16 uses (and checkpoints) a loss scaler; bf16 none
    assert bool(last["scaler"]) == (dtype == torch.float16)
    resumed = train(config, train_dir, dev_dir, model_dir=tmp_path)
    assert resumed.resumed_from_epoch == 3


class _StopAfter:
    """stop_requested that turns true after ``n`` optimiser-step checks."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self):
        self.calls += 1
        return self.calls > self.n


@pytest.mark.parametrize("accumulation, cut_after", [(1, 4), (2, 3), (1, 8)])
def test_stop_mid_epoch_checkpoints_that_step_and_resume_matches_uninterrupted(
    stores, tmp_path, accumulation, cut_after
):
    from cnn_mellin.training import TrainingInterrupted

    train_dir, dev_dir = stores
    config = tiny_config(num_epochs=3, noise_std=0.2, max_time_warp=2, num_time_masks=1,
                         grad_accumulation=accumulation, **FAST)
    config = config.replace({"model.dropout": 0.2})
    straight = train(config, train_dir, dev_dir, model_dir=tmp_path / "straight")
    stop = _StopAfter(cut_after)
    with pytest.raises(TrainingInterrupted) as cut:
        train(config, train_dir, dev_dir, model_dir=tmp_path / "cut", stop_requested=stop)
    saved = load_checkpoint_file(tmp_path / "cut" / "last.pt")
    # 32 utterances in batches of 4: 8 batches an epoch (the last stop is the epoch's end)
    steps_per_epoch = 8 // accumulation
    assert cut.value.step == cut_after and saved["schedule"]["steps"] == cut_after
    assert saved["mid_epoch"]["epoch"] == cut.value.epoch == 1 + (cut_after - 1) // \
        steps_per_epoch
    assert saved["mid_epoch"]["batches"] == cut.value.batches > 0
    resumed = train(config, train_dir, dev_dir, model_dir=tmp_path / "cut")
    assert resumed.resumed_from_step == cut_after
    assert resumed.resumed_from_epoch == cut.value.epoch - 1
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
    timing = ("seconds", "cpu_seconds", "peak_memory_bytes")
    strip = [{k: v for k, v in h.items() if k not in timing} for h in straight.history]
    assert strip == [{k: v for k, v in h.items() if k not in timing} for h in resumed.history]
    assert "mid_epoch" not in load_checkpoint_file(tmp_path / "cut" / "last.pt")


def test_stop_between_epochs_keeps_the_epoch_checkpoint(stores, tmp_path):
    from cnn_mellin.training import TrainingInterrupted

    train_dir, dev_dir = stores
    config = tiny_config(num_epochs=2, **FAST)
    scored = []

    def callback(epoch, *_):
        scored.append(epoch)  # the stop arrives while epoch 1 is scored

    def stop():
        return bool(scored)

    with pytest.raises(TrainingInterrupted) as cut:
        train(config, train_dir, dev_dir, model_dir=tmp_path, stop_requested=stop,
              epoch_callback=callback)
    assert cut.value.epoch == 2 and cut.value.batches == 0 and cut.value.step == 8
    saved = load_checkpoint_file(tmp_path / "last.pt")
    assert saved["epoch"] == 1 and "mid_epoch" not in saved


def test_utterances_no_output_can_align_are_a_configuration_error():
    # in a search this is an invalid configuration (pruned), not a data error that stops
    # the worker: another configuration downsamples less
    from types import SimpleNamespace

    from cnn_mellin.training.loop import _drop_impossible

    model = SimpleNamespace(output_lengths=lambda frames: frames // 100)
    data = SimpleNamespace(num_frames=[50, 60], utt_ids=["a", "b"], num_targets=[3, 4])
    with pytest.raises(ConfigError, match="every utterance has more target phones"):
        _drop_impossible(model, data, "train")
