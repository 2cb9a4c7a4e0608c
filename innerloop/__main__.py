"""``python -m innerloop``: the ``innerloop`` command, for environments without the console script."""

import sys

from innerloop.cli import main

if __name__ == "__main__":
    sys.exit(main())
