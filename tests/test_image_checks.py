"""The up-front image check (abkd_vision.data.checks) through ImageFolderDataModule and BaseToNewDataModule:
truncated/empty/unreadable/undecodable files, raise vs skip, the cache, mid-epoch decode errors, duplicate class
names and option values."""

from __future__ import annotations

import io
import json
import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_image_folder
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from PIL import Image
from torch.utils.data import DataLoader

from abkd_vision.data import (
    BaseToNewDataModule,
    ImageFolderDataModule,
    checks,
    read_coop_dataset,
    write_fake_coop_dataset,
)
from abkd_vision.data.checks import ImageDecodeError, check_image_file, find_bad_images
from abkd_vision.lit import ClassifierModule


def _dm(root: Path, **kw) -> ImageFolderDataModule:
    kw = {"image_size": 16, "num_workers": 0, "batch_size": 4, "eval_batch_size": 4, **kw}
    return ImageFolderDataModule(str(root), **kw)


def _image_bytes(fmt: str, size: int = 24, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _png(root: Path, split: str, cls: str, k: int) -> Path:
    """The ``k``-th PNG (sorted) of a class folder."""
    return sorted((root / split / cls).glob("*.png"))[k]


@pytest.fixture
def folder(tmp_path) -> Path:
    """3 classes x 4 train PNGs, 2 test PNGs, plus one JPEG per train class."""
    root = tiny_image_folder(tmp_path / "data", 12, 6)
    for c in ("a", "b", "c"):
        (root / "train" / c / f"photo_{c}.jpg").write_bytes(_image_bytes("JPEG", seed=ord(c)))
    return root


# ----------------------------------------------------------------------------- one file


def test_single_file_checks(tmp_path):
    png, jpeg = _image_bytes("PNG"), _image_bytes("JPEG")
    cases = {
        "ok.png": (png, None),
        "ok.jpg": (jpeg, None),
        "padded.jpg": (jpeg + b"\0" * 5000, None),  # trailing zero padding: fine
        "appended.jpg": (jpeg + b"trailer data", None),  # data after the end marker: decodes, fine
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated (no JPEG end marker)"),
        "cut.png": (png[: len(png) // 2], "truncated (no PNG IEND chunk)"),
        "empty.png": (b"", "empty file"),
        "text.png": (b"not an image at all", "cannot identify image file"),
    }
    for name, (data, _) in cases.items():
        (tmp_path / name).write_bytes(data)
    for name, (_, problem) in cases.items():
        found = check_image_file(tmp_path / name)
        assert (found is None) if problem is None else found.startswith(problem), (name, found)
    assert check_image_file(tmp_path / "missing.png") == "cannot read: file not found"


def _corrupt_png_middle(path: Path) -> None:
    """Overwrite part of the IDAT data and fix its CRC: the header and the IEND chunk stay valid."""
    data = bytearray(path.read_bytes())
    at = data.index(b"IDAT")
    length = int.from_bytes(data[at - 4:at], "big")
    start = at + 4 + length // 3
    data[start:start + 16] = bytes(range(200, 216))
    crc = zlib.crc32(bytes(data[at:at + 4 + length]))
    data[at + 4 + length:at + 8 + length] = crc.to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_full_level_catches_a_corrupt_middle(folder):
    bad = _png(folder, "train", "b", 0)
    _corrupt_png_middle(bad)
    with pytest.raises(OSError):  # PIL really fails to decode it ...
        with Image.open(bad) as img:
            img.load()
    assert check_image_file(bad, "header") is None  # ... while its header and end are intact
    assert check_image_file(bad, "full").startswith("cannot decode")
    _dm(folder, check_images="header").setup("fit")
    with pytest.raises(ValueError, match=rf"(?s){bad}: cannot decode"):
        _dm(folder, check_images="full").setup("fit")


# ----------------------------------------------------------------------------- ImageFolder: raise


def test_truncated_png_and_jpeg_are_named_before_training(folder):
    png = _truncate(_png(folder, "train", "a", 0))
    jpeg = _truncate(folder / "train" / "c" / "photo_c.jpg")
    dm = _dm(folder)
    with pytest.raises(ValueError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "2 bad image file(s) in the train split of ImageFolderDataModule" in msg
    assert f"{png}: truncated (no PNG IEND chunk)" in msg
    assert f"{jpeg}: truncated (no JPEG end marker)" in msg
    assert "re-download or delete these files, or set data.init_args.on_bad_image: skip" in msg
    _dm(folder).setup("test")  # the test split alone is fine: only the splits a stage uses are checked


def test_empty_and_unreadable_files(folder, monkeypatch):
    empty = _png(folder, "train", "a", 0)
    empty.write_bytes(b"")
    locked = _png(folder, "train", "b", 0)
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads it anyway: simulate the permission error
        real_open = open

        def guarded(path, *args, **kwargs):
            if os.fspath(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(checks, "open", guarded, raising=False)
    try:
        with pytest.raises(ValueError) as err:
            _dm(folder).setup("fit")
    finally:
        locked.chmod(0o644)
    msg = str(err.value)
    assert f"{empty}: empty file" in msg
    assert f"cannot read {locked}: permission denied" in msg
    assert "output" not in msg


def test_many_bad_files_show_ten_and_the_count(tmp_path):
    root = tiny_image_folder(tmp_path / "data", 30, 3)
    for p in sorted((root / "train").rglob("*.png"))[:14]:
        p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)14 bad image file\(s\).*\.\.\. and 4 more") as err:
        _dm(root).setup("fit")
    assert str(err.value).count(": empty file") == 10


# ----------------------------------------------------------------------------- ImageFolder: skip


def test_skip_trains_without_them_and_records_them(folder, tmp_path):
    png = _truncate(_png(folder, "train", "a", 0))
    jpeg = _truncate(folder / "train" / "b" / "photo_b.jpg")
    test_bad = _png(folder, "test", "c", 0)
    test_bad.write_bytes(b"")
    dm = _dm(folder, on_bad_image="skip")
    logger = CSVLogger(str(tmp_path / "runs"), name="skip", version=0)
    trainer = Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=logger,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(ClassifierModule(model="resnet8", num_classes=3), datamodule=dm)
    assert trainer.global_step == 2
    expected = [{"path": str(png), "problem": "truncated (no PNG IEND chunk)", "split": "train"},
                {"path": str(jpeg), "problem": "truncated (no JPEG end marker)", "split": "train"},
                {"path": str(test_bad), "problem": "empty file", "split": "test"}]  # val reads the test folder
    assert sorted(dm.bad_images, key=str) == sorted(expected, key=str)
    paths = [p for p, _ in dm.train_set.samples]
    assert str(png) not in paths and str(jpeg) not in paths and len(paths) == 15 - 2
    assert dm.train_set.imgs is dm.train_set.samples
    assert dm.train_set.targets == [label for _, label in dm.train_set.samples]
    recorded = json.loads((Path(trainer.log_dir) / "bad_images.json").read_text())
    assert sorted(recorded, key=str) == sorted(expected, key=str)
    assert dm.hparams.on_bad_image == "skip" and dm.hparams.check_images == "header"


def test_skip_with_train_per_class_keeps_the_subset_consistent(folder):
    bad = _truncate(_png(folder, "train", "a", 0))
    dm = _dm(folder, train_per_class=2, on_bad_image="skip")
    dm.setup("fit")
    subset = dm.train_set
    items = [subset.dataset.samples[i] for i in subset.indices]
    assert [b["path"] for b in dm.bad_images] == [str(bad)]
    assert str(bad) not in [p for p, _ in items]
    assert sorted(label for _, label in items) == [0, 1, 1, 2, 2]  # class a lost one of its 2
    assert [label for _, label in (subset[i] for i in range(len(subset)))] == [label for _, label in items]


def test_a_class_left_empty_is_an_error_naming_it(folder):
    for p in (folder / "train" / "b").iterdir():
        p.write_bytes(b"")
    with pytest.raises(ValueError, match=r"class\(es\) 'b' of the train split .* no image left"):
        _dm(folder, on_bad_image="skip").setup("fit")


# ----------------------------------------------------------------------------- the cache


def test_second_setup_opens_no_image(folder, monkeypatch):
    _truncate(_png(folder, "train", "c", 0))
    opened = []
    real = checks.Image.open

    def counting(*args, **kwargs):
        opened.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(checks.Image, "open", counting)
    first = _dm(folder, on_bad_image="skip")
    first.setup("fit")
    assert len(opened) == 15 + 6  # train (fit) and val = test folder
    opened.clear()
    second = _dm(folder, on_bad_image="skip")
    second.setup("fit")
    assert opened == [] and second.bad_images == first.bad_images
    cached = list((Path(os.environ["ABKD_CACHE_DIR"]) / "image-checks").glob("*.json"))
    assert cached
    # a changed file (size and mtime) is checked again
    target = _png(folder, "train", "a", 0)
    target.write_bytes(_image_bytes("PNG", size=20))
    _dm(folder, on_bad_image="skip").setup("fit")
    assert len(opened) == 15


def test_unwritable_cache_folder_is_no_error(folder, tmp_path, monkeypatch):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ABKD_CACHE_DIR", str(blocked))
    assert find_bad_images([str(p) for p in (folder / "train").rglob("*.png")]) == []
    _dm(folder).setup("fit")


# ----------------------------------------------------------------------------- mid-epoch decode errors


def test_decode_error_mid_epoch_names_file_split_and_index(folder):
    bad = _truncate(_png(folder, "train", "b", 0))
    dm = _dm(folder, check_images="off", batch_size=15)
    dm.setup("fit")
    index = [p for p, _ in dm.train_set.samples].index(str(bad))
    pickle.loads(pickle.dumps(dm.train_set))  # picklable for DataLoader workers
    with pytest.raises(ImageDecodeError) as err:
        next(iter(DataLoader(dm.train_set, batch_size=15)))
    msg = str(err.value)
    assert f"cannot decode image {bad} (sample {index} of the train split of ImageFolderDataModule at" in msg
    assert str(folder) in msg and "image file is truncated" in msg and "check_images: full" in msg
    assert isinstance(err.value.__cause__, OSError)


# ----------------------------------------------------------------------------- CoOp / base-to-new


def test_base_to_new_reader_path(tmp_path, caplog):
    base = write_fake_coop_dataset(tmp_path, "ImageNet", 4, train_per_class=3, test_per_class=2, image_size=16)
    bad = sorted((base / "images" / "train").rglob("*.JPEG"))[4]
    _truncate(bad)
    kw = {"image_size": 16, "num_workers": 0, "batch_size": 2, "eval_batch_size": 4}
    with pytest.raises(ValueError, match=rf"(?s)the train split of BaseToNewDataModule ImageNet.*{bad}: truncated "
                                         r"\(no JPEG end marker\).*on_bad_image: skip"):
        BaseToNewDataModule("ImageNet", root=str(tmp_path), **kw).setup("fit")
    BaseToNewDataModule("ImageNet", root=str(tmp_path), **kw).setup("test")  # test images are fine
    dm = BaseToNewDataModule("ImageNet", root=str(tmp_path), on_bad_image="skip", **kw)
    with caplog.at_level("WARNING", logger="abkd_vision.data.checks"):
        dm.setup("fit")
    assert "skipping 1 bad image file(s) of the train split" in caplog.text
    assert dm.bad_images == [{"path": str(bad), "problem": "truncated (no JPEG end marker)", "split": "train"}]
    assert len(dm.train_set) == 11 and str(bad) not in [p for p, _ in dm.train_set.items]
    # mid-epoch: check off, read through a worker process
    off = BaseToNewDataModule("ImageNet", root=str(tmp_path), check_images="off", **kw)
    off.setup("fit")
    index = [p for p, _ in off.train_set.items].index(str(bad))
    loader = DataLoader(torch.utils.data.Subset(off.train_set, [index]), batch_size=1, num_workers=1)
    with pytest.raises(ImageDecodeError, match=rf"cannot decode image {bad} \(sample {index} of the train split of "
                                               "BaseToNewDataModule ImageNet"):
        next(iter(loader))


def test_duplicate_class_names_are_an_error(tmp_path):
    base = tmp_path / "imagenet"
    base.mkdir()
    (base / "classnames.txt").write_text("n01 crane\nn02 goldfish\n\nn03 tench\nn04 crane\nn05 tench\n")
    with pytest.raises(ValueError, match=r"duplicate class names in .*classnames\.txt: 'crane' \(lines 1 and 5\), "
                                         r"'tench' \(lines 4 and 6\); class names must be unique"):
        read_coop_dataset(tmp_path, "ImageNet", list_images=False)
    aircraft = tmp_path / "fgvc_aircraft"
    aircraft.mkdir()
    (aircraft / "variants.txt").write_text("A320\n737-800\nA320\n")
    with pytest.raises(ValueError, match=r"variants\.txt: 'A320' \(lines 1 and 3\)"):
        read_coop_dataset(tmp_path, "FGVCAircraft", list_images=False)
    dtd = tmp_path / "dtd"
    dtd.mkdir()
    (dtd / "split_zhou_DescribableTextures.json").write_text(json.dumps(
        {"train": [["a/1.jpg", 0, "wavy_lines"], ["b/1.jpg", 1, "wavy lines"]], "val": [], "test": []}))
    with pytest.raises(ValueError, match=r"'wavy lines' \(labels 0 and 1\)"):
        read_coop_dataset(tmp_path, "DTD", list_images=False)


def test_bad_option_values_list_the_choices(folder, tmp_path):
    with pytest.raises(ValueError, match=r"check_images must be one of 'off', 'header', 'full', got 'fast'"):
        _dm(folder, check_images="fast")
    with pytest.raises(ValueError, match=r"on_bad_image must be one of 'raise', 'skip', got 'ignore'"):
        _dm(folder, on_bad_image="ignore")
    write_fake_coop_dataset(tmp_path, "EuroSAT", 2, image_size=8)
    with pytest.raises(ValueError, match=r"check_images must be one of 'off', 'header', 'full'"):
        BaseToNewDataModule("EuroSAT", root=str(tmp_path), check_images=True)
