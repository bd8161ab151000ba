"""Write small datasets: random images in the CoOp layout or in CIFAR-100's own layout, for tests, benchmarks and
smoke runs, or given image arrays in the CoOp layout.

``write_fake_coop_dataset(root, "EuroSAT", num_classes=10)`` writes the exact files the readers expect (a split
JSON, FGVCAircraft's text lists, or ImageNet's classnames.txt and folders), so every reader and the whole
base-to-new pipeline can run offline. ``export_arrays_as_coop`` does the same for real images held in arrays
(e.g. CIFAR-10 from ``.npz`` files).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from abkd_vision.data.coop import EUROSAT_CLASS_NAMES, LAYOUTS, SPLITS, _check_dataset

__all__ = ["export_arrays_as_coop", "write_fake_cifar100", "write_fake_coop_dataset"]


def write_fake_cifar100(root: str | os.PathLike, n_train: int = 16, n_test: int = 8, seed: int = 0) -> Path:
    """Random uint8 images and labels in the official ``cifar-100-python`` pickle layout under ``root``; returns
    ``root``. Rows hold the R, G and B planes as in the real files; the pickles have ``str`` keys, which load as the
    official Python-2 pickles do with torchvision's ``encoding="latin1"``. torchvision's md5 check of the real
    files fails on them: callers patch ``torchvision.datasets.cifar.check_integrity`` to load them."""
    from abkd_vision.data.cifar import CIFAR100_CLASSES

    root = Path(root)
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": [int(v) for v in rng.integers(0, 100, n)], "coarse_labels": [0] * n}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": list(CIFAR100_CLASSES), "coarse_label_names": ["x"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return root


def _check_names(dataset: str, names: Sequence[str]) -> list[str]:
    """Class names must fit on one line of a text file and, for split-JSON datasets (where they name the image
    folders), be one folder name. FGVCAircraft's "F/A-18" is fine: its images are named by id."""
    names = [str(n) for n in names]
    as_folder = LAYOUTS[dataset].split_file is not None
    for n in names:
        if not n.strip() or n != n.strip() or "\n" in n or "\r" in n:
            raise ValueError(f"class name {n!r} cannot be written: it must be one line without leading/trailing "
                             "space")
        if as_folder and (n in (".", "..") or "/" in n or "\\" in n):
            raise ValueError(f"class name {n!r} cannot be written for {dataset}: it names an image folder (no path "
                             "separator)")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be distinct, got {names}")
    return names


def _raw_names(dataset: str, num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if class_names is not None:
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        return _check_names(dataset, class_names)
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
    """Random ``image_size``² RGB images of ``num_classes`` classes in the CoOp layout of ``dataset``; returns the
    dataset folder (``<root>/<folder>``).

    Files: split-JSON datasets get PNGs in ``<image folder>/<class name>/`` and ``split_zhou_<Name>.json``;
    FGVCAircraft gets JPEGs in ``images/``, ``variants.txt`` and ``images_variant_{train,val,test}.txt``; ImageNet
    gets ``classnames.txt`` (wnids ``n00000000``, ...) and JPEGs in ``images/{train,val}/<wnid>/`` (no val split:
    ``val_per_class`` is ignored). Class names are written raw: ``class_names`` if given, EuroSAT's folder names
    ("AnnualCrop", ...) for EuroSAT with 10 classes, otherwise ``class_000``, ``class_001``, ...

    Each class gets its own mean colour, so a model can tell classes apart (the images are otherwise noise).
    """
    _check_dataset(dataset)
    names = _raw_names(dataset, num_classes, class_names)
    if min(train_per_class, test_per_class, val_per_class) < 0 or image_size <= 0:
        raise ValueError(f"need non-negative image counts and a positive image_size, got {train_per_class=}, "
                         f"{test_per_class=}, {val_per_class=}, {image_size=}")
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (num_classes, 3))
    per_split = {"train": train_per_class, "val": 0 if dataset == "ImageNet" else val_per_class,
                 "test": test_per_class}
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
                          train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
                          val: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Write image arrays in the CoOp layout of ``dataset``; returns the dataset folder.

    ``train``, ``test`` and optionally ``val`` are ``(images uint8 [N, H, W, 3], labels int [N])`` with labels in
    ``0..len(class_names)-1``; ``class_names`` are written raw (the readers clean them). For a split-JSON dataset,
    image ``k`` of a split becomes ``<image folder>/<class name>/<split>_<k>.png`` (lossless) and one entry of
    ``split_zhou_<Name>.json``; without ``val`` the JSON's val list is empty (``eval_split="val"`` then errors).
    ImageNet has no val split and rejects ``val``.
    """
    _check_dataset(dataset)
    names = _check_names(dataset, class_names)
    if dataset == "ImageNet" and val is not None:
        raise ValueError("ImageNet has no val split in the CoOp layout (its val images are the test set); pass "
                         "val=None")
    images = {"val": []}
    for split, pair in (("train", train), ("val", val), ("test", test)):
        if pair is None:
            continue
        x, y = np.asarray(pair[0]), np.asarray(pair[1])
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"{split}: expected uint8 [N, H, W, 3] images and N labels, got {x.dtype} "
                             f"{x.shape} and labels of shape {y.shape}")
        if len(y) and (y.min() < 0 or y.max() >= len(names)):
            raise ValueError(f"{split}: labels must be in 0..{len(names) - 1} (one per class name), got "
                             f"{int(y.min())}..{int(y.max())}")
        images[split] = [(img, int(label)) for img, label in zip(x, y)]
    return _write(dataset, Path(root), names, images)
