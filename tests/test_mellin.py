"""Tests for cnn_mellin.mellin against loops written straight from the formulas."""

import itertools

import pytest
import torch

from cnn_mellin import mellin

torch.set_num_threads(1)

# (s, d, p, r) per axis, chosen to hit exact and inexact divisions, edges and extra outputs
HYPERS = [(1, 1, 0, 0), (2, 1, 0, 0), (1, 2, 1, 0), (1, 1, 2, 1), (3, 2, 3, 2), (2, 3, 5, 4),
          (1, 1, 1, 3)]


def naive_mcorr_index(i, k, s, d, p, width):
    num = (i + s) * (k + d)
    if num % (p + 1):
        return None
    j = num // (p + 1) - 1
    return j if 0 <= j < width else None


def naive_lcorr_index(i, k, s, d, p, width):
    j = s * i - p + d * k
    return j if 0 <= j < width else None


def naive_mcorr_size(width, kernel, s, d, p, r):
    return max((width * (p + 1)) // (kernel + d - 1) - s + 1, 0) + r


def naive_lcorr_size(width, kernel, s, d, p, r):
    return max((width - 1 - d * (kernel - 1) + p) // s + 1, 0) + r


def naive_1d(x, w, b, hyper, index, size):
    n_batch, c_in, width = x.shape
    c_out, _, kernel = w.shape
    out = torch.zeros(n_batch, c_out, size(width, kernel, *hyper), dtype=x.dtype)
    for n, o, i in itertools.product(range(n_batch), range(c_out), range(out.shape[2])):
        acc = b[o].clone() if b is not None else torch.zeros((), dtype=x.dtype)
        for c, k in itertools.product(range(c_in), range(kernel)):
            j = index(i, k, *hyper[:3], width)
            if j is not None:
                acc = acc + w[o, c, k] * x[n, c, j]
        out[n, o, i] = acc
    return out


def naive_2d(x, w, b, hw, hf, index_w, size_w):
    n_batch, c_in, width, freq = x.shape
    c_out, _, kw, kf = w.shape
    out = torch.zeros(n_batch, c_out, size_w(width, kw, *hw), naive_lcorr_size(freq, kf, *hf),
                      dtype=x.dtype)
    for n, o, i, g in itertools.product(*(range(v) for v in out.shape)):
        acc = b[o].clone() if b is not None else torch.zeros((), dtype=x.dtype)
        for c, k, q in itertools.product(range(c_in), range(kw), range(kf)):
            j = index_w(i, k, *hw[:3], width)
            f = naive_lcorr_index(g, q, *hf[:3], freq)
            if j is not None and f is not None:
                acc = acc + w[o, c, k, q] * x[n, c, j, f]
        out[n, o, i, g] = acc
    return out


def _rand(*shape, dtype=torch.float64, grad=False):
    return torch.randn(*shape, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("width,kernel", [(1, 1), (7, 3), (12, 4)])
@pytest.mark.parametrize("c_in", [1, 3])
def test_mcorr1d_matches_naive(hyper, width, kernel, c_in):
    torch.manual_seed(0)
    x, w, b = _rand(2, c_in, width), _rand(4, c_in, kernel), _rand(4)
    expected = naive_1d(x, w, b, hyper, naive_mcorr_index, naive_mcorr_size)
    actual = mellin.mcorr1d(x, w, b, *hyper)
    assert actual.shape == expected.shape
    assert actual.shape[2] == mellin.mcorr_output_size(width, kernel, *hyper)
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(mellin.mcorr1d(x, w, None, *hyper),
                               naive_1d(x, w, None, hyper, naive_mcorr_index, naive_mcorr_size))


@pytest.mark.parametrize("hyper", HYPERS)
@pytest.mark.parametrize("width,kernel", [(1, 1), (7, 3), (12, 4)])
def test_lcorr1d_matches_naive(hyper, width, kernel):
    torch.manual_seed(1)
    x, w, b = _rand(2, 3, width), _rand(4, 3, kernel), _rand(4)
    expected = naive_1d(x, w, b, hyper, naive_lcorr_index, naive_lcorr_size)
    actual = mellin.lcorr1d(x, w, b, *hyper)
    assert actual.shape[2] == mellin.lcorr_output_size(width, kernel, *hyper)
    torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("hw,hf", [(HYPERS[0], HYPERS[0]), (HYPERS[3], HYPERS[1]),
                                   (HYPERS[4], HYPERS[2]), (HYPERS[5], HYPERS[6]),
                                   (HYPERS[6], HYPERS[4])])
@pytest.mark.parametrize("c_in", [1, 2])
def test_mcorrlcorr_and_lcorrlcorr_match_naive(hw, hf, c_in):
    torch.manual_seed(2)
    x, w, b = _rand(2, c_in, 9, 6), _rand(3, c_in, 3, 2), _rand(3)
    expected = naive_2d(x, w, b, hw, hf, naive_mcorr_index, naive_mcorr_size)
    actual = mellin.mcorrlcorr(x, w, b, *zip(hw, hf, strict=True))
    torch.testing.assert_close(actual, expected)
    expected = naive_2d(x, w, b, hw, hf, naive_lcorr_index, naive_lcorr_size)
    torch.testing.assert_close(mellin.lcorrlcorr(x, w, b, *zip(hw, hf, strict=True)), expected)


@pytest.mark.parametrize("hyper", HYPERS[1:])
def test_gradcheck_1d(hyper):
    torch.manual_seed(3)
    x, w, b = _rand(2, 2, 10, grad=True), _rand(3, 2, 3, grad=True), _rand(3, grad=True)
    for op in (mellin.mcorr1d, mellin.lcorr1d):
        assert torch.autograd.gradcheck(lambda x, w, b, op=op: op(x, w, b, *hyper), (x, w, b))


@pytest.mark.parametrize("hw,hf", [(HYPERS[1], HYPERS[3]), (HYPERS[3], HYPERS[2]),
                                   (HYPERS[4], HYPERS[5]), (HYPERS[5], HYPERS[0])])
@pytest.mark.parametrize("c_in", [1, 2])
def test_gradcheck_2d(hw, hf, c_in):
    torch.manual_seed(4)
    x, w, b = (_rand(2, c_in, 9, 7, grad=True), _rand(2, c_in, 3, 2, grad=True),
               _rand(2, grad=True))
    hyper = tuple(zip(hw, hf, strict=True))
    for op in (mellin.mcorrlcorr, mellin.lcorrlcorr):
        assert torch.autograd.gradcheck(lambda x, w, b, op=op: op(x, w, b, *hyper), (x, w, b))


@pytest.mark.parametrize("c_in", [1, 2])
def test_double_backward(c_in):
    torch.manual_seed(5)
    x, w, b = (_rand(2, c_in, 8, 5, grad=True), _rand(2, c_in, 3, 3, grad=True),
               _rand(2, grad=True))
    hyper = ((1, 2), (1, 1), (2, 1), (1, 1))
    assert torch.autograd.gradgradcheck(lambda x, w, b: mellin.mcorrlcorr(x, w, b, *hyper),
                                        (x, w, b))


@pytest.mark.parametrize("width,kernel,hyper", [(2, 3, (1, 1, 0, 0)), (5, 2, (6, 1, 0, 0)),
                                                (3, 4, (1, 3, 0, 0))])
def test_zero_size_outputs(width, kernel, hyper):
    assert mellin.mcorr_output_size(width, kernel, *hyper) == 0
    x, w = _rand(2, 3, width, grad=True), _rand(4, 3, kernel, grad=True)
    out = mellin.mcorr1d(x, w, None, *hyper)
    assert out.shape == (2, 4, 0)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    # extra outputs on an otherwise empty result follow the formula: bias only here
    b = _rand(4)
    out = mellin.mcorr1d(x, w, b, hyper[0], hyper[1], hyper[2], 2)
    expected = naive_1d(x, w, b, (*hyper[:3], 2), naive_mcorr_index, naive_mcorr_size)
    torch.testing.assert_close(out, expected)
    assert mellin.lcorr_output_size(2, 4) == 0
    assert mellin.lcorr1d(_rand(1, 1, 2), _rand(1, 1, 4)).shape == (1, 1, 0)
    assert mellin.mcorrlcorr(_rand(1, 1, 4, 2), _rand(1, 1, 1, 3)).shape == (1, 1, 4, 0)


def test_bad_hyperparameters_and_shapes():
    x, w = _rand(1, 2, 5), _rand(1, 2, 2)
    with pytest.raises(ValueError, match="s >= 1"):
        mellin.mcorr1d(x, w, s=0)
    with pytest.raises(ValueError, match="p >= 0"):
        mellin.lcorr1d(x, w, p=-1)
    with pytest.raises(ValueError, match="channels"):
        mellin.mcorr1d(x, _rand(1, 3, 2))
    with pytest.raises(ValueError, match="dimensions"):
        mellin.mcorrlcorr(x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_and_autocast(dtype):
    torch.manual_seed(6)
    x, w, b = _rand(2, 3, 8, 6), _rand(4, 3, 3, 3), _rand(4)
    hyper = ((1, 1), (1, 1), (2, 1), (0, 0))
    expected = mellin.mcorrlcorr(x, w, b, *hyper)
    out = mellin.mcorrlcorr(x.to(dtype), w.to(dtype), b.to(dtype), *hyper)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=0.1, rtol=0.05)
    if dtype is torch.bfloat16:
        xf = x.float().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mellin.mcorrlcorr(xf, w.float(), b.float(), *hyper)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert xf.grad.dtype == torch.float32


def test_channels_last_and_strided_inputs_agree():
    torch.manual_seed(7)
    x, w, b = _rand(3, 2, 10, 7), _rand(3, 2, 2, 3), _rand(3)
    hyper = ((1, 2), (2, 1), (3, 1), (1, 2))
    expected = mellin.mcorrlcorr(x, w, b, *hyper)
    torch.testing.assert_close(
        mellin.mcorrlcorr(x.contiguous(memory_format=torch.channels_last), w, b, *hyper),
        expected)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(mellin.mcorrlcorr(xt, w, b, *hyper), expected)


def test_modules():
    torch.manual_seed(8)
    x = _rand(2, 3, 12, 5).float()
    for cls in (mellin.MCorrLCorr, mellin.LCorrLCorr):
        mod = cls(3, 4, (3, 2), s=(1, 2), d=1, p=(2, 0), r=(1, 0))
        functional = mellin.mcorrlcorr if cls is mellin.MCorrLCorr else mellin.lcorrlcorr
        torch.testing.assert_close(
            mod(x), functional(x, mod.weight, mod.bias, (1, 2), (1, 1), (2, 0), (1, 0)))
        assert "kernel_size=(3, 2)" in repr(mod)
    x1 = x[..., 0]
    for cls, functional in ((mellin.MCorr1d, mellin.mcorr1d), (mellin.LCorr1d, mellin.lcorr1d)):
        mod = cls(3, 2, 3, s=2, d=1, p=1, r=1, bias=False)
        assert mod.bias is None
        torch.testing.assert_close(mod(x1), functional(x1, mod.weight, None, 2, 1, 1, 1))


def test_mellin_init_uses_effective_fan_in():
    # taps 0 and 1 of a (p + 1) = 3 Mellin kernel land on an exact index for 1 output in 3
    assert mellin.mcorr_tap_density(3, d=1, p=2) == pytest.approx(1 / 3 + 1 / 3 + 1)
    assert mellin.mcorr_tap_density(4, d=1, p=0) == 4
    torch.manual_seed(9)
    mod = mellin.MCorr1d(64, 64, 3, p=2)
    bound = 1 / (64 * (5 / 3)) ** 0.5
    assert mod.weight.abs().max() <= bound
    assert mod.weight.abs().max() > 0.9 * bound


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_autocasts():
    torch.manual_seed(10)
    hyper = ((1, 2), (2, 1), (1, 1), (2, 1))
    for c_in in (1, 3):
        x, w, b = (_rand(2, c_in, 9, 7, grad=True), _rand(4, c_in, 3, 3, grad=True),
                   _rand(4, grad=True))
        for op in (mellin.mcorrlcorr, mellin.lcorrlcorr):
            out = op(x, w, b, *hyper)
            out.square().sum().backward()
            grads = [t.grad.clone() for t in (x, w, b)]
            xc, wc, bc = (t.detach().cuda().requires_grad_() for t in (x, w, b))
            out_cuda = op(xc, wc, bc, *hyper)
            out_cuda.square().sum().backward()
            torch.testing.assert_close(out_cuda.cpu(), out)
            for grad, t in zip(grads, (xc, wc, bc), strict=True):
                torch.testing.assert_close(t.grad.cpu(), grad)
            for t in (x, w, b):
                t.grad = None
            with torch.autocast("cuda", dtype=torch.float16):
                half = op(xc.float(), wc.float(), bc.float(), *hyper)
            assert half.dtype == torch.float16
            torch.testing.assert_close(half.double().cpu(), out, atol=0.05, rtol=0.02)
