"""Speech data: corpora (TIMIT, synthetic) to HDF5 feature stores, and loaders over them.

Modules: ``phones`` (phone sets), ``synth`` (espeak-ng corpus), ``timit`` (corpus -> stores),
``features`` (feature extraction), ``store`` (HDF5 files), ``loader`` (Dataset, sampler, collate).
The main names are re-exported here and imported on first use, so that importing one module
(e.g. ``synth``, which needs no torch) does not import them all.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PHONES48": "phones", "PHONES39": "phones", "fold_to_39": "phones",
    "prepare_synth": "synth", "prepare_timit": "timit",
    "FEATURES": "features", "compute_features": "features", "num_frames": "features",
    "load_feature_config": "features",
    "StoreInfo": "store", "read_info": "store",
    "UtteranceDataset": "loader", "BucketBatchSampler": "loader", "Batch": "loader",
    "collate": "loader", "make_loader": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
