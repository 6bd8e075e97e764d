"""``python -m d2gp`` is the ``d2gp`` command; ``torchrun … -m d2gp train …`` needs it."""

import sys

from d2gp.cli import main

if __name__ == "__main__":
    sys.exit(main())
