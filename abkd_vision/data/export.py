"""Write array datasets as ImageFolder trees (lossless PNG), so that any of them can feed
:class:`abkd_vision.data.ImageFolderDataModule`.

Layout written::

    <root>/<split>/<class_name>/<index>.png

``index`` is the position of the image in the source array (or the ``indices`` given), zero-padded to a
common width so that the sorted file order is the array order. Folders are created for every class,
including classes without images in this split.

Label/folder consistency: ImageFolder numbers classes by **sorted** folder name, so the labels read back
equal the array labels only if ``class_names`` is sorted (true for "0".."9", CIFAR-10 and CIFAR-100 names).
A warning is emitted otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["export_digits", "export_image_folder", "export_npz_cifar"]

log = logging.getLogger(__name__)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"invalid {what} {name!r}: must be a non-empty name not starting with '.'")
    if "/" in name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"invalid {what} {name!r}: must not contain a path separator")


def export_image_folder(
    images: np.ndarray,
    labels: np.ndarray,
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str],
    *,
    indices: np.ndarray | Sequence[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``images`` as ``<root>/<split>/<class_names[label]>/<index>.png``.

    Args:
        images: uint8 array ``[N, H, W]`` (grayscale) or ``[N, H, W, C]`` with C in {1, 3, 4} (HWC, RGB(A)).
        labels: integer array ``[N]`` with values in ``0..len(class_names)-1``.
        root: dataset root (created if needed).
        split: split folder name, e.g. "train", "test" or "val".
        class_names: folder name of each label (label i -> ``class_names[i]``); should be sorted, see module doc.
        indices: file stem of each image, ``[N]`` unique non-negative ints (default ``0..N-1``); used to keep
            the position in a larger source array in the file name.
        overwrite: replace an existing non-empty ``<root>/<split>`` folder (otherwise ``FileExistsError``).

    Returns:
        The split directory ``<root>/<split>``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype} (scale to 0..255 first)")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # [N,H,W,1] -> [N,H,W]: saved as 8-bit grayscale
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (3, 4))):
        raise ValueError(f"images must have shape [N,H,W] or [N,H,W,C] with C in (1,3,4), got {images.shape}")
    n = images.shape[0]
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array of shape [{n}], got {labels.dtype} {labels.shape}")
    class_names = [str(c) for c in class_names]
    for name in class_names:
        _check_name(name, "class name")
    _check_name(split, "split name")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {class_names}")
    if n and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise ValueError(f"labels must lie in 0..{len(class_names) - 1}, got {labels.min()}..{labels.max()}")
    if class_names != sorted(class_names):
        warnings.warn(
            "class_names are not sorted: ImageFolder assigns labels by sorted folder name, so labels read back "
            "will differ from the array labels",
            stacklevel=2,
        )
    idx = np.arange(n) if indices is None else np.asarray(indices)
    if idx.shape != (n,) or not np.issubdtype(idx.dtype, np.integer) or (n and idx.min() < 0):
        raise ValueError(f"indices must be non-negative integers of shape [{n}]")
    if len(np.unique(idx)) != n:
        raise ValueError("indices must be unique (they become file names)")

    split_dir = Path(root).expanduser().resolve() / split
    if split_dir.exists() and any(split_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{split_dir} already exists and is not empty; pass overwrite=True to replace it")
        shutil.rmtree(split_dir)
    for name in class_names:
        (split_dir / name).mkdir(parents=True, exist_ok=True)

    width = len(str(int(idx.max()))) if n else 1
    for img, label, i in zip(images, labels, idx, strict=True):
        Image.fromarray(img).save(split_dir / class_names[int(label)] / f"{int(i):0{width}d}.png")
    log.info("wrote %d images in %d classes to %s", n, len(class_names), split_dir)
    return split_dir


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as ``(images uint8 [1797, 8, 8] in 0..255, labels int64 [1797] in 0..9)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is an optional ("demo") dependency
        raise ImportError("export_digits needs scikit-learn: pip install 'abkd-vision[demo]'") from exc
    digits = load_digits()
    # Pixel values are integer counts 0..16; map them linearly onto the full 8-bit range.
    images = np.round(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def digits_split(test_fraction: float = 0.25, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of the 1,797 digits: ``(train_indices, test_indices)``, each sorted."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.model_selection import train_test_split

    _, labels = load_digits_uint8()
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=seed, stratify=labels
    )
    return np.sort(train_idx), np.sort(test_idx)


def export_digits(
    root: str | os.PathLike, test_fraction: float = 0.25, seed: int = 0, *, overwrite: bool = False
) -> Path:
    """Write scikit-learn's 8x8 digits as an ImageFolder tree ``<root>/{train,test}/<0..9>/<index>.png``.

    Images are 8x8 8-bit grayscale PNGs (values 0..16 scaled to 0..255); ``index`` is the position in
    ``load_digits()``. The split is stratified and deterministic for a given ``seed``; with the default
    ``test_fraction=0.25`` it holds 1,347 train and 450 test images.

    Returns:
        ``root`` as an absolute Path (ready for ``ImageFolderDataModule(root, image_size=...)``).
    """
    images, labels = load_digits_uint8()
    train_idx, test_idx = digits_split(test_fraction, seed)
    names = [str(c) for c in range(10)]
    root = Path(root).expanduser().resolve()
    for split, idx in (("train", train_idx), ("test", test_idx)):
        export_image_folder(images[idx], labels[idx], root, split, names, indices=idx, overwrite=overwrite)
    return root


def balanced_subset(labels: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of ``limit`` items drawn class by class in turn (round robin over shuffled classes).

    Class counts differ by at most one, unless a class runs out of items (the others then fill in).
    """
    labels = np.asarray(labels)
    if limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    if limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        rank[members] = np.arange(len(members))
    # Primary key: rank within the class, secondary: class -> first one of each class, then second, ...
    order = np.lexsort((labels, rank))
    return np.sort(order[:limit])


def export_npz_cifar(
    npz_path: str | os.PathLike,
    root: str | os.PathLike,
    split: str,
    class_names: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> Path:
    """Write an ``.npz`` of CIFAR-style arrays as ``<root>/<split>/<class>/<index>.png``.

    Args:
        npz_path: file with ``images`` uint8 ``[N, 32, 32, 3]`` (HWC, RGB; any size accepted by
            :func:`export_image_folder`) and ``labels`` int ``[N]``, e.g. ``/work/shared/data/cifar10/test.npz``.
        root, split: destination (``<root>/<split>``).
        class_names: folder name per label; ``None`` = ``classes.txt`` next to the npz (one name per line,
            line i = label i) if present, else "0", "1", ...
        limit: keep only a class-balanced subset of ``limit`` images (deterministic for ``seed``).
        overwrite: replace an existing non-empty ``<root>/<split>``.

    Returns:
        The split directory. File names are the positions in the npz arrays.
    """
    npz_path = Path(npz_path)
    with np.load(npz_path) as data:
        missing = {"images", "labels"} - set(data.files)
        if missing:
            raise KeyError(f"{npz_path} lacks array(s) {sorted(missing)} (has {data.files})")
        images, labels = data["images"], data["labels"]
    if class_names is None:
        classes_txt = npz_path.with_name("classes.txt")
        if classes_txt.is_file():
            class_names = classes_txt.read_text().split()
        else:
            class_names = [str(c) for c in range(int(labels.max()) + 1)]
    idx = np.arange(len(labels)) if limit is None else balanced_subset(labels, limit, seed)
    return export_image_folder(images[idx], labels[idx], root, split, class_names, indices=idx, overwrite=overwrite)
