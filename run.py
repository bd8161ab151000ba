"""Command-line entry point: ``python run.py fit --config configs/cifar100/base.yaml --config <run>.yaml``."""

from abkd_vision.cli import main

if __name__ == "__main__":
    main()
