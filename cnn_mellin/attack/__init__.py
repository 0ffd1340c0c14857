"""Gradient inversion against a trained acoustic model (federated-learning privacy).

:mod:`~cnn_mellin.attack.objective`: the shared gradient, the gradient distance and its
gradient with respect to the dummy input (finite differences of first-order gradients, or
the exact double backward); :mod:`~cnn_mellin.attack.loop`: the optimisation of the dummy
(chunks, restarts, checkpoints); :mod:`~cnn_mellin.attack.output`: the attacked utterances of
a data dir and what an attack writes.
"""

from cnn_mellin.attack.loop import (
    AttackDiverged,
    AttackResult,
    chunks,
    initial_dummy,
    invert,
    mae,
    snr_db,
    start_dummy,
)
from cnn_mellin.attack.objective import (
    Objective,
    ctc_loss,
    fused_ctc_loss,
    gradient_distance,
    regulariser,
    shared_gradient,
)
from cnn_mellin.attack.output import (
    attack_one,
    check_victim_data,
    decode_per,
    read_utterance,
    select_utterances,
    spectrogram_png,
    write_outputs,
)

__all__ = [
    "AttackDiverged", "AttackResult", "Objective", "attack_one", "check_victim_data", "chunks",
    "ctc_loss", "decode_per", "fused_ctc_loss", "gradient_distance", "initial_dummy", "invert",
    "mae", "read_utterance", "regulariser", "select_utterances", "shared_gradient",
    "snr_db", "spectrogram_png", "start_dummy", "write_outputs",
]
