"""Write small datasets in the CoOp layout: random images for tests and smoke runs, or given image arrays.

``write_fake_coop_dataset(root, "EuroSAT", num_classes=10)`` writes the exact files the readers expect (a split
JSON, FGVCAircraft's text lists, or ImageNet's classnames.txt and folders), so every reader and the whole
base-to-new pipeline can run offline. ``export_arrays_as_coop`` does the same for real images held in arrays
(e.g. CIFAR-10 from ``.npz`` files).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from abkd_vision.data.coop import EUROSAT_CLASS_NAMES, LAYOUTS, SPLITS, _check_dataset

__all__ = ["export_arrays_as_coop", "write_fake_coop_dataset"]


def _raw_names(dataset: str, num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        return list(class_names)
    if dataset == "EuroSAT" and num_classes == len(EUROSAT_CLASS_NAMES):
        return list(EUROSAT_CLASS_NAMES)  # the raw folder names, cleaned by the reader
    return [f"class_{i:03d}" for i in range(num_classes)]


def _write(dataset: str, root: Path, names: list[str], images: dict[str, list[tuple[np.ndarray, int]]]) -> Path:
    """Lay out ``images[split] = [(HxWx3 uint8, label), ...]`` for ``dataset`` under ``root``."""
    layout = LAYOUTS[dataset]
    base = Path(root) / layout.folder
    image_dir = base / layout.image_dir if layout.image_dir else base
    if dataset == "ImageNet":
        wnids = [f"n{i:08d}" for i in range(len(names))]
        (base).mkdir(parents=True, exist_ok=True)
        (base / "classnames.txt").write_text("".join(f"{w} {n}\n" for w, n in zip(wnids, names)))
        for split, folder in (("train", "train"), ("test", "val")):
            for k, (img, label) in enumerate(images[split]):
                path = image_dir / folder / wnids[label] / f"{split}_{k:05d}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path, format="JPEG", quality=95)
        return base
    if dataset == "FGVCAircraft":
        base.mkdir(parents=True, exist_ok=True)
        (base / "variants.txt").write_text("".join(f"{n}\n" for n in names))
        image_dir.mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            lines = []
            for k, (img, label) in enumerate(images[split]):
                image_id = f"{split[:2]}{k:05d}"
                Image.fromarray(img).save(image_dir / f"{image_id}.jpg", format="JPEG", quality=95)
                lines.append(f"{image_id} {names[label]}\n")
            (base / f"images_variant_{split}.txt").write_text("".join(lines))
        return base
    split_json = {}
    for split in SPLITS:
        entries = []
        for k, (img, label) in enumerate(images[split]):
            rel = f"{names[label]}/{split}_{k:05d}.png"
            path = image_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
            entries.append([rel, int(label), names[label]])
        split_json[split] = entries
    (base / layout.split_file).write_text(json.dumps(split_json))
    return base


def write_fake_coop_dataset(root: str | os.PathLike, dataset: str, num_classes: int, train_per_class: int = 4,
                            test_per_class: int = 2, val_per_class: int = 1, image_size: int = 32, seed: int = 0,
                            class_names: Sequence[str] | None = None) -> Path:
    """Random images of ``num_classes`` classes in the CoOp layout of ``dataset``; returns the dataset folder.

    Each class gets its own mean colour, so a model can tell classes apart (the images are otherwise noise).
    """
    _check_dataset(dataset)
    names = _raw_names(dataset, num_classes, class_names)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (num_classes, 3))
    per_split = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    images = {}
    for split, n in per_split.items():
        items = []
        for label in range(num_classes):
            for _ in range(n):
                noise = rng.integers(-40, 41, (image_size, image_size, 3))
                items.append((np.clip(colours[label] + noise, 0, 255).astype(np.uint8), label))
        images[split] = items
    return _write(dataset, Path(root), names, images)


def export_arrays_as_coop(root: str | os.PathLike, dataset: str, class_names: Sequence[str],
                          train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                          test: tuple[np.ndarray, np.ndarray]) -> Path:
    """Write image arrays (``uint8 [N, H, W, 3]``, labels ``[N]``) in the CoOp layout of ``dataset``."""
    _check_dataset(dataset)
    images = {}
    for split, (x, y) in (("train", train), ("val", val), ("test", test)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y):
            raise ValueError(f"{split}: expected uint8 [N, H, W, 3] images and N labels, got {x.dtype} "
                             f"{x.shape} and {len(y)} labels")
        images[split] = [(img, int(label)) for img, label in zip(x, y)]
    return _write(dataset, Path(root), list(class_names), images)
