"""What the attacker minimises, and its gradient with respect to the dummy input.

Both sides use the training loss, CTC per target phone. The victim's shared gradient
(:func:`shared_gradient`) is ``g* = dL/dθ`` at the real utterance; the attack's objective is
``D(g(x), g*)`` (:func:`gradient_distance`) plus an optional prior on the dummy, where
``g(x) = dL/dθ`` at the dummy ``x``. Its gradient with respect to ``x`` is the mixed
second derivative of the loss applied to ``v = dD/dg``:

    dD/dx = d/dx <dL/dθ(x; θ), v> = d/dh [dL/dx(x; θ + h v)] at h = 0,

which :class:`Objective` computes in one of three ways (``attack.hvp``):

- ``forward``: ``(dL/dx(x; θ + h v) - dL/dx(x; θ)) / h``, where ``dL/dx(x; θ)`` comes with
  ``dL/dθ`` from the same backward pass: two first-order passes in all, with the fused
  ``F.ctc_loss`` and the fused recurrent kernels (2.1-2.5x one forward + parameter
  gradient on the default victim, ``bench/attack_step.py``);
- ``central``: ``(dL/dx(x; θ + h v) - dL/dx(x; θ - h v)) / 2h``: three passes, error O(h²)
  instead of O(h) on smooth victims;
- ``exact``: double backward (``create_graph=True``) through the victim and the CTC forward
  recursion written in tensor operations (:func:`ctc_loss`), since the fused CTC has no
  second derivative: 18-31x a plain gradient, kept as the reference the others are tested
  against.

``h`` is set so that ``h |v| = attack.fd_epsilon |θ|``. On a victim with ReLUs the finite
differences are not the (almost everywhere) exact derivative but a smoothed one: a
perturbation of the weights moves some units across their kink, which the exact derivative
ignores (``docs/benchmarks.md`` has both compared on reconstruction quality).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from cnn_mellin.data.phones import BLANK

_NEG = -1e30  # "log 0" that keeps the recursion's gradients finite


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CTC loss of one sequence divided by its target length, twice differentiable.

    ``log_probs`` (T, C) of the victim's outputs, ``targets`` (S,) phone ids without blanks.
    Equals ``F.ctc_loss(..., reduction="none") / S`` (the training loss).
    """
    steps = log_probs.shape[0]
    labels = torch.full((2 * len(targets) + 1,), BLANK, dtype=torch.long,
                        device=log_probs.device)
    labels[1::2] = targets
    emit = log_probs[:, labels]  # (T, 2S+1)
    size = labels.numel()
    skip = torch.zeros(size, dtype=torch.bool, device=log_probs.device)
    skip[2:] = (labels[2:] != BLANK) & (labels[2:] != labels[:-2])
    neg = log_probs.new_full((size,), _NEG)
    alpha = torch.cat([emit[0, :2], neg[2:]])  # a path starts with a blank or the first phone
    for t in range(1, steps):
        one = torch.cat([neg[:1], alpha[:-1]])
        two = torch.where(skip, torch.cat([neg[:2], alpha[:-2]]), neg)
        alpha = torch.logsumexp(torch.stack([alpha, one, two]), 0) + emit[t]
    end = torch.logsumexp(alpha[-2:], 0) if size > 1 else alpha[-1]
    return -end / max(len(targets), 1)


def fused_ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """:func:`ctc_loss` by ``F.ctc_loss`` (fast, first derivative only)."""
    steps, length = log_probs.shape[0], len(targets)
    loss = F.ctc_loss(log_probs[:, None], targets[None], torch.tensor([steps]),
                      torch.tensor([length]), blank=BLANK, reduction="none")[0]
    return loss / max(length, 1)


def victim_loss(model: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor,
                twice_differentiable: bool = False) -> torch.Tensor:
    """The training loss of one utterance, ``feats`` (1, T, F) raw."""
    log_probs, _ = model(feats)
    loss = ctc_loss if twice_differentiable else fused_ctc_loss
    return loss(log_probs[:, 0].float(), targets)


def parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The victim's parameters whose gradient is shared."""
    return [p for p in model.parameters() if p.requires_grad]


def shared_gradient(
    model: torch.nn.Module, feats: torch.Tensor, targets: torch.Tensor,
    defence: Mapping[str, Any], generator: torch.Generator,
) -> list[torch.Tensor]:
    """The gradient the victim shares for one utterance, after its defences.

    ``feats`` (1, T, F) raw features; ``defence`` the ``defence`` group (short names).
    """
    was_training = model.training
    model.train(bool(defence["victim_dropout"]))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
            grads = torch.autograd.grad(victim_loss(model, feats, targets), parameters(model))
    finally:
        model.train(was_training)
    grads = [g.detach() for g in grads]
    keep = float(defence["gradient_keep_fraction"])
    if keep < 1.0:
        grads = apply_masks(grads, top_mask(grads, keep))
    std = float(defence["gradient_noise_std"])
    if std > 0:
        grads = [g + std * torch.randn(g.shape, generator=generator).to(g) for g in grads]
    return grads


def top_mask(grads: Sequence[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Masks of the ``fraction`` largest-magnitude entries over all gradients together."""
    flat = torch.cat([g.abs().flatten() for g in grads])
    count = max(1, int(math.ceil(fraction * flat.numel())))
    threshold = torch.topk(flat, count, sorted=False).values.min()
    return [g.abs() >= threshold for g in grads]


def apply_masks(grads, masks):
    """Each gradient times its mask."""
    return [g * m for g, m in zip(grads, masks, strict=True)]


def gradient_distance(
    grads: Sequence[torch.Tensor], target: Sequence[torch.Tensor], kind: str,
    masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``l2`` (sum of squares), ``l1`` or ``cosine`` (1 - cosine similarity) distance."""
    if masks is not None:
        grads, target = apply_masks(grads, masks), apply_masks(target, masks)
    if kind == "l2":
        return sum(((g - t) ** 2).sum() for g, t in zip(grads, target, strict=True))
    if kind == "l1":
        return sum((g - t).abs().sum() for g, t in zip(grads, target, strict=True))
    dot = sum((g * t).sum() for g, t in zip(grads, target, strict=True))
    norm_g = torch.sqrt(sum((g ** 2).sum() for g in grads) + 1e-20)
    norm_t = torch.sqrt(sum((t ** 2).sum() for t in target) + 1e-20)
    return 1.0 - dot / (norm_g * norm_t)


def regulariser(z: torch.Tensor, kind: str) -> torch.Tensor:
    """``tv`` (mean absolute change between frames) or ``l2`` (mean square) of the dummy."""
    if kind == "tv":
        return (z[:, 1:] - z[:, :-1]).abs().mean() if z.shape[1] > 1 else z.new_zeros(())
    if kind == "l2":
        return (z ** 2).mean()
    return z.new_zeros(())


def _flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def distance_and_direction(flat: torch.Tensor, target: torch.Tensor, kind: str,
                           mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`gradient_distance` of flat gradients and its gradient with respect to ``flat``.

    ``target`` is already masked; written out rather than by autograd, which costs a
    quarter of a forward pass on a victim of 1.7 M parameters.
    """
    if mask is not None:
        flat = flat * mask
    if kind == "cosine":
        norm_g = float(flat.norm().clamp_min(1e-10))
        norm_t = float(target.norm().clamp_min(1e-10))
        cosine = flat.dot(target) / (norm_g * norm_t)
        value = 1.0 - cosine
        direction = torch.mul(flat, float(cosine) / norm_g ** 2)
        direction.add_(target, alpha=-1.0 / (norm_g * norm_t))
    else:
        diff = flat - target
        if kind == "l2":
            value, direction = diff.dot(diff), diff.mul_(2)
        else:
            value, direction = diff.abs().sum(), diff.sign_()
    return value, direction if mask is None else direction.mul_(mask)


class Objective:
    """The attack's loss of a dummy and its gradient with respect to a part of the dummy.

    ``attack``: the ``attack`` group (short names); ``mean``/``std``: the victim's feature
    normalisation (the dummy lives in normalised space).
    """

    def __init__(self, model: torch.nn.Module, targets: torch.Tensor,
                 target_grads: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None,
                 attack: Mapping[str, Any], mean: torch.Tensor, std: torch.Tensor):
        self.model, self.targets = model, targets
        self.params = parameters(model)
        self.target_grads, self.masks = list(target_grads), masks
        self.mean, self.std = mean, std
        self.kind, self.hvp = attack["distance"], attack["hvp"]
        self.prior = attack["regulariser"]
        self.prior_weight = float(attack["regulariser_weight"])
        self.epsilon = float(attack["fd_epsilon"])
        with torch.no_grad():
            self.theta = [p.detach().clone() for p in self.params]
            self.theta_norm = float(_flat(self.theta).norm())
            self.mask = None if masks is None else _flat(masks).to(self.theta[0].dtype)
            self.target = _flat(self.target_grads)
            if self.mask is not None:
                self.target = self.target * self.mask
        self.sizes = [p.numel() for p in self.params]

    def distance(self, dummy: torch.Tensor) -> float:
        """The gradient distance alone of a dummy (normalised space, no prior)."""
        with torch.enable_grad():
            loss = victim_loss(self.model, self._feats(dummy), self.targets)
            grads = torch.autograd.grad(loss, self.params)
        with torch.no_grad():
            return float(distance_and_direction(_flat(grads), self.target, self.kind,
                                                self.mask)[0])

    def loss_and_grad(self, z: torch.Tensor, start: int, end: int,
                      part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The objective at ``z`` with frames ``start:end`` replaced by ``part``, and its
        gradient with respect to ``part`` (both detached)."""

        def build(leaf):
            return torch.cat([z[:, :start], leaf, z[:, end:]], 1)

        with torch.enable_grad():
            part = part.detach().requires_grad_(True)
            if self.hvp == "exact":
                total, grad = self._exact(build(part), part)
            else:
                total, grad = self._finite_difference(build, part)
            if self.prior != "none":
                prior = self.prior_weight * regulariser(build(part), self.prior)
                grad = grad + torch.autograd.grad(prior, part)[0]
                total = total + prior
        return total.detach(), grad.detach()

    def _feats(self, dummy):
        return dummy * self.std + self.mean

    def _exact(self, dummy, part):
        loss = victim_loss(self.model, self._feats(dummy), self.targets,
                           twice_differentiable=True)
        grads = torch.autograd.grad(loss, self.params, create_graph=True)
        total = gradient_distance(grads, self.target_grads, self.kind, self.masks)
        return total, torch.autograd.grad(total, part)[0]

    def _finite_difference(self, build, part):
        forward = self.hvp == "forward"
        loss = victim_loss(self.model, self._feats(build(part)), self.targets)
        # the forward difference's base point comes with the parameter gradient
        out = torch.autograd.grad(loss, self.params + [part] if forward else self.params)
        with torch.no_grad():
            total, direction = distance_and_direction(
                _flat(out[:len(self.params)]), self.target, self.kind, self.mask)
            scale = float(direction.norm())
        if not (math.isfinite(float(total)) and math.isfinite(scale)) or scale == 0:
            return total, torch.full_like(part, math.nan if scale != 0 else 0.0)
        h = self.epsilon * self.theta_norm / scale
        upper = self._input_grad(build, part, direction, h)
        lower = out[-1] if forward else self._input_grad(build, part, direction, -h)
        return total, (upper - lower) / (h if forward else 2 * h)

    def _input_grad(self, build, part, direction, h):
        """dL/d(part) with the victim's parameters moved by ``h * direction`` (flat)."""
        data = [p.data for p in self.params]
        steps = [d.view_as(p) for d, p in zip(direction.split(self.sizes), data, strict=True)]
        torch._foreach_add_(data, steps, alpha=h)
        try:
            leaf = part.detach().requires_grad_(True)
            loss = victim_loss(self.model, self._feats(build(leaf)), self.targets)
            return torch.autograd.grad(loss, leaf)[0]
        finally:
            torch._foreach_copy_(data, self.theta)
