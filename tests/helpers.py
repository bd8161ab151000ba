"""Small generated datasets shared by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from abkd_vision.data import export_image_folder


def tiny_image_folder(root: Path, n_train: int, n_test: int, size: int = 16, classes=("a", "b", "c"),
                      separable: bool = True, seed: int = 0) -> Path:
    """An ImageFolder tree of ``len(classes)`` classes of random ``size`` x ``size`` images.

    With ``separable`` class k is bright in channel k, so a network can learn it in a few steps.
    """
    rng = np.random.default_rng(seed)
    k = len(classes)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % k
        if separable:
            images = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
            images[np.arange(n), :, :, labels % 3] += 150
        else:
            images = rng.integers(0, 255, (n, size, size, 3)).astype(np.uint8)
        export_image_folder(images, labels, root, split, list(classes))
    return root
