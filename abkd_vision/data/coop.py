"""Readers of the 11 base-to-new datasets in the CoOp DATA layout: class names and ``(path, label)`` lists.

Three layout families (CoOp's DATASETS.md, https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md), paths
relative to ``<root>/<dataset folder>/``:

* split JSON (9 datasets): ``split_zhou_<Name>.json`` = ``{"train"|"val"|"test": [[relative path, label,
  class name], ...]}``, image paths relative to the dataset's image folder (e.g. ``2750/`` for EuroSAT,
  ``images/`` for DTD, the dataset folder itself for StanfordCars);
* FGVCAircraft: ``variants.txt`` (one class per line, label = line index) and ``images_variant_<split>.txt``
  (lines ``"<image id> <variant name, may contain spaces>"``), images in ``images/<image id>.jpg``;
* ImageNet: ``classnames.txt`` (lines ``"<wnid> <class name>"``, label = line index; the official file is in
  sorted wnid order, which is CoOp's label order), images in ``images/train/<wnid>/`` and ``images/val/<wnid>/``.
  The val images are the test set; there is no separate val split (``splits["val"]`` is the test list).

Class names are cleaned as CoOp's prompt learners see them: underscores become spaces, and EuroSAT's folder names
become CoOp's descriptive names ("AnnualCrop" -> "Annual Crop Land"; names already descriptive are kept).

Class names must be unique after cleaning (they are the classes' prompts): duplicates are a ValueError naming the
file, the names and their lines (or labels).

Only the class list is read by ``read_coop_dataset(..., list_images=False)``: no image folder is listed, so it is
cheap even for ImageNet. ``missing_images`` checks a list of paths with one directory listing per folder.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BASE_TO_NEW_DATASETS",
    "COOP_DATA_HELP",
    "CoOpDataset",
    "EUROSAT_CLASS_NAMES",
    "clean_coop_name",
    "dataset_dir",
    "missing_images",
    "read_coop_dataset",
]

COOP_DATA_HELP = "see CoOp's DATASETS.md: https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"


@dataclass(frozen=True)
class _Layout:
    folder: str  # under root
    image_dir: str  # under the folder ("" = the folder itself)
    split_file: str | None  # split_zhou_*.json; None for FGVCAircraft and ImageNet


# Folder, image folder and split file of each dataset, as CoOp's datasets/*.py read them.
LAYOUTS: dict[str, _Layout] = {
    "ImageNet": _Layout("imagenet", "images", None),
    "Caltech101": _Layout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "OxfordPets": _Layout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "StanfordCars": _Layout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "Flowers102": _Layout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "Food101": _Layout("food-101", "images", "split_zhou_Food101.json"),
    "FGVCAircraft": _Layout("fgvc_aircraft", "images", None),
    "SUN397": _Layout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "DTD": _Layout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "EuroSAT": _Layout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "UCF101": _Layout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
BASE_TO_NEW_DATASETS: tuple[str, ...] = tuple(LAYOUTS)

# CoOp's descriptive EuroSAT class names (datasets/eurosat.py, NEW_CNAMES), keyed by the image folder names.
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
    """A class name as CoOp puts it in prompts: EuroSAT's descriptive name, underscores as spaces."""
    if dataset == "EuroSAT":
        name = EUROSAT_CLASS_NAMES.get(name, name)
    return name.replace("_", " ").strip()


@dataclass
class CoOpDataset:
    """One dataset: cleaned class names (label order) and, once listed, ``(image path, label)`` per split.

    ``splits`` is None until images are listed; then it has the keys "train", "val" and "test" (ImageNet's "val"
    is its test list; a split JSON without val images has an empty "val").
    """

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
    """``<root>/<folder of name>``; FileNotFoundError (naming it) if it does not exist."""
    layout = _check_dataset(name)
    path = Path(root).expanduser() / layout.folder
    if not path.is_dir():
        raise _missing(f"{name} folder", path)
    return path


def _numbered_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """``(1-based line number, stripped line)`` of the non-blank lines of ``path``."""
    if not path.is_file():
        raise _missing(what, path)
    lines = enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
    return [(n, line.strip()) for n, line in lines if line.strip()]


def _read_lines(path: Path, what: str) -> list[str]:
    return [line for _, line in _numbered_lines(path, what)]


def _check_unique(names: list[str], path: Path, kind: str, numbers: list[int]) -> None:
    """ValueError listing the class names that occur more than once; ``names[i]`` is at ``kind`` ("line" or
    "label") ``numbers[i]`` of ``path``."""
    seen: dict[str, list[int]] = {}
    for name, number in zip(names, numbers):
        seen.setdefault(name, []).append(number)
    dups = [(name, at) for name, at in seen.items() if len(at) > 1]
    if not dups:
        return
    shown = ", ".join(f"{name!r} ({kind}s {', '.join(map(str, at[:-1]))} and {at[-1]})" for name, at in dups[:10])
    more = f", ... ({len(dups)} names in all)" if len(dups) > 10 else ""
    raise ValueError(f"duplicate class names in {path}: {shown}{more}; class names must be unique because they are "
                     "the classes' prompts/labels; rename one of each")


def _list_files(directory: Path) -> list[str]:
    """Sorted names of the non-hidden files in ``directory`` (symlinks followed)."""
    with os.scandir(directory) as it:
        return sorted(e.name for e in it if not e.name.startswith(".") and e.is_file())


def missing_images(paths: Iterable[str]) -> list[str]:
    """The paths in ``paths`` that are not files, in input order.

    Lists every parent folder once instead of testing each path (1 directory read per class folder rather than
    one ``stat`` per image: fast on network file systems too).
    """
    paths = list(paths)
    present: dict[str, set[str] | None] = {}
    out = []
    for path in paths:
        parent, name = os.path.split(path)
        if parent not in present:
            try:
                with os.scandir(parent or ".") as it:
                    present[parent] = {e.name for e in it if e.is_file()}
            except (FileNotFoundError, NotADirectoryError):
                present[parent] = None
        names = present[parent]
        if names is None or name not in names:
            out.append(path)
    return out


def _json_classes(name: str, split: dict, path: Path) -> list[str]:
    if not isinstance(split, dict) or not any(part in split for part in SPLITS):
        raise ValueError(f"{path}: expected a JSON object with the keys 'train', 'val' and 'test'; {COOP_DATA_HELP}")
    names: dict[int, str] = {}
    for part in SPLITS:
        for entry in split.get(part, []):
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], int)):
                raise ValueError(f"{path}: {part} entries must be [relative path, integer label, class name], "
                                 f"got {entry!r}")
            label, cname = entry[1], str(entry[2])
            if names.setdefault(label, cname) != cname:
                raise ValueError(f"{path}: label {label} has two class names, {names[label]!r} and {cname!r}")
    if not names:
        raise ValueError(f"{path}: no entries in any split; {COOP_DATA_HELP}")
    absent = sorted(set(range(max(names) + 1)) - set(names))
    if absent or min(names) < 0:
        raise ValueError(f"{path}: labels must be 0..n-1 with every label present; labels found: {min(names)}.."
                         f"{max(names)}, absent: {absent[:10]}{' ...' if len(absent) > 10 else ''}")
    cleaned = [clean_coop_name(name, names[i]) for i in range(len(names))]
    _check_unique(cleaned, path, "label", list(range(len(cleaned))))
    return cleaned


def _read_imagenet(base: Path, image_dir: Path, list_images: bool) -> CoOpDataset:
    numbered = _numbered_lines(base / "classnames.txt", "ImageNet classnames.txt")
    rows = [line.split(maxsplit=1) for _, line in numbered]
    wnids = [r[0] for r in rows]
    if len(set(wnids)) != len(wnids):
        dup = next(w for w in wnids if wnids.count(w) > 1)
        raise ValueError(f"{base / 'classnames.txt'}: folder {dup!r} is listed twice")
    if wnids != sorted(wnids):
        warnings.warn(f"{base / 'classnames.txt'} is not in sorted folder order: labels follow its lines, while CoOp "
                      "labels ImageNet classes by sorted folder name, so the base/new classes differ from CoOp's",
                      stacklevel=3)
    data = CoOpDataset("ImageNet", base, [clean_coop_name("ImageNet", r[1] if len(r) > 1 else r[0]) for r in rows])
    _check_unique(data.class_names, base / "classnames.txt", "line", [n for n, _ in numbered])
    if not list_images:
        return data
    data.splits = {}
    for split, folder in (("train", "train"), ("test", "val")):
        split_dir = image_dir / folder
        if not split_dir.is_dir():
            raise _missing(f"ImageNet {folder} image folder", split_dir)
        with os.scandir(split_dir) as it:
            extra = sorted({e.name for e in it if e.is_dir() and not e.name.startswith(".")} - set(wnids))
        if extra:
            raise ValueError(f"{split_dir} has class folders that classnames.txt does not list: {extra[:5]}; "
                             f"{COOP_DATA_HELP}")
        items = []
        for label, wnid in enumerate(wnids):
            class_dir = split_dir / wnid
            if not class_dir.is_dir():
                raise _missing(f"ImageNet class folder of {wnid}", class_dir)
            items += [(str(class_dir / f), label) for f in _list_files(class_dir)]
        data.splits[split] = items
    data.splits["val"] = data.splits["test"]
    return data


def _read_aircraft(base: Path, image_dir: Path, list_images: bool) -> CoOpDataset:
    numbered = _numbered_lines(base / "variants.txt", "FGVCAircraft variants.txt")
    classes = [line for _, line in numbered]
    data = CoOpDataset("FGVCAircraft", base, [clean_coop_name("FGVCAircraft", c) for c in classes])
    _check_unique(data.class_names, base / "variants.txt", "line", [n for n, _ in numbered])
    if not list_images:
        return data
    index = {c: i for i, c in enumerate(classes)}
    data.splits = {}
    for split in SPLITS:
        path = base / f"images_variant_{split}.txt"
        items = []
        for line in _read_lines(path, f"FGVCAircraft {split} list"):
            image_id, _, variant = line.partition(" ")
            variant = variant.strip()
            if variant not in index:
                raise ValueError(f"{path}: variant {variant!r} (image {image_id}) is not in {base / 'variants.txt'}")
            items.append((str(image_dir / f"{image_id}.jpg"), index[variant]))
        data.splits[split] = items
    return data


def read_coop_dataset(root: str | os.PathLike, name: str, list_images: bool = True) -> CoOpDataset:
    """Class names (always) and the image lists of every split (if ``list_images``) of dataset ``name``.

    Image paths are built from the split files (or, for ImageNet, listed from its class folders); whether the
    listed files exist is checked by the caller (:func:`missing_images`).

    Raises:
        ValueError: unknown dataset (lists the 11), malformed split files (names the file and the entry).
        FileNotFoundError: a missing folder or split file (names the path expected and CoOp's instructions).
    """
    layout = _check_dataset(name)
    base = dataset_dir(root, name)
    image_dir = base / layout.image_dir if layout.image_dir else base
    if name == "ImageNet":
        return _read_imagenet(base, image_dir, list_images)
    if name == "FGVCAircraft":
        return _read_aircraft(base, image_dir, list_images)
    split_path = base / layout.split_file
    if not split_path.is_file():
        raise _missing(f"{name} split file", split_path)
    try:
        split = json.loads(split_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{split_path} is not valid JSON ({err}); {COOP_DATA_HELP}") from err
    data = CoOpDataset(name, base, _json_classes(name, split, split_path))
    if list_images:
        if not image_dir.is_dir():
            raise _missing(f"{name} image folder", image_dir)
        data.splits = {part: [(str(image_dir / e[0]), e[1]) for e in split.get(part, [])] for part in SPLITS}
    return data
