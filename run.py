"""Command-line entry point: ``python run.py fit --config configs/cifar100/base.yaml --config <run>.yaml``.

The same commands as the installed ``abkd`` (:mod:`abkd_vision.commands`): ``fit validate test predict`` (the
LightningCLI of :mod:`abkd_vision.cli`), ``sweep``, ``search``, ``export``, ``study``, ``toy``, ``demo``;
``python run.py --help`` lists them. A bad input ends with one message naming the value and the fix.
"""

import sys

if __name__ == "__main__":
    from abkd_vision.commands import main

    sys.exit(main())
