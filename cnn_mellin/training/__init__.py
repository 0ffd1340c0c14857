"""CTC training of the acoustic model (``cnn-mellin train``).

Public API: :func:`train`, :class:`TrainResult`, :class:`TrainingDiverged`, and
:func:`make_optimizer` (optimisers by name, also used for memory measurements).

Modules: ``loop`` (epochs, dev scoring, best model, resume), ``step`` (the optimiser
steps of an epoch), ``augment``, ``schedule`` (optimisers, learning rates),
``checkpoint`` (the resume file).
"""

from cnn_mellin.training.loop import TrainResult, train
from cnn_mellin.training.schedule import OPTIMIZERS, make_optimizer, optimizer_from_params
from cnn_mellin.training.step import TrainingDiverged

__all__ = [
    "OPTIMIZERS", "TrainResult", "TrainingDiverged", "make_optimizer", "optimizer_from_params",
    "train",
]
