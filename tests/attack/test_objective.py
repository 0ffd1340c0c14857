"""The attack's objective: the distance's written-out gradient and the finite-difference step
against the exact double backward."""

from __future__ import annotations

import pytest
import torch

from cnn_mellin.attack import Objective, shared_gradient
from cnn_mellin.attack.objective import distance_and_direction, gradient_distance, top_mask
from cnn_mellin.config import Config
from cnn_mellin.model import AcousticModel
from cnn_mellin.params.attack import GROUPS
from tests.training_fixtures import NUM_COEFFS, TINY_MODEL


@pytest.mark.parametrize("kind", ["l2", "l1", "cosine"])
@pytest.mark.parametrize("masked", [False, True])
def test_distance_and_direction_equal_autograd_of_the_distance(kind, masked):
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, dtype=torch.float64, generator=generator),
             torch.randn(7, dtype=torch.float64, generator=generator)]
    target = [torch.randn_like(g) for g in grads]
    masks = top_mask(target, 0.3) if masked else None
    leaves = [g.clone().requires_grad_(True) for g in grads]
    value = gradient_distance(leaves, target, kind, masks)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(value, leaves)])
    mask = None if masks is None else torch.cat([m.flatten() for m in masks]).double()
    flat_target = torch.cat([t.flatten() for t in target])
    mine, direction = distance_and_direction(
        torch.cat([g.flatten() for g in grads]), flat_target if mask is None
        else flat_target * mask, kind, mask)
    assert float(mine) == pytest.approx(float(value.detach()), rel=1e-12)
    assert torch.allclose(direction, expected, atol=1e-14)


def _step(model, kind: str, hvp: str, epsilon: float = 1e-3):
    """(loss, gradient) of the attack's objective at a fixed dummy."""
    config = Config({"attack.hvp": hvp, "attack.fd_epsilon": epsilon,
                     "attack.distance": kind}, GROUPS)
    generator = torch.Generator().manual_seed(1)
    feats = torch.randn(1, 28, NUM_COEFFS, generator=generator)
    targets = torch.tensor([3, 10, 17, 25])
    target_grads = shared_gradient(model, feats, targets, config.group("defence"),
                                   torch.Generator())
    objective = Objective(model, targets, target_grads, None, config.group("attack"),
                          model.feat_mean, model.feat_std)
    dummy = torch.randn(1, 28, NUM_COEFFS, generator=generator)
    before = [p.detach().clone() for p in model.parameters()]
    loss, grad = objective.loss_and_grad(dummy, 5, 20, dummy[:, 5:20])
    # the parameters moved for the finite differences are put back exactly
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    return loss, grad


@pytest.mark.parametrize("kind", ["cosine", "l2", "l1"])
def test_the_finite_difference_step_agrees_with_the_exact_double_backward(kind):
    # A tiny victim (one tanh correlation layer, one LSTM layer; smooth, so that the finite
    # differences converge to the exact derivative), float32 as the attack runs. Measured
    # 2026-12-02, relative error (norm of the difference / norm of the exact gradient):
    # forward at the default fd_epsilon 1e-4: 0.9e-3 to 1.2e-3; forward at 1e-3: 1.3e-3 to
    # 3.9e-3 (error O(epsilon)); central at 1e-3: 4e-5 to 2.0e-4 (O(epsilon^2)). The bounds
    # leave 2.5x to 5x of room.
    torch.manual_seed(0)
    model = AcousticModel({**{k.split(".")[1]: v for k, v in TINY_MODEL.items()},
                           "convolutional_nonlinearity": "tanh"}, NUM_COEFFS).eval()
    exact_loss, exact = _step(model, kind, "exact")
    for hvp, epsilon, bound in (("forward", 1e-4, 5e-3), ("forward", 1e-3, 1e-2),
                                ("central", 1e-3, 1e-3)):
        loss, grad = _step(model, kind, hvp, epsilon)
        assert float(loss) == pytest.approx(float(exact_loss), rel=1e-5)  # fused vs written CTC
        error = float((grad - exact).norm() / exact.norm())
        assert error < bound, (hvp, error)
