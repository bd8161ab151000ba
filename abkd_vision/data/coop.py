"""Readers of the 11 base-to-new datasets in the CoOp DATA layout: class names and ``(path, label)`` lists.

Three layout families (CoOp's DATASETS.md, https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md):

* split JSON: ``<root>/<folder>/split_zhou_<Name>.json`` = ``{"train"|"val"|"test": [[relative path, label,
  class name], ...]}``, image paths relative to the dataset's image folder (9 datasets);
* FGVCAircraft: ``variants.txt`` (one class per line, label = line index) and ``images_variant_<split>.txt``
  (lines ``"<image id> <variant name>"``), images in ``images/<image id>.jpg``;
* ImageNet: ``classnames.txt`` (lines ``"<wnid> <class name>"``, label = line index), images in
  ``images/train/<wnid>/`` and ``images/val/<wnid>/`` (the val images are the test set; there is no val split).

Class names are cleaned as CoOp does: underscores become spaces, and EuroSAT's folder names become CoOp's
descriptive names ("AnnualCrop" -> "Annual Crop Land").
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BASE_TO_NEW_DATASETS",
    "COOP_DATA_HELP",
    "CoOpDataset",
    "EUROSAT_CLASS_NAMES",
    "clean_coop_name",
    "read_coop_dataset",
]

COOP_DATA_HELP = "see CoOp's DATASETS.md: https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class _Layout:
    folder: str
    image_dir: str
    split_file: str | None  # split_zhou_*.json; None for FGVCAircraft and ImageNet


LAYOUTS: dict[str, _Layout] = {
    "ImageNet": _Layout("imagenet", "images", None),
    "Caltech101": _Layout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "OxfordPets": _Layout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "StanfordCars": _Layout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "Flowers102": _Layout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "Food101": _Layout("food-101", "images", "split_zhou_Food101.json"),
    "FGVCAircraft": _Layout("fgvc_aircraft", "images", None),
    "SUN397": _Layout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DTD": _Layout("dtd", "dtd/images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": _Layout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": _Layout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
BASE_TO_NEW_DATASETS: tuple[str, ...] = tuple(LAYOUTS)

# CoOp's EuroSAT prompt names (datasets/eurosat.py, NEW_CLASSNAMES).
EUROSAT_CLASS_NAMES = {
    "AnnualCrop": "Annual Crop Land",
    "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land",
    "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings",
    "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land",
    "Residential": "Residential Buildings",
    "River": "River",
    "SeaLake": "Sea or Lake",
}

SPLITS = ("train", "val", "test")


def clean_coop_name(dataset: str, name: str) -> str:
    """A class name as CoOp puts it in prompts."""
    if dataset == "EuroSAT":
        name = EUROSAT_CLASS_NAMES.get(name, name)
    return name.replace("_", " ").strip()


@dataclass
class CoOpDataset:
    """One dataset: cleaned class names (label order) and, once listed, ``(image path, label)`` per split."""

    name: str
    root: Path
    class_names: list[str]
    splits: dict[str, list[tuple[str, int]]] | None = None


def _missing(what: str, path: Path) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found: expected {path}; {COOP_DATA_HELP}")


def _check_dataset(name: str) -> _Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown base-to-new dataset {name!r}; choose one of: {', '.join(BASE_TO_NEW_DATASETS)}")
    return LAYOUTS[name]


def dataset_dir(root: str | os.PathLike, name: str) -> Path:
    layout = _check_dataset(name)
    path = Path(root).expanduser() / layout.folder
    if not path.is_dir():
        raise _missing(f"{name} folder", path)
    return path


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise _missing(what, path)
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_classes(name: str, split: dict, path: Path) -> list[str]:
    names: dict[int, str] = {}
    for part in SPLITS:
        for entry in split.get(part, []):
            if not (isinstance(entry, list) and len(entry) == 3):
                raise ValueError(f"{path}: entries must be [relative path, label, class name], got {entry!r}")
            names.setdefault(int(entry[1]), str(entry[2]))
    labels = sorted(names)
    if labels != list(range(len(labels))) or not labels:
        raise ValueError(f"{path}: labels must be 0..n-1 with no gap, got {labels[:5]}...{labels[-3:]}")
    return [clean_coop_name(name, names[i]) for i in labels]


def read_coop_dataset(root: str | os.PathLike, name: str, list_images: bool = True) -> CoOpDataset:
    """Class names (always) and the image lists of every split (if ``list_images``) of dataset ``name``.

    Raises:
        ValueError: unknown dataset (lists the 11), malformed split files.
        FileNotFoundError: a missing folder or split file (names the path expected and CoOp's instructions).
    """
    layout = _check_dataset(name)
    base = dataset_dir(root, name)
    image_dir = base / layout.image_dir if layout.image_dir else base
    if name == "ImageNet":
        rows = [line.split(" ", 1) for line in _read_lines(base / "classnames.txt", "ImageNet classnames.txt")]
        wnids = [r[0] for r in rows]
        data = CoOpDataset(name, base, [clean_coop_name(name, r[1] if len(r) > 1 else r[0]) for r in rows])
        if list_images:
            data.splits = {}
            for split, folder in (("train", "train"), ("test", "val")):
                split_dir = image_dir / folder
                if not split_dir.is_dir():
                    raise _missing(f"ImageNet {folder} image folder", split_dir)
                items = []
                for label, wnid in enumerate(wnids):
                    class_dir = split_dir / wnid
                    if not class_dir.is_dir():
                        raise _missing(f"ImageNet class folder of {wnid}", class_dir)
                    items += [(str(class_dir / f), label) for f in sorted(os.listdir(class_dir))]
                data.splits[split] = items
            data.splits["val"] = data.splits["test"]
        return data
    if name == "FGVCAircraft":
        classes = _read_lines(base / "variants.txt", "FGVCAircraft variants.txt")
        data = CoOpDataset(name, base, [clean_coop_name(name, c) for c in classes])
        if list_images:
            index = {c: i for i, c in enumerate(classes)}
            data.splits = {}
            for split in SPLITS:
                items = []
                for line in _read_lines(base / f"images_variant_{split}.txt", f"FGVCAircraft {split} list"):
                    image_id, _, variant = line.partition(" ")
                    if variant not in index:
                        raise ValueError(f"{base / f'images_variant_{split}.txt'}: variant {variant!r} is not in "
                                         "variants.txt")
                    items.append((str(image_dir / f"{image_id}.jpg"), index[variant]))
                data.splits[split] = items
        return data
    split_path = base / layout.split_file
    if not split_path.is_file():
        raise _missing(f"{name} split file", split_path)
    split = json.loads(split_path.read_text(encoding="utf-8"))
    data = CoOpDataset(name, base, _json_classes(name, split, split_path))
    if list_images:
        data.splits = {part: [(str(image_dir / e[0]), int(e[1])) for e in split.get(part, [])] for part in SPLITS}
        if not data.splits["val"]:
            data.splits["val"] = data.splits["test"]
    return data
