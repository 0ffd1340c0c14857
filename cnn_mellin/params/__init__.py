"""The parameter groups, in ``.ini`` section order.

Each module declares one :class:`~cnn_mellin.config.Group` as ``GROUP``; this is
the one place that lists them.
"""

from cnn_mellin.params import data, model, training

GROUPS = (model.GROUP, training.GROUP, data.GROUP)

__all__ = ["GROUPS"]
