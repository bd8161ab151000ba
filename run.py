"""Command-line entry point: ``python run.py fit --config configs/cifar100/base.yaml --config <run>.yaml``.

Also ``python run.py sweep ...`` (:mod:`abkd_vision.sweep`) and ``python run.py export ...``
(:mod:`abkd_vision.export`). A bad input ends with one message naming the value and the fix.
"""

import sys

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command == "sweep":
        from abkd_vision.sweep.__main__ import main as sweep

        sys.exit(sweep(sys.argv[2:]))
    if command == "export":
        from abkd_vision.export import main as export

        sys.exit(export(sys.argv[2:]))
    from abkd_vision.cli import run

    sys.exit(run())
