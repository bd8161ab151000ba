"""Tests of abkd_vision.data on small generated datasets (plus real CIFAR-10 images when available)."""

from __future__ import annotations

import os
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abkd_vision.data import (
    CIFAR100_CLASSES,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR100DataModule,
    ImageFolderDataModule,
    balanced_subset,
    cifar_eval_transform,
    cifar_train_transform,
    export_digits,
    export_image_folder,
    export_npz_cifar,
)
from abkd_vision.data.synthetic import write_fake_cifar100

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "data").resolve()
CLASSES = ["cat", "dog", "frog"]


def _write_images(folder: Path, n_rgb: int, n_gray: int, rng: np.random.Generator) -> None:
    """n_rgb random 32x32 RGB PNGs and n_gray random 8x8 grayscale PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_rgb):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"rgb{i}.png")
    for i in range(n_gray):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / f"gray{i}.png")


def _make_tree(root: Path, splits=("train", "test"), n_train=(6, 2), n_eval=(2, 1), classes=CLASSES) -> Path:
    rng = np.random.default_rng(0)
    for split in splits:
        n_rgb, n_gray = n_train if split == "train" else n_eval
        for c in classes:
            _write_images(root / split / c, n_rgb, n_gray, rng)
    return root


def _dm(root: Path, **kw) -> ImageFolderDataModule:
    kw = {"num_workers": 0, "batch_size": 5, "eval_batch_size": 4, **kw}
    return ImageFolderDataModule(str(root), **kw)


# ----------------------------------------------------------------------------- transforms


def test_transforms_give_3_channel_normalised_tensors():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for img in (rgb, rgb.convert("L").resize((8, 8)), rgb.convert("RGBA").resize((40, 30))):
        for tf in (cifar_train_transform(), cifar_eval_transform()):
            x = tf(img)
            assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert cifar_train_transform(48)(img).shape == (3, 48, 48)
    # At 32x32 the eval transform is exactly ToTensor + Normalize (the resize is the identity).
    expected = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255
    expected = (expected - torch.tensor(CIFAR100_MEAN)[:, None, None]) / torch.tensor(CIFAR100_STD)[:, None, None]
    assert torch.allclose(cifar_eval_transform()(rgb), expected, atol=1e-6)
    with pytest.raises(ValueError):
        cifar_eval_transform(mean=(0.5,), std=(0.5,))


# ----------------------------------------------------------------------------- ImageFolderDataModule


def test_image_folder_batches_and_drop_last(tmp_path):
    root = _make_tree(tmp_path / "ds")  # train: 3 classes x (6 RGB 32x32 + 2 gray 8x8) = 24 images
    dm = _dm(root)
    # Known before setup: the training module builds its classifier head from it.
    assert dm.num_classes == 3 and dm.class_names == CLASSES
    dm.setup("fit")
    assert len(dm.train_set) == 24 and len(dm.test_set) == 9 and dm.val_set is dm.test_set
    batches = list(dm.train_dataloader())
    assert len(batches) == 24 // 5 and all(x.shape == (5, 3, 32, 32) for x, _ in batches)
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) < 3
    eval_sizes = [len(y) for _, y in dm.val_dataloader()]
    assert eval_sizes == [4, 4, 1]  # eval loaders never drop
    dm_keep = _dm(root, drop_last=False)
    dm_keep.setup("fit")
    assert [len(y) for _, y in dm_keep.train_dataloader()] == [5, 5, 5, 5, 4]


def test_image_folder_resize_val_split_and_overrides(tmp_path):
    root = _make_tree(tmp_path / "ds", splits=("train", "val", "test"))
    dm = _dm(root, image_size=48)
    dm.setup()
    assert dm.val_set is not dm.test_set and Path(dm.val_set.root).name == "val"
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 48, 48)
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (4, 3, 48, 48)

    dm2 = _dm(root, eval_transform=cifar_eval_transform(16), train_transform=cifar_train_transform(16))
    dm2.setup("validate")
    assert dm2.train_set is None
    assert next(iter(dm2.val_dataloader()))[0].shape == (4, 3, 16, 16)


def test_image_folder_worker_process(tmp_path):
    # Transforms must be picklable for worker processes.
    dm = _dm(_make_tree(tmp_path / "ds"), num_workers=1)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and y.shape == (5,)


def _no_test(root):
    _make_tree(root, splits=("train",))
    return root / "test"


def _no_train(root):
    _make_tree(root, splits=("test",))
    return root / "train"


def _mismatch(root):
    _make_tree(root, splits=("train",))
    _make_tree(root, splits=("test",), classes=["cat", "dog", "horse"])
    return root / "test"


def _empty_class(root):
    _make_tree(root)
    (root / "train" / "zebra").mkdir()
    (root / "test" / "zebra").mkdir()
    (root / "test" / "zebra" / "notes.txt").write_text("not an image")
    return root / "train"


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        (lambda root: root, FileNotFoundError),  # root itself missing
        (_no_train, FileNotFoundError),
        (_no_test, FileNotFoundError),
        (_mismatch, ValueError),
        (_empty_class, FileNotFoundError),
    ],
    ids=["missing-root", "missing-train", "missing-test", "class-mismatch", "empty-class"],
)
def test_image_folder_errors_name_path_and_layout(tmp_path, make, exc):
    root = tmp_path / "ds"
    bad_path = make(root)
    with pytest.raises(exc) as info:
        _dm(root)
    msg = str(info.value)
    assert str(bad_path) in msg and "expected layout" in msg


# ----------------------------------------------------------------------------- CIFAR100DataModule


def test_cifar_missing_data_error(tmp_path):
    dm = CIFAR100DataModule(root=str(tmp_path), download=False, num_workers=0)
    assert dm.num_classes == 100 and dm.class_names[:2] == ["apple", "aquarium_fish"]
    dm.prepare_data()  # no download requested: nothing to do, and no network access
    with pytest.raises(FileNotFoundError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert str(tmp_path.resolve() / "cifar-100-python") in msg
    assert "download" in msg and "cifar-100-python.tar.gz" in msg


def test_cifar_download_failure_is_file_not_found(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    dm = CIFAR100DataModule(root=str(tmp_path), download=True, num_workers=0)
    with pytest.raises(FileNotFoundError, match="cifar-100-python") as info:
        dm.prepare_data()
    assert "no network" in str(info.value)


def _write_fake_cifar100(root: Path, n_train: int = 20, n_test: int = 10) -> None:
    """Tiny dataset in the official ``cifar-100-python`` pickle format (a Python-3 pickle with ``str`` keys loads
    as the official Python-2 pickles do with ``encoding="latin1"``)."""
    write_fake_cifar100(root, n_train, n_test)


def test_cifar_loads_official_format(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    _write_fake_cifar100(tmp_path)
    # torchvision 0.29 checks the md5 of train/test/meta on every load; our fake files cannot match it.
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    dm = CIFAR100DataModule(root=str(tmp_path), batch_size=8, eval_batch_size=16, num_workers=0)
    dm.setup("fit")
    assert len(dm.train_set) == 20 and len(dm.test_set) == 10 and dm.val_set is dm.test_set
    assert dm.class_names == list(CIFAR100_CLASSES)
    train = list(dm.train_dataloader())
    assert len(train) == 2 and all(x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 for x, _ in train)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (10, 3, 32, 32) and y.dtype == torch.int64 and int(y.max()) < 100
    # Eval images are the stored pixels, normalised (checks the CHW row layout round trip).
    with open(tmp_path / "cifar-100-python" / "test", "rb") as f:
        raw = pickle.load(f)["data"][0].reshape(3, 32, 32)
    mean, std = torch.tensor(CIFAR100_MEAN)[:, None, None], torch.tensor(CIFAR100_STD)[:, None, None]
    assert torch.allclose(x[0], (torch.from_numpy(raw).float() / 255 - mean) / std, atol=1e-6)


def test_cifar_corrupted_files_error(tmp_path):
    _write_fake_cifar100(tmp_path)  # md5 differs from the official files
    dm = CIFAR100DataModule(root=str(tmp_path), num_workers=0)
    with pytest.raises(RuntimeError, match="md5") as info:
        dm.setup("test")
    assert str(tmp_path.resolve() / "cifar-100-python") in str(info.value)


def test_cifar100_class_names_match_shared_list():
    classes_txt = SHARED / "cifar100" / "classes.txt"
    if not classes_txt.is_file():
        pytest.skip(f"{classes_txt} not present")
    assert classes_txt.read_text().split() == list(CIFAR100_CLASSES)


# ----------------------------------------------------------------------------- export helpers


def test_export_digits_counts_and_round_trip(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = export_digits(tmp_path / "digits")
    train_counts = {c: len(list((root / "train" / str(c)).iterdir())) for c in range(10)}
    test_counts = {c: len(list((root / "test" / str(c)).iterdir())) for c in range(10)}
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(c) for c in range(10)]
    assert sum(test_counts.values()) == 450 and sum(train_counts.values()) == 1347
    totals = np.bincount(digits.target)
    for c in range(10):
        assert train_counts[c] + test_counts[c] == totals[c]
        assert abs(test_counts[c] - 0.25 * totals[c]) <= 1  # stratified
    # File name = index in load_digits(); pixels 0..16 -> 0..255, lossless.
    for path in sorted((root / "test" / "7").iterdir())[:5]:
        img = np.asarray(Image.open(path))
        expected = np.round(digits.images[int(path.stem)] * 255 / 16).astype(np.uint8)
        assert img.shape == (8, 8) and np.array_equal(img, expected) and digits.target[int(path.stem)] == 7
    # Deterministic: a second export with the same seed writes the same files.
    root2 = export_digits(tmp_path / "digits2")
    assert sorted(p.name for p in (root2 / "test" / "3").iterdir()) == sorted(
        p.name for p in (root / "test" / "3").iterdir()
    )
    dm = _dm(root, image_size=32)
    assert dm.num_classes == 10


def test_export_npz_cifar_balanced_subset(tmp_path):
    rng = np.random.default_rng(1)
    n = 60
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = np.repeat(np.arange(4), [10, 20, 25, 5]).astype(np.int64)
    npz = tmp_path / "arrays" / "test.npz"
    npz.parent.mkdir()
    np.savez(npz, images=images, labels=labels)
    names = ["a", "b", "c", "d"]

    split_dir = export_npz_cifar(npz, tmp_path / "out", "test", names, limit=22, seed=0)
    counts = [len(list((split_dir / c).iterdir())) for c in names]
    assert sum(counts) == 22 and max(counts) - min(counts) <= 1
    for path in (split_dir / "c").iterdir():
        i = int(path.stem)
        assert labels[i] == 2 and np.array_equal(np.asarray(Image.open(path)), images[i])
    # A class with too few images is exhausted and the others fill in; the selection is deterministic.
    sel = balanced_subset(labels, 40, seed=3)
    assert len(sel) == 40 and np.bincount(labels[sel]).tolist() == [10, 13, 12, 5]
    assert np.array_equal(sel, balanced_subset(labels, 40, seed=3))

    with pytest.raises(FileExistsError):
        export_npz_cifar(npz, tmp_path / "out", "test", names)
    (npz.parent / "classes.txt").write_text("\n".join(names) + "\n")
    split_dir = export_npz_cifar(npz, tmp_path / "out", "test", overwrite=True)  # names from classes.txt
    assert sum(len(list((split_dir / c).iterdir())) for c in names) == n


def test_export_image_folder_validation(tmp_path):
    imgs = np.zeros((3, 8, 8, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        export_image_folder(imgs.astype(np.float32), np.zeros(3, int), tmp_path, "train", ["a"])
    with pytest.raises(ValueError, match="labels"):
        export_image_folder(imgs, np.array([0, 1, 2]), tmp_path, "train", ["a", "b"])
    with pytest.raises(ValueError, match="separator"):
        export_image_folder(imgs, np.zeros(3, int), tmp_path, "train", ["a/b"])
    with pytest.warns(UserWarning, match="sorted"):
        export_image_folder(imgs, np.array([0, 1, 0]), tmp_path, "train", ["b", "a"])
    assert Image.open(tmp_path / "train" / "b" / "0.png").mode == "L"


def test_real_cifar10_through_image_folder(tmp_path):
    test_npz = SHARED / "cifar10" / "test.npz"
    if not test_npz.is_file():
        pytest.skip(f"real CIFAR-10 arrays not present at {test_npz}")
    with np.load(test_npz) as data:
        images, labels = data["images"], data["labels"]
    export_npz_cifar(test_npz, tmp_path / "c10", "train", limit=200, seed=0)
    export_npz_cifar(test_npz, tmp_path / "c10", "test", limit=200, seed=1)
    dm = ImageFolderDataModule(str(tmp_path / "c10"), num_workers=0, batch_size=32, eval_batch_size=200)
    assert dm.num_classes == 10 and dm.class_names[0] == "airplane"
    dm.setup("fit")
    assert len(dm.train_set) == 200 and len(dm.train_dataloader()) == 200 // 32
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (200, 3, 32, 32)
    # ImageFolder order = (class, file name) = (label, npz index): labels and pixels must round-trip.
    sel = balanced_subset(labels, 200, seed=1)
    sel = sel[np.lexsort((sel, labels[sel]))]
    assert np.array_equal(y.numpy(), labels[sel]) and np.bincount(y.numpy()).tolist() == [20] * 10
    assert torch.allclose(x[0], cifar_eval_transform()(Image.fromarray(images[sel[0]])))
