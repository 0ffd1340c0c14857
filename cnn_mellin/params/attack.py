"""The ``attack`` and ``defence`` groups: gradient inversion against a trained model.

The attack optimises a dummy input (in the victim's normalised feature space) until the
gradient it induces matches the gradient the real utterance induced; the defence group is
what the victim side does to the gradient it shares, so that defences can be tuned too.
These groups belong to the ``attack`` command and trial task only (not to ``.ini`` files
of training).
"""

from cnn_mellin.config import Group, Param, Search


def _regularised(values, num_coeffs):
    return values["attack.regulariser"] != "none"


def _chunked(values, num_coeffs):
    return values["attack.grid_size"] > 0


def _not_lbfgs(values, num_coeffs):
    return values["attack.optimizer"] != "lbfgs"


def _finite_difference(values, num_coeffs):
    return values["attack.hvp"] != "exact"


GROUP = Group(
    "attack",
    "Gradient inversion: how the dummy input is optimised to match the victim's gradient.",
    [
        Param(
            "optimizer", str, "adam", "Optimiser of the dummy input.",
            choices=("adam", "sgd", "lbfgs"), search=Search(choices=("adam", "sgd", "lbfgs")),
        ),
        Param(
            "learning_rate", float, 0.05, "Learning rate of the dummy input's optimiser.",
            low=1e-8, high=100.0, search=Search(1e-3, 1.0, log=True),
        ),
        Param(
            "iterations", int, 300, "Optimiser steps per chunk of the dummy input.",
            low=1, high=1000000, search=Search(50, 800, log=True),
        ),
        Param(
            "init", str, "mean", "Initial dummy: uniform or gaussian noise (normalised "
            "space), zeros (raw features) or the dataset mean.",
            choices=("uniform", "gaussian", "zeros", "mean"),
            search=Search(choices=("uniform", "gaussian", "zeros", "mean")),
        ),
        Param(
            "distance", str, "cosine", "Distance between the dummy's and the victim's gradient.",
            choices=("l2", "cosine", "l1"), search=Search(choices=("l2", "cosine", "l1")),
        ),
        Param(
            "top_fraction", float, 1.0, "Share of the victim's gradient entries matched, largest "
            "magnitudes first.", low=1e-6, high=1.0, search=Search(0.01, 1.0, log=True),
        ),
        Param(
            "regulariser", str, "none", "Prior on the dummy: none, total variation along time, "
            "or L2.", choices=("none", "tv", "l2"), search=Search(choices=("none", "tv", "l2")),
        ),
        Param(
            "regulariser_weight", float, 1e-3, "Weight of the regulariser.",
            low=0.0, high=1e6, search=Search(1e-5, 1.0, log=True), active=_regularised,
        ),
        Param(
            "grid_size", int, 0, "Frames per chunk of the dummy optimised at a time while the "
            "full gradient is matched (0: the whole utterance at once).",
            low=0, high=1000000, search=Search(choices=(0, 25, 50, 100)),
        ),
        Param(
            "grid_overlap", int, 0, "Frames shared by successive chunks.",
            low=0, high=1000000, search=Search(0, 50), active=_chunked,
        ),
        Param(
            "normalise_steps", bool, False, "Divide each step's dummy gradient by its norm "
            "(keeps long utterances finite).", search=Search(choices=(False, True)),
            active=_not_lbfgs,
        ),
        Param(
            "restarts", int, 1, "Times the whole attack runs from a new start (a new draw of "
            "the random inits; the fixed ones plus unit Gaussian noise); the restart with the "
            "smallest final gradient distance wins.",
            low=1, high=1000, search=Search(1, 3),
        ),
        Param(
            "hvp", str, "forward", "How the dummy's gradient (the victim's mixed second "
            "derivative times the distance's gradient) is computed: forward or central "
            "finite differences of first-order gradients (2 or 3 passes), or exact double "
            "backward (the slow reference).", choices=("forward", "central", "exact"),
        ),
        Param(
            "fd_epsilon", float, 1e-4, "Finite-difference step: the victim's parameters move "
            "by this share of their norm.", low=1e-8, high=1.0,
            search=Search(1e-4, 1e-2, log=True), active=_finite_difference,
        ),
        Param(
            "lr_schedule", str, "constant", "Learning-rate schedule within a chunk.",
            choices=("constant", "cosine", "step"),
            search=Search(choices=("constant", "cosine", "step")),
        ),
        Param(
            "max_bad_steps", int, 20, "Non-finite steps skipped per chunk before the attack "
            "counts as diverged.", low=0, high=1000000,
        ),
        Param(
            "eval_every", int, 25, "Steps between recorded loss/MAE points (and the pruner's "
            "intermediate values).", low=1, high=1000000,
        ),
        Param(
            "seed", int, 0, "Seed of the initial dummy and the victim's randomness.",
            low=0, high=2**31 - 1,
        ),
    ],
)

DEFENCE = Group(
    "defence",
    "What the victim does to the gradient it shares (the attack runs against it).",
    [
        Param(
            "gradient_noise_std", float, 0.0, "Standard deviation of Gaussian noise added to "
            "every gradient entry.", low=0.0, high=1e6, search=Search(0.0, 0.1),
        ),
        Param(
            "gradient_keep_fraction", float, 1.0, "Share of gradient entries kept, largest "
            "magnitudes first (sparsification); the rest are zeroed.",
            low=1e-6, high=1.0, search=Search(0.01, 1.0, log=True),
        ),
        Param(
            "victim_dropout", bool, False, "Compute the shared gradient with the victim in "
            "training mode (its dropout on), which the attacker cannot replay.",
            search=Search(choices=(False, True)),
        ),
    ],
)

GROUPS = (GROUP, DEFENCE)
