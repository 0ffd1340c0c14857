"""``python -m cnn_mellin`` is the ``cnn-mellin`` command."""

import sys

from cnn_mellin.cli import main

sys.exit(main())
