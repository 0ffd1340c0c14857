"""CTC training of the acoustic model (``cnn-mellin train``).

Public API: :func:`train`, :class:`TrainResult`, :class:`TrainingDiverged`,
:class:`TrainingInterrupted` (a requested stop, checkpointed at the step it was at),
:func:`make_optimizer` (optimisers by name, also used for memory measurements) and
:func:`autocast_dtype` (the mixed-precision dtype a configuration gets on a device; use
it wherever a step is run the trainer's way).

Modules: ``loop`` (epochs, dev scoring, best model, resume), ``step`` (the optimiser
steps of an epoch), ``augment``, ``schedule`` (optimisers, learning rates),
``precision`` (autocast dtype), ``checkpoint`` (the resume file), ``metrics``
(``metrics.jsonl``).
"""

from cnn_mellin.training.loop import TrainingInterrupted, TrainResult, train
from cnn_mellin.training.precision import autocast_dtype
from cnn_mellin.training.schedule import OPTIMIZERS, make_optimizer, optimizer_from_params
from cnn_mellin.training.step import TrainingDiverged

__all__ = [
    "OPTIMIZERS", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "autocast_dtype",
    "make_optimizer", "optimizer_from_params", "train",
]
