"""The ``data`` group: how utterances are batched for training and evaluation."""

from cnn_mellin.config import Group, Param, Search

GROUP = Group(
    "data",
    "Batching of the training and dev data.",
    [
        Param(
            "batch_size", int, 16, "Utterances per training batch.",
            low=1, high=4096, search=Search(4, 64, log=True),
        ),
        Param(
            "eval_batch_size", int, 32, "Utterances per batch when scoring dev or test data.",
            low=1, high=4096,
        ),
        Param(
            "num_buckets", int, 10,
            "Length buckets for batching (1: no bucketing; more: less padding, less shuffling).",
            low=1, high=1000, search=Search(1, 20),
        ),
        Param(
            "subset", float, 1.0, "Fraction of the training utterances used (a fixed subset).",
            low=0.0, high=1.0,
        ),
    ],
)
