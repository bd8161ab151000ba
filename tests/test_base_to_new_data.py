"""The base-to-new data layer on datasets generated in each CoOp layout family (split JSON, FGVCAircraft's text
lists, ImageNet's folders): class names, base/new split and relabelling, few-shot draws, loaders, errors."""

from __future__ import annotations

import json

import pytest
import torch

from abkd_vision.data import BASE_TO_NEW_DATASETS, BaseToNewDataModule, base_new_split, eval_sampler, few_shot
from abkd_vision.data.synthetic import write_fake_coop_dataset


@pytest.mark.parametrize("n, n_base, n_new", [(37, 19, 18), (10, 5, 5), (100, 50, 50), (47, 24, 23),
                                              (1000, 500, 500), (397, 199, 198), (1, 1, 0)])
def test_base_new_split_sizes_for_the_real_class_counts(n, n_base, n_new):
    base, new = base_new_split(list(reversed(range(n))))  # order of appearance does not matter
    assert (len(base), len(new)) == (n_base, n_new)
    assert base == list(range(n_base)) and new == list(range(n_base, n))


def _dm(root, dataset, **kw):
    kw = {"image_size": 32, "num_workers": 0, "batch_size": 4, "eval_batch_size": 5, **kw}
    return BaseToNewDataModule(dataset, root=str(root), **kw)


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
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.max() < 7
    base_loader, new_loader = dm.val_dataloader()
    base_labels = torch.cat([y for _, y in base_loader])
    new_labels = torch.cat([y for _, y in new_loader])
    assert sorted(base_labels.tolist()) == sorted(list(range(4)) * 2)  # every test image once, relabelled
    assert sorted(new_labels.tolist()) == sorted(list(range(3)) * 2)
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [8, 6]


def test_eurosat_names_are_coops_descriptive_names(tmp_path):
    write_fake_coop_dataset(tmp_path, "EuroSAT", num_classes=10)
    dm = _dm(tmp_path, "EuroSAT")
    assert dm.class_names == ["Annual Crop Land", "Forest", "Herbaceous Vegetation Land", "Highway or Road",
                              "Industrial Buildings", "Pasture Land", "Permanent Crop Land", "Residential Buildings",
                              "River", "Sea or Lake"]
    assert dm.base_class_names[-1] == "Industrial Buildings"


def test_training_images_all_classes_or_base_only_and_few_shot_by_seed(tmp_path):
    write_fake_coop_dataset(tmp_path, "DTD", num_classes=6, train_per_class=10)
    all_classes = _dm(tmp_path, "DTD", train_classes="all")
    all_classes.setup("fit")
    assert {y for _, y in all_classes.train_set.items} == set(range(6))
    base = _dm(tmp_path, "DTD", train_classes="base", shots=4, seed=1)
    base.setup("fit")
    items = base.train_set.items
    assert len(items) == 3 * 4 and {y for _, y in items} == {0, 1, 2}
    again = _dm(tmp_path, "DTD", train_classes="base", shots=4, seed=1)
    again.setup("fit")
    other = _dm(tmp_path, "DTD", train_classes="base", shots=4, seed=2)
    other.setup("fit")
    assert again.train_set.items == items and other.train_set.items != items
    torch.manual_seed(7)  # seed None: the run's seed (torch.initial_seed) draws
    unseeded = _dm(tmp_path, "DTD", train_classes="base", shots=4)
    unseeded.setup("fit")
    assert unseeded.train_set.items == few_shot([it for it in all_classes.train_set.items if it[1] < 3], 4, 7)


def test_few_shot_takes_all_images_of_small_classes():
    items = [("a", 0), ("b", 0), ("c", 1)]
    assert sorted(few_shot(items, 5, 0)) == sorted(items)
    with pytest.raises(ValueError, match="shots must be a positive"):
        few_shot(items, 0, 0)


def test_eval_split_val_uses_the_val_images(tmp_path):
    write_fake_coop_dataset(tmp_path, "Caltech101", num_classes=4, test_per_class=3, val_per_class=1)
    dm = _dm(tmp_path, "Caltech101", eval_split="val")
    dm.setup("validate")
    assert [len(loader.dataset) for loader in dm.val_dataloader()] == [2, 2]


def test_unknown_dataset_lists_the_eleven(tmp_path):
    with pytest.raises(ValueError) as err:
        _dm(tmp_path, "CIFAR10")
    for name in BASE_TO_NEW_DATASETS:
        assert name in str(err.value)
    assert len(BASE_TO_NEW_DATASETS) == 11


def test_missing_files_name_the_path_and_the_instructions(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eurosat.*DATASETS\.md"):
        _dm(tmp_path, "EuroSAT")
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split_zhou_EuroSAT\.json.*DATASETS\.md"):
        _dm(tmp_path, "EuroSAT")
    write_fake_coop_dataset(tmp_path, "FGVCAircraft", num_classes=3)
    (tmp_path / "fgvc_aircraft" / "images_variant_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"images_variant_test\.txt"):
        _dm(tmp_path, "FGVCAircraft").setup("fit")


def test_a_listed_image_that_is_missing_is_reported_at_setup(tmp_path):
    base = write_fake_coop_dataset(tmp_path, "Food101", num_classes=3)
    split = json.loads((base / "split_zhou_Food101.json").read_text())
    (base / "images" / split["train"][0][0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"image file not found: .*class_000/train_00000\.png"):
        _dm(tmp_path, "Food101").setup("fit")


@pytest.mark.parametrize("kw, match", [({"train_classes": "new"}, "train_classes must be one of"),
                                       ({"eval_split": "train"}, "eval_split must be one of"),
                                       ({"shots": 0}, "shots must be a positive"),
                                       ({"crop_scale": (0.0, 1.0)}, "crop_scale")])
def test_bad_arguments_name_the_value(tmp_path, kw, match):
    write_fake_coop_dataset(tmp_path, "EuroSAT", num_classes=10)
    with pytest.raises(ValueError, match=match):
        _dm(tmp_path, "EuroSAT", **kw)


def test_distributed_eval_sampler_scores_every_sample_once():
    dataset = list(range(7))
    seen = []
    for rank in range(2):
        seen += list(eval_sampler(dataset, world_size=2, rank=rank))
    assert sorted(seen) == list(range(7))  # no padding duplicates (DistributedSampler would yield 8)
    assert eval_sampler(dataset, world_size=1, rank=0) is None and eval_sampler(dataset) is None
