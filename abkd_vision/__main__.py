"""``python -m abkd_vision <command> ...``: the same as ``abkd <command> ...`` (:mod:`abkd_vision.commands`)."""

import sys

from abkd_vision.commands import main

if __name__ == "__main__":
    sys.exit(main())
