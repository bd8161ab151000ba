"""Small generated datasets shared by the tests."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from abkd_vision.data import export_image_folder


def tiny_image_folder(root: Path, n_train: int, n_test: int, size: int = 16, classes=("a", "b", "c"),
                      separable: bool = True, seed: int = 0, noise: int = 80, boost: int = 150) -> Path:
    """An ImageFolder tree of ``len(classes)`` classes of random ``size`` x ``size`` images.

    With ``separable`` class k is bright in channel k (background values below ``noise``, channel k raised by
    ``boost``), so a network can learn it in a few steps.
    """
    rng = np.random.default_rng(seed)
    k = len(classes)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % k
        if separable:
            images = rng.integers(0, noise, (n, size, size, 3)).astype(np.uint8)
            images[np.arange(n), :, :, labels % 3] += boost
        else:
            images = rng.integers(0, 255, (n, size, size, 3)).astype(np.uint8)
        export_image_folder(images, labels, root, split, list(classes))
    return root


def parse_only_cli(*configs: Path):
    """The run.py CLI built once from ``configs`` without instantiating anything (its parser checks more files);
    global RNG state is restored after."""
    from abkd_vision.cli import DistillationCLI, main

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    # sys.argv is pytest's: LightningCLI warns when it sees both args and command-line arguments.
    with mock.patch.dict(os.environ), mock.patch.object(sys, "argv", ["run.py"]), \
            mock.patch.object(DistillationCLI, "instantiate_classes", lambda self: None):
        built = main([arg for c in configs for arg in ("--config", str(c))], run=False)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    return built


def fake_cifar100(root: Path, n_train: int = 16, n_test: int = 8, seed: int = 0) -> Path:
    """Random images in the official ``cifar-100-python`` pickle layout under ``root`` (torchvision's md5 check
    of the real files must be patched out to load them: ``torchvision.datasets.cifar.check_integrity``)."""
    from abkd_vision.data.synthetic import write_fake_cifar100

    return write_fake_cifar100(root, n_train, n_test, seed)
