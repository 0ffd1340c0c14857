"""Tests for the acoustic model, its layer plan and its configuration checks."""

import pytest
import torch

from cnn_mellin import mellin
from cnn_mellin.config import Config
from cnn_mellin.errors import ConfigError, DataError
from cnn_mellin.model import (
    AcousticModel,
    check_model_config,
    model_values,
    plan_layers,
    repair_model_config,
)
from cnn_mellin.params.model import GROUP

torch.set_num_threads(1)

SMALL = {"convolutional_initial_channels": 3, "recurrent_size": 8, "window_size": 5,
         "window_stride": 2, "raw_window_size": 24, "raw_window_stride": 8}


def _batch(num_coeffs, lens, seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lens), max(lens), num_coeffs, generator=gen)
    return feats, torch.tensor(lens)


@pytest.mark.parametrize("mellin_time", [False, True])
@pytest.mark.parametrize("num_coeffs", [1, 13])
def test_forward_backward_shapes(mellin_time, num_coeffs):
    torch.manual_seed(0)
    params = {**SMALL, "convolutional_mellin": mellin_time}
    model = AcousticModel(params, num_coeffs, num_classes=7)
    stride = 8 if num_coeffs == 1 else 2
    lens = [40, 33, 17] if num_coeffs == 1 else [20, 13, 7]
    feats, feat_lens = _batch(num_coeffs, lens)
    log_probs, out_lens = model(feats, feat_lens)
    assert log_probs.shape == (-(-max(lens) // stride), 3, 7)
    assert out_lens.tolist() == [-(-n // stride) for n in lens]
    assert torch.equal(out_lens, model.output_lengths(feat_lens))
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(log_probs.shape[:2]))
    targets = torch.tensor([[1, 2], [3, 3], [4, 1]])
    loss = torch.nn.functional.ctc_loss(log_probs, targets, out_lens, torch.tensor([2, 2, 2]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("overrides", [
    {"convolutional_mellin": False},
    {"convolutional_mellin": True, "convolutional_factor_sched": 2, "convolutional_layers": 3},
    {"convolutional_mellin": True, "recurrent_type": "gru", "recurrent_bidirectional": False},
    {"recurrent_type": "rnn", "recurrent_layers": 1},
    {"layer_norm": True, "input_smoothing_width": 1.5},
    {"layer_norm": True, "recurrent_bidirectional": False, "input_smoothing_width": 0.7,
     "convolutional_mellin": True},
])
@pytest.mark.parametrize("num_coeffs", [1, 9])
def test_padding_does_not_change_outputs(overrides, num_coeffs):
    torch.manual_seed(1)
    model = AcousticModel({**SMALL, **overrides}, num_coeffs).eval()
    lens = [45, 30, 9] if num_coeffs == 1 else [23, 16, 5]
    feats, feat_lens = _batch(num_coeffs, lens, seed=2)
    for n, length in enumerate(lens):  # garbage in the padding must not matter either
        feats[n, length:] = 1e3
    log_probs, out_lens = model(feats, feat_lens)
    for n, length in enumerate(lens):
        alone, alone_lens = model(feats[n:n + 1, :length], feat_lens[n:n + 1])
        assert alone_lens.item() == out_lens[n].item()
        torch.testing.assert_close(log_probs[:out_lens[n], n], alone[:, 0], atol=1e-5, rtol=1e-5)
    # no lengths means every sequence fills the batch
    full, _ = model(feats[:1, :lens[0]], None)
    torch.testing.assert_close(full, log_probs[:, :1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mellin_time", [False, True])
@pytest.mark.parametrize("overrides", [
    {},
    {"convolutional_factor_sched": 2, "convolutional_layers": 4, "convolutional_time_factor": 3,
     "convolutional_freq_factor": 2, "convolutional_kernel_time": 4},
    {"window_size": 13, "convolutional_kernel_time": 1, "convolutional_kernel_freq": 5,
     "convolutional_time_factor": 4},
])
def test_layer_plan_sizes_match_the_ops(mellin_time, overrides):
    params = {**SMALL, "convolutional_mellin": mellin_time, **overrides}
    plans = plan_layers(params, 17)
    assert len(plans) == model_values(params)["convolutional_layers"]
    time_size, freq_size = model_values(params)["window_size"], 17
    sched = model_values(params)["convolutional_factor_sched"]
    time_op = mellin.mcorr_output_size if mellin_time else mellin.lcorr_output_size
    for index, plan in enumerate(plans, 1):
        assert plan.in_size == (time_size, freq_size)
        tf = params.get("convolutional_time_factor", 2) if index % sched == 0 else 1
        ff = params.get("convolutional_freq_factor", 2) if index % sched == 0 else 1
        assert plan.out_size == (-(-time_size // tf), -(-freq_size // ff))
        assert time_op(time_size, plan.kernel[0], plan.s[0], plan.d[0], plan.p[0],
                       plan.r[0]) == plan.out_size[0]
        assert mellin.lcorr_output_size(freq_size, plan.kernel[1], plan.s[1], plan.d[1],
                                        plan.p[1], plan.r[1]) == plan.out_size[1]
        time_size, freq_size = plan.out_size
    model = AcousticModel(params, 17)
    x = torch.randn(2, 1, model_values(params)["window_size"], 17)
    for conv, plan in zip(model.convs, plans, strict=True):
        x = conv(x)
        assert tuple(x.shape[1:]) == (plan.out_channels, *plan.out_size)


def test_raw_input_ignores_frequency_parameters():
    plans = plan_layers({**SMALL, "convolutional_kernel_freq": 7,
                         "convolutional_freq_factor": 3}, 1)
    assert all(p.kernel[1] == 1 and p.out_size[1] == 1 for p in plans)
    assert plans[0].in_size[0] == SMALL["raw_window_size"]


def test_no_convolutions_and_no_recurrence():
    torch.manual_seed(3)
    feats, lens = _batch(6, [12, 9])
    for params in ({"convolutional_layers": 0}, {"recurrent_layers": 0},
                   {"convolutional_layers": 0, "recurrent_layers": 0}):
        model = AcousticModel({**SMALL, **params}, 6)
        log_probs, out_lens = model(feats, lens)
        assert log_probs.shape == (6, 2, 49)
        log_probs.sum().backward()


def test_normalisation_buffers_are_saved_and_applied():
    torch.manual_seed(4)
    mean, std = torch.randn(5), torch.rand(5) + 0.5
    model = AcousticModel(SMALL, 5, mean=mean, std=std).eval()
    plain = AcousticModel(SMALL, 5).eval()
    state = model.state_dict()
    assert torch.equal(state["feat_mean"], mean) and torch.equal(state["feat_std"], std)
    plain.load_state_dict({**state, "feat_mean": torch.zeros(5), "feat_std": torch.ones(5)})
    feats, lens = _batch(5, [11, 8])
    torch.testing.assert_close(model(feats, lens)[0], plain((feats - mean) / std, lens)[0])
    restored = AcousticModel(SMALL, 5)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored.eval()(feats, lens)[0], model(feats, lens)[0])
    with pytest.raises(DataError, match="mean must hold 5"):
        AcousticModel(SMALL, 5, mean=[0.0, 1.0])


def test_dropout_settings():
    model = AcousticModel({**SMALL, "dropout": 0.3, "convolutional_dropout_2d": True}, 4)
    assert isinstance(model.conv_dropout, torch.nn.Dropout2d) and model.conv_dropout.p == 0.3
    feats, lens = _batch(4, [10, 7])
    model.eval()
    torch.testing.assert_close(model(feats, lens)[0], model(feats, lens)[0])
    model.train()
    assert not torch.equal(model(feats, lens)[0], model(feats, lens)[0])


def test_check_model_config_errors():
    with pytest.raises(ConfigError, match=r"model\.window_stride \(4\) exceeds model\.window_size"):
        check_model_config({"window_size": 3, "window_stride": 4}, 40)
    with pytest.raises(ConfigError, match=r"model\.raw_window_stride"):
        check_model_config({"raw_window_size": 100, "raw_window_stride": 101}, 1)
    check_model_config({"window_size": 3, "window_stride": 4}, 1)  # inactive for raw
    with pytest.raises(ConfigError, match="unknown model parameter 'windows'"):
        check_model_config({"windows": 3}, 40)
    with pytest.raises(ConfigError, match=r"model\.recurrent_type: expected one of lstm"):
        check_model_config({"recurrent_type": "transformer"}, 40)
    with pytest.raises(DataError, match="at least one coefficient"):
        check_model_config({}, 0)
    with pytest.raises(ConfigError, match="window_stride"):
        AcousticModel({"window_size": 2, "window_stride": 3}, 40)


def test_repair_model_config():
    repaired = repair_model_config({"window_size": 3, "window_stride": 5, "dropout": 0.2}, 40)
    assert repaired["window_stride"] == 3 and repaired["dropout"] == 0.2
    assert set(repaired) == {p.name for p in GROUP.params}
    raw = repair_model_config({"raw_window_size": 50, "raw_window_stride": 80}, 1)
    assert raw["raw_window_stride"] == 50
    assert repair_model_config({}, 40) == model_values({})


def test_group_defaults_and_search_ranges_are_valid_models():
    check_model_config(Config().group("model"), 81)
    values = {f"model.{p.name}": p.default for p in GROUP.params}
    for param in GROUP.params:
        assert param.doc and "=" not in param.doc  # the recipe rewrites lines with sed
        if param.search is None or param.search.choices is not None:
            continue
        for bound in (param.search.low, param.search.high):
            params = {p.name: p.default for p in GROUP.params} | {param.name: bound}
            num_coeffs = 1 if param.name.startswith("raw_") else 81
            AcousticModel(repair_model_config(params, num_coeffs), num_coeffs)
    assert values["model.convolutional_mellin"] is False


def test_inactive_parameters():
    values = {f"model.{p.name}": p.default for p in GROUP.params}
    active = {p.name: p.active(values, 1) for p in GROUP.params if p.active}
    assert not active["window_size"] and active["raw_window_size"]
    assert not active["convolutional_kernel_freq"] and not active["convolutional_freq_factor"]
    assert not active["convolutional_dropout_2d"]  # dropout is 0
    no_conv = {**values, "model.convolutional_layers": 0}
    assert not GROUP["convolutional_mellin"].active(no_conv, 81)
    assert not GROUP["recurrent_size"].active({**values, "model.recurrent_layers": 0}, 81)
    assert not GROUP["convolutional_time_factor"].active(
        {**values, "model.convolutional_factor_sched": 3}, 81)
    assert not GROUP["layer_norm"].active({**values, "model.recurrent_layers": 0}, 81)
    assert GROUP["layer_norm"].active(values, 81)


def test_stage_ini_files_differ_only_in_mellin():
    mcorr = Config.from_ini(["conf/optim/model-mcorr-sm.ini"])
    lcorr = Config.from_ini(["conf/optim/model-lcorr-sm.ini"])
    assert mcorr["model.convolutional_mellin"] and not lcorr["model.convolutional_mellin"]
    assert {k for k in mcorr if mcorr[k] != lcorr[k]} == {"model.convolutional_mellin"}


def test_second_order_gradients_through_the_model():
    torch.manual_seed(5)
    model = AcousticModel({**SMALL, "convolutional_mellin": True}, 6)
    feats = torch.randn(1, 14, 6, requires_grad=True)
    log_probs, _ = model(feats, torch.tensor([14]))
    grads = torch.autograd.grad(-log_probs[:, :, 3].sum(), list(model.parameters()),
                                create_graph=True)
    sum((g ** 2).sum() for g in grads).backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


def _recurrent_inputs(model):
    """Record the input of every recurrent layer (forward direction) on the next call."""
    seen = []
    for rnn in model.forward_rnns:
        rnn.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


@pytest.mark.parametrize("bidirectional", [True, False])
def test_layer_norm_normalises_the_input_of_every_recurrent_layer(bidirectional):
    torch.manual_seed(6)
    params = {**SMALL, "recurrent_layers": 3, "recurrent_bidirectional": bidirectional}
    plain = AcousticModel(params, 7).eval()
    normed = AcousticModel({**params, "layer_norm": True}, 7).eval()
    assert len(normed.norms) == 3 and not plain.norms
    assert normed.norms[0].normalized_shape == (plain.forward_rnns[0].input_size,)
    feats, lens = _batch(7, [15, 15], seed=3)
    seen_plain, seen_normed = _recurrent_inputs(plain), _recurrent_inputs(normed)
    plain(feats, lens)
    normed(feats, lens)
    assert len(seen_normed) == 3
    for x in seen_normed:  # a fresh LayerNorm: zero mean, unit variance per position
        torch.testing.assert_close(x.mean(-1), torch.zeros(x.shape[:2]), atol=1e-5, rtol=0)
        # (var / (var + eps): a little under 1 for small inputs)
        torch.testing.assert_close(x.var(-1, unbiased=False), torch.ones(x.shape[:2]),
                                   atol=1e-2, rtol=0)
    assert not torch.allclose(seen_plain[0].mean(-1), torch.zeros(seen_plain[0].shape[:2]),
                              atol=1e-3)
    assert {"norms.0.weight", "norms.2.bias"} <= set(normed.state_dict())


def test_input_dropout_zeroes_and_rescales_single_input_values():
    torch.manual_seed(7)
    model = AcousticModel({**SMALL, "input_dropout": 0.5}, 6)
    seen = []
    model.convs[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    feats, lens = _batch(6, [40, 40], seed=4)
    model.eval()
    model(feats, lens)
    model.train()
    model(feats, lens)
    clean, dropped = seen  # windows of the normalised input, (windows, 1, size, F)
    zeroed = dropped == 0
    assert 0.4 < float(zeroed.float().mean()) < 0.6
    torch.testing.assert_close(dropped[~zeroed], 2 * clean[~zeroed])
    assert AcousticModel(SMALL, 6).input_dropout.p == 0


def test_input_smoothing_is_a_gaussian_along_time_inside_each_sequence():
    torch.manual_seed(8)
    width = 2.0
    model = AcousticModel({**SMALL, "input_smoothing_width": width, "window_size": 1,
                           "window_stride": 1, "convolutional_layers": 0}, 3).eval()
    seen = []
    model.forward_rnns[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach()))
    feats = torch.zeros(2, 41, 3)
    feats[0, 20, 0] = 1.0  # an impulse in the middle of the first sequence
    feats[1, :25] = 5.0  # a constant over the whole second sequence (25 frames)
    feats[1, 25:] = 100.0  # padding
    model(feats, torch.tensor([41, 25]))
    x = seen[0]  # (T', N, F): one window per frame here
    impulse = x[:, 0, 0]
    t = torch.arange(41.0)
    assert impulse.sum() == pytest.approx(1.0, abs=1e-5)
    centre = (impulse * t).sum()
    assert centre == pytest.approx(20.0, abs=1e-4)
    assert ((impulse * (t - centre) ** 2).sum()).sqrt() == pytest.approx(width, rel=0.02)
    assert (x[:, 0, 1:] == 0).all()  # other coefficients untouched
    # a constant stays constant up to the sequence's edges, and the padding stays zero
    torch.testing.assert_close(x[:25, 1], torch.full((25, 3), 5.0))
    assert (x[25:, 1] == 0).all()


def test_smoothing_is_not_saved_with_the_weights():
    torch.manual_seed(9)
    smooth = AcousticModel({**SMALL, "input_smoothing_width": 1.0}, 5)
    assert "smoothing" not in smooth.state_dict()
    AcousticModel(SMALL, 5).load_state_dict(smooth.state_dict())
