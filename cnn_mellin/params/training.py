"""The ``training`` group: optimisation, schedules, augmentation, early stopping, robustness.

Mask widths are capped twice: by ``max_time_mask`` / ``max_freq_mask`` (frames /
coefficients) and by a proportion of the utterance length / number of
coefficients; a very large cap (the reference recipe writes 10000) leaves only the
proportion limit. No parameter other than those two has a name of the form
``max_..._mask``, and no doc here contains an equals sign, because the recipe
rewrites lines matching ``max_.*_mask *=`` with sed.
"""

from cnn_mellin.config import Group, Param, Search


def _optimizer_in(*names):
    return lambda values, num_coeffs: values["training.optimizer"] in names


def _schedule_is(name):
    return lambda values, num_coeffs: values["training.lr_schedule"] == name


def _time_masks(values, num_coeffs):
    return values["training.num_time_masks"] > 0


def _freq(values, num_coeffs):
    return num_coeffs > 1


def _freq_masks(values, num_coeffs):
    return num_coeffs > 1 and values["training.num_freq_masks"] > 0


def _warmup_in_epochs(values, num_coeffs):
    return values["training.warmup_steps"] == 0


def _mixed_precision(values, num_coeffs):
    return values["training.mixed_precision"]


def _early_stopping(values, num_coeffs):
    return values["training.early_stopping_patience"] > 0


GROUP = Group(
    "training",
    "CTC training: optimiser, learning-rate schedule, augmentation, early stopping.",
    [
        Param(
            "num_epochs", int, 30, "Passes over the training data.",
            low=1, high=100000, search=Search(5, 60),
        ),
        Param(
            "seed", int, 0, "Seed of every random choice in training (init, shuffling, masks).",
            low=0, high=2**31 - 1,
        ),
        Param(
            "optimizer", str, "adam", "Optimiser.",
            choices=("adam", "adamw", "sgd", "rmsprop"),
            search=Search(choices=("adam", "adamw", "sgd", "rmsprop")),
        ),
        Param(
            "learning_rate", float, 2e-3, "Peak learning rate (reached after warmup).",
            low=1e-10, high=10.0, search=Search(1e-5, 1e-1, log=True),
        ),
        Param(
            "weight_decay", float, 0.0,
            "Weight decay (L2 penalty; decoupled for adamw).",
            low=0.0, high=1.0, search=Search(1e-7, 1e-2, log=True),
        ),
        Param(
            "momentum", float, 0.9, "Momentum of sgd and rmsprop.",
            low=0.0, high=0.999, search=Search(0.0, 0.99),
            active=_optimizer_in("sgd", "rmsprop"),
        ),
        Param(
            "lr_schedule", str, "cosine",
            "Learning-rate schedule after warmup: none (constant), cosine (decay over all "
            "epochs) or plateau (reduce when the dev error stops improving).",
            choices=("none", "cosine", "plateau"),
            search=Search(choices=("none", "cosine", "plateau")),
        ),
        Param(
            "warmup_epochs", float, 1.0,
            "Epochs of linear learning-rate warmup from zero (fractions allowed; 0 for none); "
            "ignored when warmup_steps is above 0.",
            low=0.0, high=1000.0, search=Search(0.0, 5.0), active=_warmup_in_epochs,
        ),
        Param(
            "warmup_steps", int, 0,
            "Optimiser steps of linear learning-rate warmup from zero; above 0 it replaces "
            "warmup_epochs.",
            low=0, high=10**7, search=Search(0, 1000),
        ),
        Param(
            "final_lr_ratio", float, 0.02,
            "Learning rate at the end of the cosine schedule, relative to the peak.",
            low=0.0, high=1.0, search=Search(0.0, 0.2), active=_schedule_is("cosine"),
        ),
        Param(
            "reduce_lr_factor", float, 0.5,
            "Plateau schedule: factor applied to the learning rate on a plateau.",
            low=0.001, high=0.999, search=Search(0.1, 0.9), active=_schedule_is("plateau"),
        ),
        Param(
            "reduce_lr_patience", int, 1,
            "Plateau schedule: epochs without improvement before reducing.",
            low=0, high=1000, search=Search(0, 5), active=_schedule_is("plateau"),
        ),
        Param(
            "reduce_lr_threshold", float, 0.0,
            "Plateau schedule: the dev error must drop by more than this to count as improved.",
            low=0.0, high=1.0, search=Search(0.0, 0.05), active=_schedule_is("plateau"),
        ),
        Param(
            "reduce_lr_cooldown", int, 0,
            "Plateau schedule: epochs after a reduction before patience counts again.",
            low=0, high=1000, search=Search(0, 5), active=_schedule_is("plateau"),
        ),
        Param(
            "reduce_lr_burnin", int, 0,
            "Plateau schedule: epochs before the schedule starts watching the dev error.",
            low=0, high=1000, search=Search(0, 10), active=_schedule_is("plateau"),
        ),
        Param(
            "max_grad_norm", float, 5.0,
            "Clip the gradient to this L2 norm (0 for no clipping).",
            low=0.0, high=1e6, search=Search(0.1, 100.0, log=True),
        ),
        Param(
            "grad_accumulation", int, 1,
            "Batches whose gradients are summed before each optimiser step.",
            low=1, high=1024, search=Search(1, 4),
        ),
        Param(
            "mixed_precision", bool, False,
            "Mixed precision on CUDA, in the dtype amp_dtype chooses; ignored on CPU.",
            search=Search(choices=(False, True)),
        ),
        Param(
            "amp_dtype", str, "auto",
            "Mixed precision dtype: bf16, fp16 (with loss scaling) or auto (bf16 on GPUs that "
            "have it natively, compute capability 8.0 or later, else fp16). The search compares "
            "auto and fp16, so it never tries bf16 where it is only emulated.",
            choices=("auto", "bf16", "fp16"), search=Search(choices=("auto", "fp16")),
            active=_mixed_precision,
        ),
        Param(
            "noise_std", float, 0.0,
            "Gaussian noise added to the input, in units of each coefficient's std.",
            low=0.0, high=10.0, search=Search(0.0, 0.5),
        ),
        Param(
            "constant_offset_std", float, 0.0,
            "One random offset per utterance and coefficient added to the input, in units of "
            "each coefficient's std.",
            low=0.0, high=10.0, search=Search(0.0, 0.5),
        ),
        Param(
            "num_time_masks", int, 0, "SpecAugment time masks per utterance.",
            low=0, high=100, search=Search(0, 4),
        ),
        Param(
            "time_mask_prob", float, 1.0,
            "Probability that an utterance gets its time masks at all.",
            low=0.0, high=1.0, search=Search(0.1, 1.0), active=_time_masks,
        ),
        Param(
            "max_time_mask", int, 20, "Largest time-mask width in frames.",
            low=0, high=1000000, search=Search(1, 100), active=_time_masks,
        ),
        Param(
            "time_mask_max_proportion", float, 0.1,
            "Largest time-mask width as a proportion of the utterance length.",
            low=0.0, high=1.0, search=Search(0.01, 0.3), active=_time_masks,
        ),
        Param(
            "num_freq_masks", int, 2, "SpecAugment frequency masks per utterance.",
            low=0, high=100, search=Search(0, 4), active=_freq,
        ),
        Param(
            "max_freq_mask", int, 10, "Largest frequency-mask width in coefficients.",
            low=0, high=1000000, search=Search(1, 30), active=_freq_masks,
        ),
        Param(
            "freq_mask_max_proportion", float, 0.2,
            "Largest frequency-mask width as a proportion of the coefficients.",
            low=0.0, high=1.0, search=Search(0.01, 0.5), active=_freq_masks,
        ),
        Param(
            "max_time_warp", int, 0,
            "SpecAugment time warp: largest shift in frames of the warp point (0 for none).",
            low=0, high=1000000, search=Search(0, 20),
        ),
        Param(
            "max_freq_warp", int, 4,
            "Frequency warp: largest shift in coefficients of the warp point (0 for none).",
            low=0, high=1000000, search=Search(0, 8), active=_freq,
        ),
        Param(
            "random_shift_proportion", float, 0.0,
            "Random shift: each utterance gets up to this proportion of its length in copies "
            "of its first frame before it and of its last frame after it.",
            low=0.0, high=1.0, search=Search(0.0, 0.1),
        ),
        Param(
            "early_stopping_patience", int, 0,
            "Stop after this many epochs without dev-error improvement (0 for never).",
            low=0, high=100000, search=Search(1, 10),
        ),
        Param(
            "early_stopping_threshold", float, 0.0,
            "The dev error must drop by more than this to reset the early-stopping clock.",
            low=0.0, high=1.0, search=Search(0.0, 0.05), active=_early_stopping,
        ),
        Param(
            "early_stopping_burnin", int, 0,
            "Epochs before early stopping starts watching the dev error.",
            low=0, high=100000, search=Search(0, 10), active=_early_stopping,
        ),
        Param(
            "max_bad_steps", int, 20,
            "Consecutive steps with a non-finite loss or gradient (each skipped) after which "
            "training is declared diverged.",
            low=1, high=1000000,
        ),
        Param(
            "bad_step_lr_factor", float, 1.0,
            "Multiply the learning rate by this after every skipped step (non-finite loss or "
            "gradient; fp16 loss-scale back-offs do not count); 1 for never.",
            low=0.01, high=1.0, search=Search(0.3, 1.0),
        ),
    ],
)
