"""``python -m cnn_mellin.tasks.command --guard GRACE_S ARGV...``: the guard process."""

import sys

from cnn_mellin.tasks.command.guard import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
