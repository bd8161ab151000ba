"""Device-resident data (``on_device``): the drawn views against torchvision's, batches and short runs bit-identical
to the host path's seeded stream, the teacher cache's view ids, exact resume, DDP shards, ``fast.yaml`` with every
CIFAR method config, and the bad inputs. Tiny data and networks throughout (CPU)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from helpers import fake_cifar100, parse_only_cli, tiny_image_folder
from lightning.pytorch import Callback, Trainer, seed_everything
from torchvision import transforms as T

from abkd_vision.cli import ExactResume
from abkd_vision.data import CIFAR100DataModule, ImageFolderDataModule
from abkd_vision.data import device as device_module
from abkd_vision.data.device import DeviceImages, DeviceMemoryError, IndexBatch, TrainIndexStream
from abkd_vision.data.resumable import SeededViews, sample_seed
from abkd_vision.data.transforms import CropFlipViews
from abkd_vision.durable import ResumeCheckpoint
from abkd_vision.lit import ClassifierModule, DistillationModule
from abkd_vision.lit import distillation as distillation_module

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "cifar100"
QUIET = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
         "enable_model_summary": False, "num_sanity_val_steps": 0, "deterministic": True}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("device_folder"), 16, 6, size=12)


@pytest.fixture
def cifar(tmp_path, monkeypatch) -> Path:
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return fake_cifar100(tmp_path, 24, 10)


def _folder_data(root: Path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"image_size": 16, "batch_size": 4, "eval_batch_size": 4, "num_workers": 0, **kwargs}
    return ImageFolderDataModule(str(root), **kwargs)


def _same(host_batch, device_batch: IndexBatch, channels_last: bool = False) -> None:
    made = device_batch.to("cpu").materialise(channels_last)
    assert len(made) == len(host_batch)
    for a, b in zip(host_batch, made):
        assert torch.equal(a, b)


# -- the drawn views ------------------------------------------------------------------------------------------------
def test_drawn_views_are_torchvisions_uniform_162_and_the_host_streams():
    views = CropFlipViews(32)
    n = 3240  # 20 draws per view and epoch; 5 epochs: 100 per view
    images = DeviceImages(torch.zeros(n, 3, 40, 40, dtype=torch.uint8), torch.zeros(n, dtype=torch.int64), 32,
                          views.mean, views.std, padding=4, hflip=True)
    stream = TrainIndexStream(images, views, seed=123, with_ids=True)
    before = torch.get_rng_state()
    batches = [stream.batch(list(range(e * n, (e + 1) * n))) for e in range(5)]
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is left as it was
    view = torch.cat([b.view for b in batches])
    counts = torch.bincount(view, minlength=162)
    assert counts.numel() == 162 and int(counts.min()) > 0  # all 81 offsets x 2 flips appear
    expected = view.numel() / 162
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    k = 161  # Wilson-Hilferty: the 0.1 % upper quantile of chi-square with 161 degrees of freedom (about 216)
    assert chi2 < k * (1 - 2 / (9 * k) + 3.09 * math.sqrt(2 / (9 * k))) ** 3, chi2
    dy, dx, flip = (torch.cat([b.packed[j] for b in batches]) for j in (1, 2, 3))
    assert {int(v) for v in dy} == set(range(9)) == {int(v) for v in dx} and abs(float(flip.float().mean()) - .5) < .02
    assert torch.equal(view, (dy * 9 + dx) * 2 + flip)  # CropFlipViews.view_id

    # the same numbers as torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip under the host path's
    # seeding (SeededViews): a one-pixel dataset whose view id reveals the draw
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            crop = T.RandomCrop.get_params(torch.zeros(1, 40, 40), (32, 32))[:2]
            return crop, bool(torch.rand(1) < 0.5)

    host = SeededViews(Draws(), seed=123)
    for k in (0, 1, 17, n - 1, n + 5, 4 * n + 99):
        (y, x), f = host[k]
        b, j = divmod(k, n)
        assert batches[b].packed[1:, j].tolist() == [y, x, int(f)]

    # draw_seeded (the stream's batched form) is draw() under each seed, for every padding/flip setting
    for padding, hflip in ((4, True), (2, False), (0, True)):
        views = CropFlipViews(32, padding=padding, hflip=hflip)
        seeds = [sample_seed(123, e, i) for e in range(3) for i in range(40)]
        one_by_one = []
        for seed in seeds:
            torch.manual_seed(seed)
            one_by_one.append(views.draw())
        torch.manual_seed(0)
        state = torch.get_rng_state()
        assert views.draw_seeded(seeds) == one_by_one and torch.equal(torch.get_rng_state(), state)


# -- host path vs device path ------------------------------------------------------------------------------------------
def test_device_batches_equal_the_host_paths(cifar, folder):
    torch.manual_seed(5)  # the stream's seed (torch.initial_seed), as seed_everything sets it
    for views in (False, True):
        host = CIFAR100DataModule(str(cifar), batch_size=8, eval_batch_size=4, num_workers=0)
        dev = CIFAR100DataModule(str(cifar), batch_size=8, eval_batch_size=4, num_workers=0, on_device=True)
        host.exact_resume = True  # run.py's host path: the seeded stream
        host.return_views = dev.return_views = views  # (images, target, index, view) for the teacher cache
        host.setup("fit")
        dev.setup("fit")
        pairs = list(zip(host.train_dataloader(), dev.train_dataloader(), strict=True))
        assert len(pairs) == 3 and all(isinstance(d, IndexBatch) for _, d in pairs)
        for h, d in pairs:
            _same(h, d)
        for h, d in zip(host.val_dataloader(), dev.val_dataloader(), strict=True):
            _same(h, d)
    # an image folder: resized 12 -> 16 at decode time (as the host path's Resize), other padding, channels_last
    for kwargs in ({}, {"padding": 2, "hflip": False}):
        host, dev = _folder_data(folder, **kwargs), _folder_data(folder, on_device=True, **kwargs)
        host.exact_resume = True
        host.setup("fit")
        dev.setup("fit")
        for h, d in zip(host.train_dataloader(), dev.train_dataloader(), strict=True):
            _same(h, d)
            made = d.materialise(channels_last=True)[0]
            assert made.is_contiguous(memory_format=torch.channels_last) and torch.equal(made, h[0])
        for h, d in zip(host.test_dataloader(), dev.test_dataloader(), strict=True):
            _same(h, d)


class _Seen(Callback):
    """Records what the training steps saw."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append([t.clone() for t in batch])


def _fit(module, data, callbacks=(), **trainer_kwargs):
    trainer = Trainer(**{**QUIET, "max_steps": 3, "limit_val_batches": 1, **trainer_kwargs},
                      callbacks=[ExactResume(), *callbacks])
    trainer.fit(module, datamodule=data)
    return trainer


def test_host_and_device_runs_see_the_same_batches_and_views_and_end_equal(folder, tmp_path, monkeypatch):
    seen_views = {}

    def recording(self, images, index, view):
        seen_views.setdefault(key, []).append((index.tolist(), view.tolist()))
        return original(self, images, index, view)

    original = distillation_module.FrozenTeacher.cached_forward
    monkeypatch.setattr(distillation_module.FrozenTeacher, "cached_forward", recording)
    states, batches, teacher_acc = {}, {}, {}
    for key in ("host", "device"):
        seed_everything(3)
        module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, evaluate_teacher=True,
                                    teacher_cache=str(tmp_path / "cache"), lr=0.05)
        module.hparams.teacher_ckpt = "given"  # random teacher weights; fit only needs a path to be set
        seen = _Seen()
        _fit(module, _folder_data(folder, on_device=key == "device"), [seen])
        assert module.teacher.cache is None and module.teacher.cache_hits + module.teacher.cache_misses == 12
        states[key], batches[key], teacher_acc[key] = module.student.state_dict(), seen.batches, module.teacher_val_acc1
    assert seen_views["host"] == seen_views["device"] and len(seen_views["host"]) == 3
    assert teacher_acc["host"] == teacher_acc["device"] is not None  # evaluate_teacher reads the index batches too
    for a, b in zip(batches["host"], batches["device"], strict=True):
        assert len(a) == len(b) == 4 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(states["host"][k], states["device"][k]) for k in states["host"])

    # the classifier, in channels_last: same weights; Lightning's limit_train_batches still applies
    for key in ("host", "device"):
        seed_everything(4)
        module = ClassifierModule(model="resnet8", num_classes=3, channels_last=True)
        trainer = _fit(module, _folder_data(folder, on_device=key == "device"), max_steps=-1, max_epochs=2,
                       limit_train_batches=2)
        assert trainer.global_step == 4
        states[key] = module.model.state_dict()
    assert all(torch.equal(states["host"][k], states["device"][k]) for k in states["host"])


class _Crash(Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.at_step:
            raise RuntimeError("crash")


def test_device_path_resumes_exactly_mid_epoch(folder, tmp_path):
    """A run that crashes mid-epoch 1 (after the periodic last.ckpt of step 6) and resumes from it ends with the
    weights of the uninterrupted run."""

    def run(name: str, crash: int | None = None, ckpt: Path | None = None):
        seed_everything(7)
        module = ClassifierModule(model="resnet8", num_classes=3, lr=0.05)
        callbacks = [ResumeCheckpoint(every_n_train_steps=2, dirpath=str(tmp_path / name))]
        if crash is not None:
            callbacks.append(_Crash(crash))
        trainer = Trainer(**{**QUIET, "max_epochs": 2, "limit_val_batches": 0, "enable_checkpointing": True},
                          callbacks=[ExactResume(), *callbacks])
        trainer.fit(module, datamodule=_folder_data(folder, on_device=True), ckpt_path=ckpt)
        return module

    full = run("full")
    with pytest.raises(RuntimeError, match="crash"):
        run("crashed", crash=7)
    last = tmp_path / "crashed" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6  # mid-epoch 1 (4 a epoch)
    resumed = run("crashed", ckpt=last)
    a, b = full.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ddp_shards_cover_every_sample_once_and_match_the_host_shards(folder):
    n = 16
    for epoch in (0, 3):
        seen = []
        for rank in range(2):
            progress = SimpleNamespace(current=SimpleNamespace(completed=0))
            trainer = SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0, current_epoch=epoch,
                                      strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                      fit_loop=SimpleNamespace(restarting=False,
                                                               epoch_loop=SimpleNamespace(batch_progress=progress)))
            host, dev = (_folder_data(folder, batch_size=2, check_images="off", on_device=on) for on in (False, True))
            host.exact_resume = True
            for d in (host, dev):
                d.trainer = trainer
                d.setup("fit")
            torch.manual_seed(11)
            pairs = list(zip(host.train_dataloader(), dev.train_dataloader(), strict=True))
            assert len(pairs) == n // 2 // 2
            for h, d in pairs:
                _same(h, d)
                seen += d.index.tolist()
        assert sorted(seen) == list(range(n))  # each sample once per epoch, across the two ranks


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out |= _keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return out


def test_fast_overlay_composes_with_every_cifar_method_config(capsys):
    """``--print_config`` (in-process, the run.py parser) of base + one config of every method + fast.yaml; every
    other config of those methods sets none of fast.yaml's keys and trains a DistillationModule, so it composes alike
    (test_configs.py parses each of them with base.yaml)."""
    fast = CONFIGS / "fast.yaml"
    overlay = yaml.safe_load(fast.read_text())
    methods = sorted(p for p in CONFIGS.iterdir() if p.is_dir() and p.name != "teachers")
    files = sorted(f for m in methods for f in m.glob("*.yaml"))
    assert len(methods) >= 18 and len(files) > 100
    for path in files:
        cfg = yaml.safe_load(path.read_text())
        assert not _keys(cfg) & _keys(overlay), path
        assert cfg["model"]["class_path"].endswith("DistillationModule"), path
    cli = parse_only_cli(CONFIGS / "base.yaml", files[0])
    capsys.readouterr()
    for method in methods:
        path = sorted(method.glob("*.yaml"))[0]
        with pytest.raises(SystemExit) as done:
            cli.parser.parse_args(["--config", str(CONFIGS / "base.yaml"), "--config", str(path), "--config", str(fast),
                                   "--print_config"])
        assert done.value.code in (0, None), path
        printed = yaml.safe_load(capsys.readouterr().out)
        init = printed["model"]["init_args"]
        assert printed["data"]["init_args"]["on_device"] is True and printed["trainer"]["precision"] == "bf16-mixed"
        assert init["channels_last"] is True and init["compile"] is True, path
        assert init["teacher_cache"] == overlay["model"]["init_args"]["teacher_cache"], path
        assert init["head"]["class_path"] == yaml.safe_load(path.read_text())["model"]["init_args"]["head"][
            "class_path"], path  # the method's head survives the overlay
        assert printed["data"]["init_args"]["strong_view"] is ("mlkd" in method.name), path


# -- bad input --------------------------------------------------------------------------------------------------------
def test_a_split_too_large_for_the_device_is_an_error_before_training(folder, monkeypatch):
    monkeypatch.setattr(device_module, "free_memory", lambda device: 5000)
    data = _folder_data(folder, on_device=True)
    data.setup("fit")
    with pytest.raises(DeviceMemoryError, match=r"the train split \(16 images.*needs .* on cpu, but it has "
                                                r"0\.0 MiB available RAM.*on_device: false"):
        data.train_dataloader()


def test_augmentations_the_device_path_does_not_implement_are_errors(folder, cifar):
    custom = T.Compose([T.Resize((16, 16)), T.ToTensor()])
    with pytest.raises(ValueError, match="on_device: true does not implement a custom train_transform"):
        _folder_data(folder, on_device=True, train_transform=custom)
    with pytest.raises(ValueError, match="does not implement a custom eval_transform"):
        _folder_data(folder, on_device=True, eval_transform=custom)
    with pytest.raises(ValueError, match=r"does not implement strong_view: true \(RandAugment\).*on_device: false"):
        CIFAR100DataModule(str(cifar), on_device=True, strong_view=True)
