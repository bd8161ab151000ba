"""The exact teacher-logit cache: views as torchvision draws them, the memory-mapped cache, lazy filling inside a
distillation run, fallbacks to the live teacher, and concurrent fillers."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from PIL import Image
from torchvision.transforms import functional as TF

from abkd_vision.data import ImageFolderDataModule, cifar_train_transform, export_image_folder
from abkd_vision.data.transforms import CropFlipViews, IndexedViews, _with_transform
from abkd_vision.lit import DistillationModule
from abkd_vision.lit import common as common_module
from abkd_vision.lit import distillation as distillation_module
from abkd_vision.models import create_model
from abkd_vision.teacher_cache import CacheMismatch, TeacherLogitCache, cache_key, teacher_sha256

REPO = Path(__file__).resolve().parents[1]


# -- views ---------------------------------------------------------------------------------------------------------
def _image(seed: int = 0, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _torchvision_view(img: Image.Image, views: CropFlipViews, dy: int, dx: int, flip: bool) -> torch.Tensor:
    img = TF.crop(TF.pad(img, views.padding), dy, dx, views.image_size, views.image_size)
    return TF.normalize(TF.to_tensor(TF.hflip(img) if flip else img), views.mean, views.std)


@pytest.mark.parametrize("padding, hflip", [(4, True), (2, False)])
def test_every_view_is_torchvision_crop_and_flip(padding, hflip):
    views = CropFlipViews(32, padding=padding, hflip=hflip)
    assert views.num_views == (2 * padding + 1) ** 2 * (2 if hflip else 1)
    img = _image()
    every = views.all_views(img)
    assert every.shape == (views.num_views, 3, 32, 32)
    seen = set()
    for view in range(views.num_views):
        dy, dx, flip = views.view_params(view)
        assert views.view_id(dy, dx, flip) == view
        seen.add((dy, dx, flip))
        expected = _torchvision_view(img, views, dy, dx, flip)
        assert torch.equal(views.apply(img, dy, dx, flip), expected)
        assert torch.equal(every[view], expected)
    assert len(seen) == views.num_views


@pytest.mark.parametrize("padding, hflip", [(4, True), (4, False), (0, True), (3, True)])
def test_same_rng_same_image_as_torchvision_pipeline(padding, hflip):
    """For every generator state the view transform returns torchvision's tensor and leaves the RNG where
    torchvision's RandomCrop + RandomHorizontalFlip leave it (so runs with and without the cache see the same
    views), and the view id names the crop/flip actually applied."""
    reference = cifar_train_transform(32, padding=padding, hflip=hflip)
    views = CropFlipViews(32, padding=padding, hflip=hflip)
    img = _image(1)
    every = views.all_views(img)
    for seed in range(60):
        torch.manual_seed(seed)
        expected = reference(img)
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        got, view = views(img)
        assert torch.equal(got, expected)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(every[view], expected)


def test_view_ids_are_uniform():
    """162 equally likely views (uniform offsets, p = 0.5 flip): chi-square tests on the joint and marginals."""
    views = CropFlipViews()
    torch.manual_seed(0)
    n_per_view = 100
    ids = np.array([views.view_id(*views.draw()) for _ in range(views.num_views * n_per_view)])
    counts = np.bincount(ids, minlength=views.num_views)
    chi2 = ((counts - n_per_view) ** 2 / n_per_view).sum()
    # chi-square with 161 degrees of freedom: 0.01% and 99.99% quantiles are 102.6 and 236.4
    assert 102.6 < chi2 < 236.4, chi2
    dy, dx, flip = zip(*(views.view_params(i) for i in ids))
    for values, k in ((dy, 9), (dx, 9), (flip, 2)):
        c = np.bincount(np.asarray(values, dtype=int), minlength=k)
        e = len(ids) / k
        assert ((c - e) ** 2 / e).sum() < 31.9  # 99.99% quantile for 8 dof (bigger than for 1 dof)


# -- the cache file --------------------------------------------------------------------------------------------------
def _key(n=5, views=None, sha="a" * 64, classes=3, dtype="float16"):
    return cache_key(teacher="resnet8", num_classes=classes, teacher_sha256=sha,
                     dataset={"dataset": "unit", "split": "train", "num_images": n}, views=views or CropFlipViews(),
                     dtype=dtype)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_cache_write_lookup_reopen(tmp_path, dtype):
    cache = TeacherLogitCache.open(tmp_path, _key(dtype=dtype))
    assert cache.directory.parent == tmp_path and cache.shape == (5, 162, 3)
    index, view = torch.tensor([0, 4, 2]), torch.tensor([161, 0, 7])
    logits, filled = cache.lookup(index, view)
    assert not filled.any() and logits.dtype == torch.float32
    values = torch.randn(3, 3) * 10
    cache.write(index[:2], view[:2], values[:2])
    logits, filled = cache.lookup(index, view)
    assert filled.tolist() == [True, True, False]
    torch.testing.assert_close(logits[:2], cache.round(values[:2]), rtol=0, atol=0)
    if dtype == "float32":
        torch.testing.assert_close(logits[:2], values[:2], rtol=0, atol=0)
    # another handle (the folder itself, or the root again) and a pickled copy read the same rows
    for other in (TeacherLogitCache.open(cache.directory, _key(dtype=dtype)),
                  TeacherLogitCache.open(tmp_path, _key(dtype=dtype)), pickle.loads(pickle.dumps(cache))):
        got, ok = other.lookup(index, view)
        assert ok.tolist() == [True, True, False]
        torch.testing.assert_close(got[:2], logits[:2], rtol=0, atol=0)
    assert cache.filled_count() == 2
    # files of the documented size: never read into memory as a whole
    assert (cache.directory / "logits.bin").stat().st_size == 5 * 162 * 3 * (2 if dtype == "float16" else 4)
    with pytest.raises(IndexError):
        cache.lookup(torch.tensor([5]), torch.tensor([0]))


def test_cache_folder_of_another_key_is_refused(tmp_path):
    cache = TeacherLogitCache.open(tmp_path, _key())
    with pytest.raises(CacheMismatch, match="teacher_sha256"):
        TeacherLogitCache.open(cache.directory, _key(sha="b" * 64))
    with pytest.raises(CacheMismatch, match="padding"):
        TeacherLogitCache.open(cache.directory, _key(views=CropFlipViews(padding=2)))
    # under a root folder another key is another cache
    assert TeacherLogitCache.open(tmp_path, _key(sha="b" * 64)).directory != cache.directory


def test_teacher_hash_of_file_or_weights(tmp_path):
    net = create_model("resnet8", num_classes=3)  # BatchNorm's 0-dim num_batches_tracked included
    first = teacher_sha256(None, net)
    assert first.startswith("weights:") and teacher_sha256(tmp_path / "missing.pth", net) == first
    with torch.no_grad():
        net.fc.bias.add_(1e-3)
    assert teacher_sha256(None, net) != first
    torch.save(net.state_dict(), tmp_path / "t.pth")
    assert len(teacher_sha256(tmp_path / "t.pth", net)) == 64
    # published and registered names are one teacher
    assert cache_key(teacher="resnet8", num_classes=3, teacher_sha256="x", dataset={"num_images": 1},
                     views=CropFlipViews()) == cache_key(teacher="cifar_resnet8", num_classes=3, teacher_sha256="x",
                                                         dataset={"num_images": 1}, views=CropFlipViews())


# -- distillation runs -----------------------------------------------------------------------------------------------
def _folder(root: Path, n_train: int) -> Path:
    """Three classes of 32x32 images (n_train train, 6 test)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", 6)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 60, size=(n, 32, 32, 3)).astype(np.uint8)
        images[np.arange(n), :, :, labels] += 150
        export_image_folder(images, labels, root, split, ["a", "b", "c"])
    return root


@pytest.fixture(scope="module")
def folder32(tmp_path_factory) -> Path:
    return _folder(tmp_path_factory.mktemp("folder32"), 24)


def _teacher_ckpt(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    torch.save(create_model("resnet8", num_classes=3).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    return _teacher_ckpt(tmp_path_factory.mktemp("teacher") / "teacher.pth", 123)


class _Losses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _run(data_root: Path, ckpt: Path, cache: Path | None, epochs: int = 2, **data_kwargs):
    seed_everything(0)
    data = ImageFolderDataModule(data_root, batch_size=8, num_workers=0, **data_kwargs)
    module = DistillationModule(student="resnet8", teacher="resnet8", teacher_ckpt=str(ckpt), num_classes=3,
                                evaluate_teacher=False, teacher_cache=str(cache) if cache else None)
    losses = _Losses()
    trainer = Trainer(accelerator="cpu", max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[losses])
    trainer.fit(module, datamodule=data)
    return module, trainer, losses.losses, data


def _live_logits_for_filled(cache: TeacherLogitCache, data: ImageFolderDataModule, ckpt: Path):
    teacher = create_model("resnet8", num_classes=3)
    teacher.load_state_dict(torch.load(ckpt, weights_only=True))
    teacher.eval()
    every = _with_transform(data.train_set, data.train_views.all_views)
    index, view = np.nonzero(np.asarray(cache.filled))
    inputs = torch.cat([every[i][0][view[index == i]] for i in np.unique(index)])  # nonzero: row-major order
    with torch.no_grad():
        live = torch.cat([teacher(chunk) for chunk in inputs.split(512)])
    return cache.lookup(index, view)[0], live, len(index)


def test_distillation_with_cache_matches_live_teacher(tmp_path, folder32, teacher_ckpt, monkeypatch):
    messages = []
    monkeypatch.setattr(distillation_module, "rank_zero_info", messages.append)
    monkeypatch.setattr(common_module, "rank_zero_info", messages.append)
    _, _, live_losses, _ = _run(folder32, teacher_ckpt, cache=None)
    assert not messages  # the cache is opt-in: nothing changes without it

    module, trainer, fill_losses, data = _run(folder32, teacher_ckpt, cache=tmp_path / "cache")
    assert len(fill_losses) == len(live_losses) == 6
    # same views (the RNG is consumed identically), teacher logits rounded to float16: same trajectory
    torch.testing.assert_close(torch.tensor(fill_losses), torch.tensor(live_losses), rtol=2e-3, atol=2e-4)
    assert module.teacher.cache_misses > 0 and module.teacher.cache is None  # detached after fit
    assert not data.return_views  # the data module is back to (images, target)
    first_rate = float(trainer.callback_metrics["train/teacher_cache_hit_rate_epoch"])
    assert 0 <= first_rate < 1

    # every cached row is the live teacher's logits for that view, within float16 rounding
    cache = TeacherLogitCache.open(tmp_path / "cache", _only_subdir_key(tmp_path / "cache"))
    cached, live, n_filled = _live_logits_for_filled(cache, data, teacher_ckpt)
    assert n_filled == module.teacher.cache_misses  # every miss was written (distinct views here)
    torch.testing.assert_close(cached, live, rtol=2**-11, atol=1e-6)
    assert torch.equal(cached, live.half().float()) or (cached != live.half().float()).float().mean() < 1e-3

    # the second run reads everything from the cache and follows the same trajectory
    module2, trainer2, hit_losses, _ = _run(folder32, teacher_ckpt, cache=tmp_path / "cache")
    assert module2.teacher.cache_misses == 0 and module2.teacher.cache_hits == 6 * 8
    assert float(trainer2.callback_metrics["train/teacher_cache_hit_rate_epoch"]) == 1.0
    torch.testing.assert_close(torch.tensor(hit_losses), torch.tensor(fill_losses), rtol=1e-5, atol=1e-6)
    assert any("teacher logits cached in" in m for m in messages)


def _only_subdir_key(root: Path) -> dict:
    import json

    (folder,) = [p for p in root.iterdir() if p.is_dir()]
    return json.loads((folder / "header.json").read_text())["key"]


def test_other_augmentation_or_teacher_falls_back_to_live_teacher(tmp_path, folder32, teacher_ckpt, monkeypatch):
    messages = []
    monkeypatch.setattr(distillation_module, "rank_zero_info", messages.append)
    monkeypatch.setattr(common_module, "rank_zero_info", messages.append)
    module, _, losses, _ = _run(folder32, teacher_ckpt, cache=tmp_path / "cache", epochs=1)
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]

    # a custom training transform (no views to name): live teacher, batches stay (images, target)
    messages.clear()
    module, _, custom_losses, data = _run(folder32, teacher_ckpt, cache=tmp_path / "cache", epochs=1,
                                          train_transform=cifar_train_transform(32, padding=2))
    assert module.teacher.cache_hits == module.teacher.cache_misses == 0
    assert len(custom_losses) == 3 and len(next(iter(data.train_dataloader()))) == 2
    assert len(messages) == 1 and "not used, the live teacher runs instead" in messages[0]
    assert "no cacheable crop/flip augmentation" in messages[0]

    # the cache folder given directly, but another teacher checkpoint or another padding: refused, said once
    other_ckpt = _teacher_ckpt(tmp_path / "other.pth", 7)
    for ckpt, kwargs, field in ((other_ckpt, {}, "teacher_sha256"), (teacher_ckpt, {"padding": 2}, "padding")):
        messages.clear()
        module, _, fallback_losses, _ = _run(folder32, ckpt, cache=folder, epochs=1, **kwargs)
        assert module.teacher.cache_hits == module.teacher.cache_misses == 0 and len(fallback_losses) == 3
        assert len(messages) == 1 and "not used" in messages[0] and field in messages[0], messages
        assert module.teacher_cache_note.startswith("teacher cache off")


def test_batches_carry_index_and_view_only_when_asked(folder32):
    data = ImageFolderDataModule(folder32, batch_size=8, num_workers=0)
    data.setup("fit")
    torch.manual_seed(0)
    images, target = next(iter(data.train_dataloader()))
    data.return_views = True
    torch.manual_seed(0)
    images2, target2, index, view = next(iter(data.train_dataloader()))
    assert torch.equal(images, images2) and torch.equal(target, target2)
    assert index.dtype == view.dtype == torch.int64 and int(view.max()) < 162
    # the index and view name the sample: recomputing that view of that image gives the same tensor
    wrapped = IndexedViews(data.train_set, data.train_views)
    every = _with_transform(data.train_set, data.train_views.all_views)
    for k in range(len(index)):
        assert int(target[k]) == wrapped.dataset[int(index[k])][1]
        assert torch.equal(every[int(index[k])][0][int(view[k])], images[k])


def test_two_processes_fill_one_cache(tmp_path, teacher_ckpt, monkeypatch):
    """Two fillers start together on one new cache (one creates the files under the lock; with --recompute both
    write every row, in different orders); every row is then the live teacher's, and a run with that cache never
    computes the teacher (the script's key is the run's)."""
    folder = _folder(tmp_path / "data", 9)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "fill_teacher_cache.py"), "--teacher", "resnet8",
           "--teacher-ckpt", str(teacher_ckpt), "--image-folder", str(folder), "--cache", str(tmp_path / "c"),
           "--threads", "1", "--images-per-batch", "1", "--recompute", "--quiet"]
    procs = [subprocess.Popen([*cmd, "--shuffle-seed", str(s)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "computed 9 images" in out, out
    folders = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]
    assert len(folders) == 1
    cache = TeacherLogitCache.open(folders[0], _only_subdir_key(tmp_path / "c"))
    assert cache.filled_count() == 9 * 162
    data = ImageFolderDataModule(folder, num_workers=0)
    data.setup("fit")
    cached, live, _ = _live_logits_for_filled(cache, data, teacher_ckpt)
    torch.testing.assert_close(cached, live, rtol=2**-11, atol=1e-6)

    messages = []
    monkeypatch.setattr(distillation_module, "rank_zero_info", messages.append)
    monkeypatch.setattr(common_module, "rank_zero_info", messages.append)
    module, _, _, _ = _run(folder, teacher_ckpt, cache=tmp_path / "c", epochs=1)
    assert module.teacher.cache_misses == 0 and module.teacher.cache_hits == 8  # one batch of 8 (drop_last)
