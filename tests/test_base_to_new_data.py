"""The base-to-new data layer on datasets generated (or hand-written) in each CoOp layout family: split JSON,
FGVCAircraft's text lists, ImageNet's classnames.txt + folders. Class names, base/new split and relabelling, few-shot
draws, loaders, errors, the non-padding DDP evaluation sampler, and real CIFAR-10 images through the JSON layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

from abkd_vision.data import (
    BASE_TO_NEW_DATASETS,
    BaseToNewDataModule,
    ClassificationDataModule,
    base_new_split,
    clip_eval_transform,
    eval_sampler,
    export_arrays_as_coop,
    few_shot,
    make_dataloader,
    write_fake_coop_dataset,
)
from abkd_vision.data.coop import missing_images

SHARED_CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"

# name -> (real class count, base, new): the protocol's 11 datasets.
REAL_COUNTS = {
    "ImageNet": (1000, 500, 500), "Caltech101": (100, 50, 50), "OxfordPets": (37, 19, 18),
    "StanfordCars": (196, 98, 98), "Flowers102": (102, 51, 51), "Food101": (101, 51, 50),
    "FGVCAircraft": (100, 50, 50), "SUN397": (397, 199, 198), "DTD": (47, 24, 23), "EuroSAT": (10, 5, 5),
    "UCF101": (101, 51, 50),
}

# Written independently of the code's layout table, from CoOp's DATASETS.md and datasets/*.py:
# name -> (split file or list, image folder), relative to <root>.
COOP_FILES = {
    "ImageNet": ("imagenet/classnames.txt", "imagenet/images/train"),
    "Caltech101": ("caltech-101/split_zhou_Caltech101.json", "caltech-101/101_ObjectCategories"),
    "OxfordPets": ("oxford_pets/split_zhou_OxfordPets.json", "oxford_pets/images"),
    "StanfordCars": ("stanford_cars/split_zhou_StanfordCars.json", "stanford_cars"),
    "Flowers102": ("oxford_flowers/split_zhou_OxfordFlowers.json", "oxford_flowers/jpg"),
    "Food101": ("food-101/split_zhou_Food101.json", "food-101/images"),
    "FGVCAircraft": ("fgvc_aircraft/images_variant_train.txt", "fgvc_aircraft/images"),
    "SUN397": ("sun397/split_zhou_SUN397.json", "sun397/SUN397"),
    "DTD": ("dtd/split_zhou_DescribableTextures.json", "dtd/images"),
    "EuroSAT": ("eurosat/split_zhou_EuroSAT.json", "eurosat/2750"),
    "UCF101": ("ucf101/split_zhou_UCF101.json", "ucf101/UCF-101-midframes"),
}


def _dm(root, dataset, **kw) -> BaseToNewDataModule:
    kw = {"image_size": 32, "num_workers": 0, "batch_size": 4, "eval_batch_size": 5, **kw}
    return BaseToNewDataModule(dataset, root=str(root), **kw)


def _labels(loader) -> list[int]:
    return torch.cat([y for _, y in loader]).tolist()


# ----------------------------------------------------------------------------- base/new split


def test_the_eleven_datasets_in_order():
    assert BASE_TO_NEW_DATASETS == tuple(REAL_COUNTS) == tuple(COOP_FILES)


@pytest.mark.parametrize("dataset", list(REAL_COUNTS))
def test_base_new_split_sizes_for_the_real_class_counts(dataset):
    n, n_base, n_new = REAL_COUNTS[dataset]
    base, new = base_new_split(list(reversed(range(n))))  # order of appearance does not matter
    assert (len(base), len(new)) == (n_base, n_new)
    assert base == list(range(n_base)) and new == list(range(n_base, n))


def test_base_new_split_sorts_distinct_labels():
    assert base_new_split([7, 3, 3, 10, 5]) == ([3, 5], [7, 10])
    assert base_new_split([4, 2, 9]) == ([2, 4], [9])
    assert base_new_split([0]) == ([0], []) and base_new_split([]) == ([], [])


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("dataset", BASE_TO_NEW_DATASETS)
def test_every_dataset_is_written_and_read_in_coops_layout(tmp_path, dataset):
    write_fake_coop_dataset(tmp_path, dataset, num_classes=3, train_per_class=2, test_per_class=1, val_per_class=1,
                            image_size=8)
    listing, image_dir = COOP_FILES[dataset]
    assert (tmp_path / listing).is_file() and (tmp_path / image_dir).is_dir()
    dm = _dm(tmp_path, dataset)
    assert (dm.num_classes, dm.num_base_classes, dm.num_new_classes) == (3, 2, 1)
    dm.setup("fit")
    assert len(dm.train_set) == 6 and [len(s) for s in dm.eval_sets] == [2, 1]
    assert all(Path(p).is_relative_to(tmp_path / image_dir) for p, _ in dm.train_set.items)


@pytest.mark.parametrize("dataset", ["EuroSAT", "FGVCAircraft", "ImageNet", "OxfordPets"])
def test_each_layout_family_reads_splits_and_relabels(tmp_path, dataset):
    write_fake_coop_dataset(tmp_path, dataset, num_classes=7, train_per_class=3, test_per_class=2,
                            val_per_class=1, image_size=40)
    dm = _dm(tmp_path, dataset)
    assert dm.num_classes == 7 and (dm.num_base_classes, dm.num_new_classes) == (4, 3)
    assert dm.class_names == [f"class {i:03d}" for i in range(7)]  # underscores cleaned
    assert dm.base_class_names == dm.class_names[:4] and dm.new_class_names == dm.class_names[4:]
    dm.setup("fit")
    assert len(dm.train_set) == 7 * 3
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert sorted(_labels(dm.train_dataloader())) == sorted(list(range(7)) * 3)
    base_loader, new_loader = dm.val_dataloader()
    x, y = next(iter(base_loader))
    assert x.shape == (5, 3, 32, 32) and y.dtype == torch.int64
    assert sorted(_labels(base_loader)) == sorted(list(range(4)) * 2)  # every test image once, relabelled
    assert sorted(_labels(new_loader)) == sorted(list(range(3)) * 2)
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [8, 6]


def test_new_label_j_is_full_label_num_base_plus_j(tmp_path):
    write_fake_coop_dataset(tmp_path, "UCF101", num_classes=5, train_per_class=1, test_per_class=2,
                            class_names=["Apply_Eye_Makeup", "Archery", "Baby_Crawling", "Band_Marching", "Biking"])
    dm = _dm(tmp_path, "UCF101")
    assert dm.class_names == ["Apply Eye Makeup", "Archery", "Baby Crawling", "Band Marching", "Biking"]
    dm.setup("test")
    assert dm.train_set is None  # test needs no training images
    for group, offset in zip(dm.eval_sets, (0, dm.num_base_classes)):
        for k, (path, _) in enumerate(group.items):
            full = dm.class_names.index(Path(path).parent.name.replace("_", " "))  # image folder = raw class name
            assert group[k][1] == full - offset


def test_hand_written_json_split_reads_like_coop(tmp_path):
    """A split file as CoOp ships it (paths relative to the image folder, labels, raw names)."""
    image_dir = tmp_path / "dtd" / "images"
    entries = {"train": [], "val": [], "test": []}
    for label, cname in enumerate(["banded", "blotchy", "braided"]):
        for split, k in (("train", 1), ("train", 2), ("val", 3), ("test", 4)):
            rel = f"{cname}/{cname}_{k:04d}.jpg"
            (image_dir / cname).mkdir(parents=True, exist_ok=True)
            Image.new("L", (12, 9), color=40 * label).save(image_dir / rel)  # grayscale, not square
            entries[split].append([rel, label, cname])
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(entries))
    dm = _dm(tmp_path, "DTD", image_size=16)
    assert dm.class_names == ["banded", "blotchy", "braided"] and dm.new_class_names == ["braided"]
    dm.setup("fit")
    assert dm.train_set.items[0] == (str(image_dir / "banded" / "banded_0001.jpg"), 0)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 16, 16)  # grayscale converted to RGB
    assert [_labels(loader) for loader in dm.val_dataloader()] == [[0, 1], [0]]


def test_hand_written_aircraft_lists_with_spaces_and_slashes(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    (base / "images").mkdir(parents=True)
    variants = ["707-320", "Cessna 172", "F/A-18"]
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    ids_per_split = {"train": ["1025794", "1340192"], "val": ["0056978"], "test": ["0062765", "2233285", "1514522"]}
    for split, ids in ids_per_split.items():
        lines = [f"{i} {variants[k % 3]}" for k, i in enumerate(ids)]
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for i in ids:
            Image.new("RGB", (10, 10)).save(base / "images" / f"{i}.jpg")
    dm = _dm(tmp_path, "FGVCAircraft")
    assert dm.class_names == variants and dm.base_class_names == ["707-320", "Cessna 172"]
    dm.setup("fit")
    assert dm.train_set.items == [(str(base / "images" / "1025794.jpg"), 0), (str(base / "images" / "1340192.jpg"), 1)]
    assert [_labels(loader) for loader in dm.test_dataloader()] == [[0, 1], [0]]


def test_imagenet_reads_only_classnames_at_init_and_skips_hidden_files(tmp_path):
    base = tmp_path / "imagenet"
    base.mkdir()
    (base / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish\nn01484850 great white shark\n")
    dm = _dm(tmp_path, "ImageNet")  # no image folder yet: nothing is listed at construction
    assert dm.class_names == ["tench", "goldfish", "great white shark"]
    assert dm.base_class_names == ["tench", "goldfish"] and dm.num_new_classes == 1
    with pytest.raises(FileNotFoundError, match=r"images/train.*DATASETS\.md"):
        dm.setup("fit")
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537", "n01484850"):
            folder = base / "images" / split / wnid
            folder.mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / f"{wnid}_1.JPEG")
            (folder / ".DS_Store").write_bytes(b"\0")
    dm.setup("fit")
    assert len(dm.train_set) == 3 and [_labels(loader) for loader in dm.val_dataloader()] == [[0, 1], [0]]
    with pytest.warns(UserWarning, match="no val split"):
        val = _dm(tmp_path, "ImageNet", eval_split="val")
    val.setup("validate")
    assert [s.items for s in val.eval_sets] == [s.items for s in dm.eval_sets]  # val = test, as in CoOp
    (base / "images" / "val" / "n09999999").mkdir()
    with pytest.raises(ValueError, match="n09999999"):
        _dm(tmp_path, "ImageNet").setup("test")


def test_imagenet_class_order_not_sorted_warns(tmp_path):
    (tmp_path / "imagenet").mkdir()
    (tmp_path / "imagenet" / "classnames.txt").write_text("n02 b\nn01 a\n")
    with pytest.warns(UserWarning, match="sorted folder"):
        dm = _dm(tmp_path, "ImageNet")
    assert dm.class_names == ["b", "a"]  # labels follow the lines


def test_eurosat_names_are_coops_descriptive_names(tmp_path):
    expected = ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road", "Industrial Buildings",
                "Pasture Land", "Permanent Crop Land", "Residential Buildings", "River", "Sea or Lake"]
    write_fake_coop_dataset(tmp_path / "raw", "EuroSAT", num_classes=10)  # folder names "AnnualCrop", ...
    split = json.loads((tmp_path / "raw" / "eurosat" / "split_zhou_EuroSAT.json").read_text())
    assert split["train"][0][2] == "AnnualCrop"
    dm = _dm(tmp_path / "raw", "EuroSAT")
    assert dm.class_names == expected and dm.base_class_names[-1] == "Industrial Buildings"
    # A split file that already holds the descriptive names reads the same.
    write_fake_coop_dataset(tmp_path / "described", "EuroSAT", num_classes=10, class_names=expected)
    assert _dm(tmp_path / "described", "EuroSAT").class_names == expected


# ----------------------------------------------------------------------------- training images, few-shot


def test_training_images_all_classes_or_base_only_and_few_shot_by_seed(tmp_path):
    write_fake_coop_dataset(tmp_path, "DTD", num_classes=6, train_per_class=10, image_size=8)
    all_classes = _dm(tmp_path, "DTD", train_classes="all")
    all_classes.setup("fit")
    assert sorted(y for _, y in all_classes.train_set.items) == sorted(list(range(6)) * 10)
    assert set(_labels(all_classes.train_dataloader())) == set(range(6))
    base = _dm(tmp_path, "DTD", train_classes="base", shots=4, seed=1)
    base.setup("fit")
    items = base.train_set.items
    assert len(items) == 3 * 4 and sorted(y for _, y in items) == sorted([0, 1, 2] * 4)
    assert len(set(items)) == 12  # without replacement
    assert sorted(_labels(base.train_dataloader())) == sorted([0, 1, 2] * 4)
    again = _dm(tmp_path, "DTD", train_classes="base", shots=4, seed=1)
    again.setup("fit")
    other = _dm(tmp_path, "DTD", train_classes="base", shots=4, seed=2)
    other.setup("fit")
    assert again.train_set.items == items and other.train_set.items != items
    # With every class, the base classes get the same draw as with base classes only.
    everything = _dm(tmp_path, "DTD", train_classes="all", shots=4, seed=1)
    everything.setup("fit")
    assert len(everything.train_set) == 6 * 4 and everything.train_set.items[:12] == items
    torch.manual_seed(7)  # seed None: the run's seed (torch.initial_seed) draws
    unseeded = _dm(tmp_path, "DTD", train_classes="base", shots=4)
    unseeded.setup("fit")
    assert unseeded.train_set.items == few_shot([it for it in all_classes.train_set.items if it[1] < 3], 4, 7)


def test_few_shot_takes_all_images_of_small_classes():
    items = [("a", 0), ("b", 0), ("c", 1), ("d", 2), ("e", 2), ("f", 2)]
    assert sorted(few_shot(items, 5, 0)) == sorted(items)
    drawn = few_shot(items, 2, 0)
    assert [y for _, y in drawn] == [0, 0, 1, 2, 2] and set(drawn) <= set(items)
    with pytest.raises(ValueError, match="shots must be a positive"):
        few_shot(items, 0, 0)


def test_drop_last_and_eval_loaders_never_drop(tmp_path):
    write_fake_coop_dataset(tmp_path, "Food101", num_classes=2, train_per_class=5, test_per_class=3, image_size=8)
    dm = _dm(tmp_path, "Food101", drop_last=True, eval_batch_size=2)
    dm.setup("fit")
    assert [len(y) for _, y in dm.train_dataloader()] == [4, 4]  # 10 images, batch 4
    assert [[len(y) for _, y in loader] for loader in dm.val_dataloader()] == [[2, 1], [2, 1]]


# ----------------------------------------------------------------------------- eval split


def test_eval_split_val_uses_the_val_images(tmp_path):
    write_fake_coop_dataset(tmp_path, "Caltech101", num_classes=4, test_per_class=3, val_per_class=1, image_size=8)
    dm = _dm(tmp_path, "Caltech101", eval_split="val")
    dm.setup("validate")
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [2, 2]
    assert all("/val_" in path for group in dm.eval_sets for path, _ in group.items)
    assert dm.test_sets is None and dm.val_is == "CoOp val split (held out)"  # the test split is not listed
    dm.setup("test")  # test/* reads the test split whatever eval_split says
    assert [sorted(_labels(loader)) for loader in dm.test_dataloader()] == [[0, 0, 0, 1, 1, 1]] * 2
    assert not any("/val_" in path for group in dm.test_sets for path, _ in group.items)


def test_eval_split_val_without_val_images_is_an_error_not_the_test_set(tmp_path):
    write_fake_coop_dataset(tmp_path, "SUN397", num_classes=2, val_per_class=0, image_size=8)
    _dm(tmp_path, "SUN397").setup("test")  # the test split is there
    with pytest.raises(FileNotFoundError, match="val split .* lists no image"):
        _dm(tmp_path, "SUN397", eval_split="val").setup("validate")


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_the_eleven(tmp_path):
    with pytest.raises(ValueError) as err:
        _dm(tmp_path, "CIFAR10")
    assert "'CIFAR10'" in str(err.value)
    for name in BASE_TO_NEW_DATASETS:
        assert name in str(err.value)


def test_missing_files_name_the_path_and_the_instructions(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        _dm(tmp_path, "EuroSAT")
    assert f"expected {tmp_path / 'eurosat'};" in str(err.value) and "DATASETS.md" in str(err.value)
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        _dm(tmp_path, "EuroSAT")
    assert str(tmp_path / "eurosat" / "split_zhou_EuroSAT.json") in str(err.value)
    assert "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md" in str(err.value)
    write_fake_coop_dataset(tmp_path, "FGVCAircraft", num_classes=3, image_size=8)
    (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").unlink()
    dm = _dm(tmp_path, "FGVCAircraft")  # variants.txt is enough for the class list
    with pytest.raises(FileNotFoundError, match=r"images_variant_test\.txt.*DATASETS\.md"):
        dm.setup("fit")
    (tmp_path / "fgvc_aircraft" / "variants.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"variants\.txt"):
        _dm(tmp_path, "FGVCAircraft")


def test_missing_image_folder_and_missing_images_are_reported_at_setup(tmp_path):
    base = write_fake_coop_dataset(tmp_path, "Food101", num_classes=3, image_size=8)
    split = json.loads((base / "split_zhou_Food101.json").read_text())
    missing = [base / "images" / entry[0] for entry in split["train"][1:3]]
    for path in missing:
        path.unlink()
    dm = _dm(tmp_path, "Food101")  # the class list comes from the split file: construction works
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "2 of the 12 train images" in msg and str(missing[0]) in msg and str(missing[1]) in msg
    assert "DATASETS.md" in msg
    _dm(tmp_path, "Food101").setup("test")  # the test images are all there
    (base / "images").rename(base / "moved")
    with pytest.raises(FileNotFoundError, match=re.escape(f"image folder not found: expected {base / 'images'};")):
        _dm(tmp_path, "Food101").setup("test")


def test_missing_images_checks_every_path():
    assert missing_images([]) == []
    here = Path(__file__)
    paths = [str(here), str(here.with_name("nope.png")), str(here.parent / "no_dir" / "x.png"), str(here)]
    assert missing_images(paths) == paths[1:3]


def _write_split(tmp_path, entries: dict) -> None:
    (tmp_path / "oxford_pets").mkdir(exist_ok=True)
    (tmp_path / "oxford_pets" / "split_zhou_OxfordPets.json").write_text(json.dumps(entries))


@pytest.mark.parametrize("entries, match", [
    ({"train": [["a.jpg", 0, "a"], ["c.jpg", 2, "c"]], "val": [], "test": []}, r"absent: \[1\]"),
    ({"train": [["a.jpg", 0, "a"], ["b.jpg", 0, "b"]], "val": [], "test": []}, "two class names"),
    ({"train": [["a.jpg", "0", "a"]], "val": [], "test": []}, "integer label"),
    ({"train": [], "val": [], "test": []}, "no entries"),
    ([["a.jpg", 0, "a"]], "keys 'train', 'val' and 'test'"),
])
def test_malformed_split_files_name_the_file(tmp_path, entries, match):
    _write_split(tmp_path, entries)
    with pytest.raises(ValueError, match=match) as err:
        _dm(tmp_path, "OxfordPets")
    assert "split_zhou_OxfordPets.json" in str(err.value)


@pytest.mark.parametrize("kw, match", [({"train_classes": "new"}, r"train_classes must be one of .*'new'"),
                                       ({"eval_split": "train"}, r"eval_split must be one of .*'train'"),
                                       ({"shots": 0}, "shots must be a positive .* got 0"),
                                       ({"shots": 1.5}, "shots must be a positive .* got 1.5"),
                                       ({"image_size": 0}, "image_size=0"),
                                       ({"crop_scale": (0.0, 1.0)}, "crop_scale")])
def test_bad_arguments_name_the_value(tmp_path, kw, match):
    write_fake_coop_dataset(tmp_path, "EuroSAT", num_classes=10, train_per_class=1, test_per_class=1, image_size=8)
    with pytest.raises(ValueError, match=match):
        _dm(tmp_path, "EuroSAT", **kw)


def test_loaders_before_setup_are_an_error(tmp_path):
    write_fake_coop_dataset(tmp_path, "EuroSAT", num_classes=2, image_size=8)
    dm = _dm(tmp_path, "EuroSAT")
    for get in (dm.train_dataloader, dm.val_dataloader, dm.test_dataloader):
        with pytest.raises(RuntimeError, match="setup"):
            get()


# ----------------------------------------------------------------------------- DDP evaluation sampler


def test_distributed_eval_sampler_scores_every_sample_once():
    dataset = list(range(7))
    per_rank = [list(eval_sampler(dataset, world_size=2, rank=rank)) for rank in range(2)]
    assert [len(r) for r in per_rank] == [4, 3]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(7))  # no padding duplicate (DistributedSampler: 8)
    assert eval_sampler(dataset, world_size=1, rank=0) is None and eval_sampler(dataset) is None
    with pytest.raises(ValueError, match="2 samples cannot be split over 3 processes"):
        eval_sampler([0, 1], world_size=3, rank=2)


def _fake_distributed(monkeypatch, world_size: int, rank: int) -> None:
    monkeypatch.setattr(torch.distributed, "is_available", lambda: True)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: world_size)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: rank)


def test_eval_loaders_get_the_unrepeated_sampler_under_distributed(tmp_path, monkeypatch):
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    write_fake_coop_dataset(tmp_path, "EuroSAT", num_classes=4, train_per_class=2, test_per_class=3, image_size=8)
    dm = _dm(tmp_path, "EuroSAT")
    dm.setup("fit")

    class Tiny(ClassificationDataModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters({"batch_size": 2, "eval_batch_size": 2, "drop_last": False,
                                       "num_workers": 0, "pin_memory": False})
            self.train_set = self.val_set = self.test_set = TensorDataset(torch.arange(7))

    tiny = Tiny()
    assert isinstance(make_dataloader(tiny.val_set, batch_size=2, shuffle=False, drop_last=False, num_workers=0,
                                      pin_memory=False).sampler, SequentialSampler)  # not distributed
    seen: dict[str, list] = {"base": [], "new": [], "cifar-like": []}
    for rank in range(2):
        _fake_distributed(monkeypatch, 2, rank)
        assert isinstance(dm.train_dataloader().sampler, RandomSampler)  # training: left to Lightning
        assert isinstance(tiny.train_dataloader().sampler, RandomSampler)
        loaders = {"base": dm.val_dataloader()[0], "new": dm.test_dataloader()[1], "cifar-like": tiny.val_dataloader()}
        for name, loader in loaders.items():
            assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
            seen[name] += list(loader.sampler)
    assert sorted(seen["base"]) == list(range(6)) and sorted(seen["new"]) == list(range(6))
    assert sorted(seen["cifar-like"]) == list(range(7))


# ----------------------------------------------------------------------------- exporting arrays, real CIFAR-10


def test_export_arrays_validation(tmp_path):
    x, y = np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1])
    with pytest.raises(ValueError, match="uint8"):
        export_arrays_as_coop(tmp_path, "EuroSAT", ["a", "b"], train=(x.astype(np.float32), y), test=(x, y))
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.0"):
        export_arrays_as_coop(tmp_path, "EuroSAT", ["a"], train=(x, y), test=(x, y))
    with pytest.raises(ValueError, match="image folder"):
        export_arrays_as_coop(tmp_path, "EuroSAT", ["a/b", "c"], train=(x, y), test=(x, y))
    with pytest.raises(ValueError, match="no val split"):
        export_arrays_as_coop(tmp_path, "ImageNet", ["a", "b"], train=(x, y), test=(x, y), val=(x, y))
    with pytest.raises(ValueError, match="unknown base-to-new dataset"):
        export_arrays_as_coop(tmp_path, "CIFAR10", ["a", "b"], train=(x, y), test=(x, y))


def test_real_cifar10_through_the_json_layout(tmp_path):
    test_npz = SHARED_CIFAR10 / "test.npz"
    if not test_npz.is_file():
        pytest.skip(f"real CIFAR-10 arrays not present at {test_npz}")
    with np.load(test_npz) as data:
        images, labels = data["images"], data["labels"]
    classes = (SHARED_CIFAR10 / "classes.txt").read_text().split()
    pick = np.concatenate([np.flatnonzero(labels == c)[:6] for c in range(10)])  # 6 per class
    tr, va, te = pick[0::3], pick[1::3], pick[2::3]  # 2 per class each
    export_arrays_as_coop(tmp_path, "EuroSAT", classes, train=(images[tr], labels[tr]),
                          val=(images[va], labels[va]), test=(images[te], labels[te]))
    dm = _dm(tmp_path, "EuroSAT", eval_batch_size=100, shots=1, seed=0)
    assert dm.class_names == classes and dm.base_class_names == classes[:5]
    dm.setup("fit")
    assert sorted(y for _, y in dm.train_set.items) == list(range(10))
    (xb, yb), (xn, yn) = (next(iter(loader)) for loader in dm.val_dataloader())
    assert xb.shape == (10, 3, 32, 32) and sorted(yb.tolist()) == sorted(list(range(5)) * 2)
    assert sorted(yn.tolist()) == sorted(list(range(5)) * 2)
    # The images are the stored pixels (PNG, lossless) in file order: class by class, 2 each.
    new_idx = te[labels[te] >= 5]
    new_idx = new_idx[np.argsort(labels[new_idx], kind="stable")]
    assert np.array_equal(yn.numpy(), labels[new_idx] - 5)
    for k in (0, 9):
        assert torch.equal(xn[k], clip_eval_transform(32)(Image.fromarray(images[new_idx[k]])))
