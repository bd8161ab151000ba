"""Two views of every training image (MLKD): the data modules' ``strong_view`` option, its seeded reproducibility,
the teacher-logit cache beside it, the fit-start checks, and both distillation modules training on two views."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import fake_cifar100, tiny_image_folder
from lightning.pytorch import Callback, Trainer
from torchvision import transforms as T

from abkd_vision.data import BaseToNewDataModule, CIFAR100DataModule, ImageFolderDataModule
from abkd_vision.data.resumable import SeededViews
from abkd_vision.data.synthetic import write_fake_coop_dataset
from abkd_vision.data.transforms import ToRGB, with_strong_view
from abkd_vision.heads import KD
from abkd_vision.lit import DistillationModule, PromptDistillationModule
from abkd_vision.lit import common as common_module
from abkd_vision.lit import prompt_distillation as prompt_module

QUIET = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
         "num_sanity_val_steps": 0, "limit_val_batches": 0, "accelerator": "cpu"}


class TwoViewKD(KD):
    """A test-local two-view head: KD on the weak view plus KD on the strong view; records what it was given."""

    views = 2

    def __init__(self, temperature: float = 4.0):
        super().__init__(temperature)
        self.calls: list[dict] = []

    def forward(self, student_logits, teacher_logits, target=None, student_strong=None, teacher_strong=None):
        self.calls.append({"student": student_logits.detach(), "teacher": teacher_logits.detach(),
                           "student_strong": student_strong.detach(), "teacher_strong": teacher_strong.detach()})
        return super().forward(student_logits, teacher_logits, target) + super().forward(student_strong,
                                                                                          teacher_strong, target)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_image_folder(tmp_path_factory.mktemp("two_views"), 16, 6, size=16)


def _data(root, **kwargs) -> ImageFolderDataModule:
    data = ImageFolderDataModule(str(root), image_size=16, batch_size=4, eval_batch_size=6, num_workers=0, **kwargs)
    data.setup("fit")
    return data


def _module(head=None, **kwargs) -> DistillationModule:
    torch.manual_seed(0)
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, head=head,
                                evaluate_teacher=False, **kwargs)
    module.hparams.teacher_ckpt = "given"  # random weights; fit only needs a path to be set
    return module


# -- data ---------------------------------------------------------------------------------------------------------
def test_two_view_batches_and_unchanged_evaluation(folder, tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    data = _data(folder, strong_view=True)
    images, target = next(iter(data.train_dataloader()))
    assert isinstance(images, list) and len(images) == 2
    assert all(x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 for x in images) and target.shape == (4,)
    assert not torch.equal(images[0], images[1])
    x, y = next(iter(data.val_dataloader()))
    assert isinstance(x, torch.Tensor) and x.shape == (6, 3, 16, 16)
    assert len(next(iter(_data(folder).train_dataloader()))[0]) == 4  # off by default: one [B, 3, S, S] tensor

    # CIFAR-100: MLKD's strong view, RandomCrop(32, 4) + flip + RandAugment(2, 10) + ToTensor + Normalize
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    cifar = CIFAR100DataModule(str(fake_cifar100(tmp_path)), batch_size=8, num_workers=0, strong_view=True)
    steps = cifar.strong_transform.transforms
    assert [type(t) for t in steps] == [ToRGB, T.Resize, T.RandomCrop, T.RandomHorizontalFlip, T.RandAugment,
                                        T.ToTensor, T.Normalize]
    assert (steps[2].padding, steps[4].num_ops, steps[4].magnitude) == (4, 2, 10)
    assert steps[-1].mean == cifar.train_transform.transforms[-1].mean  # the weak view's statistics
    cifar.setup("fit")
    (weak, strong), target = next(iter(cifar.train_dataloader()))
    assert weak.shape == strong.shape == (8, 3, 32, 32) and target.shape == (8,)
    assert isinstance(next(iter(cifar.val_dataloader()))[0], torch.Tensor)

    # base-to-new: its RandomResizedCrop + flip with RandAugment before ToTensor/Normalize
    b2n = BaseToNewDataModule("EuroSAT", root=str(_coop(tmp_path)), image_size=16, num_workers=0, strong_view=True)
    assert [type(t) for t in b2n.strong_transform.transforms] == [ToRGB, T.RandomResizedCrop,
                                                                  T.RandomHorizontalFlip, T.RandAugment, T.ToTensor,
                                                                  T.Normalize]
    b2n.setup("fit")
    (weak, strong), _ = next(iter(b2n.train_dataloader()))
    assert weak.shape == strong.shape == (8, 3, 16, 16)
    assert all(isinstance(next(iter(loader))[0], torch.Tensor) for loader in b2n.val_dataloader())


def _coop(tmp_path):
    root = tmp_path / "coop"
    if not root.exists():
        write_fake_coop_dataset(root, "EuroSAT", num_classes=4, train_per_class=4, test_per_class=1,
                                val_per_class=1, image_size=16, seed=0)
    return root


def test_weak_view_is_the_one_view_path_and_the_strong_view_is_seeded(folder):
    one, two, again = _data(folder), _data(folder, strong_view=True), _data(folder, strong_view=True)
    # the seeded stream (exact resume): item e * n + i is sample i of epoch e under (seed, e, i)
    plain = SeededViews(one.train_set, seed=7)
    streams = [SeededViews(with_strong_view(d.train_set, d.strong_transform), seed=7) for d in (two, again)]
    n = len(plain)
    for index in (0, 5, n + 5, 3 * n + 2):
        (weak, strong), target = streams[0][index]
        (weak2, strong2), target2 = streams[1][index]  # another dataset object: same (seed, epoch, index)
        assert torch.equal(weak, plain[index][0]) and target == plain[index][1] == target2
        assert torch.equal(weak2, weak) and torch.equal(strong2, strong)
        assert not torch.equal(strong, weak)
    assert not torch.equal(streams[0][5][0][1], streams[0][n + 5][0][1])  # another epoch, another strong view
    assert not torch.equal(streams[0][5][0][1], SeededViews(streams[0].dataset, seed=8)[5][0][1])  # another seed

    # an ordinary shuffled loader: the strong view leaves torch's RNG stream as it was, so the weak views, the
    # order and every later draw are those of the one-view run
    torch.manual_seed(3)
    batches = [b for b in one.train_dataloader()]
    after = torch.rand(1)
    torch.manual_seed(3)
    batches2 = [b for b in two.train_dataloader()]
    assert torch.equal(torch.rand(1), after)
    for (images, target), ((weak, strong), target2) in zip(batches, batches2):
        assert torch.equal(images, weak) and torch.equal(target, target2) and not torch.equal(weak, strong)

    # the data module's resumable loader (ExactResume) replays both views
    for d in (two, again):
        d.exact_resume = True
    torch.manual_seed(11)
    first = next(iter(two.train_dataloader()))
    torch.manual_seed(11)
    second = next(iter(again.train_dataloader()))
    assert all(torch.equal(a, b) for a, b in zip(first[0], second[0])) and torch.equal(first[1], second[1])


def test_cached_views_name_the_weak_view(folder):
    data = _data(folder, strong_view=True)
    torch.manual_seed(0)
    (weak, strong), target = next(iter(data.train_dataloader()))
    data.return_views = True
    torch.manual_seed(0)
    (weak2, strong2), target2, index, view = next(iter(data.train_dataloader()))
    assert torch.equal(weak, weak2) and torch.equal(strong, strong2) and torch.equal(target, target2)
    for k in range(len(index)):  # the view id is the weak view's crop/flip
        image = data.train_set.loader(data.train_set.samples[int(index[k])][0])
        assert torch.equal(data.train_views.all_views(image)[int(view[k])], weak[k])


def test_strong_view_of_a_custom_transform(folder):
    custom = T.Compose([ToRGB(), T.Resize((16, 16)), T.ToTensor()])
    data = _data(folder, strong_view=True, train_transform=custom)
    assert isinstance(data.strong_transform.transforms[2], T.RandAugment)
    with pytest.raises(ValueError, match="pass strong_transform"):
        _data(folder, strong_view=True, train_transform=lambda img: T.functional.to_tensor(img))
    mine = T.Compose([ToRGB(), T.Resize((16, 16)), T.ToTensor()])
    assert _data(folder, strong_view=True, strong_transform=mine).strong_transform is mine


# -- the training modules -----------------------------------------------------------------------------------------
class _Batches(Callback):
    def __init__(self):
        self.shapes, self.losses, self.batches = [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch)
        self.shapes.append([tuple(x.shape) for x in batch[0]] if isinstance(batch[0], list) else batch[0].shape)
        self.losses.append(float(outputs["loss"]))


def test_view_mismatch_is_an_error_at_fit_start(folder):
    trainer = Trainer(max_epochs=1, limit_train_batches=1, **QUIET)
    with pytest.raises(ValueError, match=r"TwoViewKD trains on two views of each image: set "
                                         r"data.init_args.strong_view: true"):
        trainer.fit(_module(TwoViewKD()), datamodule=_data(folder))
    trainer = Trainer(max_epochs=1, limit_train_batches=1, **QUIET)
    with pytest.raises(ValueError, match=r"the head KD trains on one view .*strong_view: false"):
        trainer.fit(_module(KD()), datamodule=_data(folder, strong_view=True))
    # without a data module the first step says the same
    trainer = Trainer(max_epochs=1, limit_train_batches=1, **QUIET)
    with pytest.raises(ValueError, match="strong_view: true"):
        trainer.fit(_module(TwoViewKD()), train_dataloaders=_data(folder).train_dataloader())


def test_two_view_distillation_fit(folder):
    head = TwoViewKD()
    module = _module(head, channels_last=True)
    seen = _Batches()
    trainer = Trainer(max_epochs=1, limit_train_batches=2, callbacks=[seen], **QUIET)
    trainer.fit(module, datamodule=_data(folder, strong_view=True))
    assert seen.shapes == [[(4, 3, 16, 16), (4, 3, 16, 16)]] * 2 and len(head.calls) == 2
    (weak, strong), target = seen.batches[-1]
    assert weak.is_contiguous(memory_format=torch.channels_last)  # both views moved as channels_last
    assert strong.is_contiguous(memory_format=torch.channels_last)
    call = head.calls[-1]
    assert not torch.equal(call["student"], call["student_strong"])
    # the teacher scored each view; the loss is CE on both views plus the head on both
    with torch.no_grad():
        torch.testing.assert_close(call["teacher"], module.teacher(weak))
        torch.testing.assert_close(call["teacher_strong"], module.teacher(strong))
    ce = sum(torch.nn.functional.cross_entropy(call[k], target) for k in ("student", "student_strong"))
    kd = KD.forward(head, call["student"], call["teacher"], target) + KD.forward(
        head, call["student_strong"], call["teacher_strong"], target)
    assert seen.losses[-1] == pytest.approx(float(ce + kd), rel=1e-5)

    # the CE-only baseline (kd_weight 0) on two views: no teacher, CE on both views
    baseline = _module(TwoViewKD(), kd_weight=0.0)
    trainer = Trainer(max_epochs=1, limit_train_batches=1, **QUIET)
    trainer.fit(baseline, datamodule=_data(folder, strong_view=True))
    assert not baseline.head.calls and trainer.global_step == 1


def test_teacher_cache_serves_the_weak_view_and_the_strong_view_runs_live(folder, tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(common_module, "rank_zero_info", messages.append)

    def run():
        module = _module(TwoViewKD(), teacher_cache=str(tmp_path / "cache"))
        sizes = []
        module.teacher.model.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
        trainer = Trainer(max_epochs=1, limit_train_batches=2, **QUIET)
        trainer.fit(module, datamodule=_data(folder, strong_view=True))
        return module, trainer, sizes

    module, trainer, sizes = run()
    assert module.teacher.cache_misses == 8 and sizes == [4, 4, 4, 4]  # weak (missed, computed) and strong, per step
    module, trainer, sizes = run()
    assert module.teacher.cache_hits == 8 and module.teacher.cache_misses == 0
    assert float(trainer.callback_metrics["train/teacher_cache_hit_rate_epoch"]) == 1.0
    assert sizes == [4, 4]  # the weak view came from the cache; the strong view ran live
    notes = [m for m in messages if "not cacheable" in m]
    assert len(notes) == 2 and notes[0] == ("TwoViewKD's strong view (RandAugment) is not cacheable: the teacher runs "
                                            "live on it; the weak view uses the cache")  # once per run


def _has_mlkd() -> bool:
    try:
        from abkd_vision.heads import MLKD  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _has_mlkd(), reason="abkd_vision.heads.MLKD not there yet")
def test_mlkd_with_learned_temperature_fits_logs_and_resumes(folder, tmp_path):
    from abkd_vision.heads import MLKD, CurriculumTemperature
    from abkd_vision.heads.temperature import curriculum_lambda

    def head():
        return MLKD(learned_temperature=CurriculumTemperature(curriculum_epochs=4))

    module = _module(head())
    trainer = Trainer(max_epochs=1, limit_train_batches=2, **QUIET)
    trainer.fit(module, datamodule=_data(folder, strong_view=True))
    metrics = trainer.callback_metrics
    assert 1 < float(metrics["train/temperature"]) < 21
    assert float(metrics["train/temperature_lambda"]) == pytest.approx(curriculum_lambda(0, 0.0, 1.0, 4))
    raw = module.head.learned_temperature.raw.detach().clone()
    assert raw != 1.0  # trained with the student (the optimiser has it)
    ckpt = tmp_path / "mlkd.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(state["head.learned_temperature.raw"], raw) and not any(k.startswith("teacher.")
                                                                                for k in state)
    # resume for a second epoch: the temperature comes back from the checkpoint, the curriculum follows the epoch
    resumed = _module(head())
    trainer = Trainer(max_epochs=2, limit_train_batches=2, **QUIET)
    trainer.fit(resumed, datamodule=_data(folder, strong_view=True), ckpt_path=ckpt)
    assert float(trainer.callback_metrics["train/temperature_lambda"]) == pytest.approx(
        curriculum_lambda(1, 0.0, 1.0, 4))
    assert trainer.global_step == 4 and resumed.head.learned_temperature.raw != raw


class LabelledTwoViewKD(TwoViewKD):
    uses_labels = True


def test_prompt_distillation_trains_on_two_views(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(common_module, "rank_zero_info", messages.append)
    monkeypatch.setattr(prompt_module, "rank_zero_info", messages.append)
    head = LabelledTwoViewKD(temperature=1.0)
    torch.manual_seed(0)
    module = PromptDistillationModule(student_arch="abkd-tiny-vit-quickgelu", student_pretrained=None,
                                      student_vision_depth=1, teacher_arch="abkd-tiny-vit-quickgelu",
                                      teacher_pretrained=None, teacher_text_depth=1, teacher_vision_depth=1,
                                      head=head, evaluate_teacher=False,
                                      teacher_logit_cache=str(tmp_path / "cache"))
    module.hparams.teacher_ckpt = "given"  # random prompts; fit only needs a path to be set
    data = BaseToNewDataModule("EuroSAT", root=str(_coop(tmp_path)), image_size=32, batch_size=4, num_workers=0,
                               strong_view=True)
    seen = _Batches()
    trainer = Trainer(max_epochs=1, limit_train_batches=2, callbacks=[seen], **QUIET)
    trainer.fit(module, datamodule=data)
    assert seen.shapes == [[(4, 3, 32, 32), (4, 3, 32, 32)]] * 2 and len(head.calls) == 2
    call = head.calls[-1]
    assert not torch.equal(call["student"], call["student_strong"]) and not torch.equal(call["teacher"],
                                                                                       call["teacher_strong"])
    assert float(trainer.callback_metrics["train/teacher_cache_hit_rate_epoch"]) == 0.0  # weak views: cache path
    assert sum("not cacheable" in m for m in messages) == 1
    assert sum(m.startswith("LabelledTwoViewKD needs labels: it uses the ground-truth labels") for m in messages) == 1
    # a one-view head with strong-view data: refused at fit start
    module.head = KD(temperature=1.0)
    with pytest.raises(ValueError, match="the head KD trains on one view"):
        Trainer(max_epochs=1, limit_train_batches=1, **QUIET).fit(module, datamodule=data)
    if _has_mlkd():  # a learned temperature is trained and checkpointed with the prompts
        from abkd_vision.heads import CurriculumTemperature

        module.head = KD(temperature=1.0, learned_temperature=CurriculumTemperature())
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        assert "head.learned_temperature.raw" in checkpoint["state_dict"]
        groups = module.configure_optimizers()["optimizer"].param_groups
        optimised = {id(p) for group in groups for p in group["params"]}
        assert id(module.head.learned_temperature.raw) in optimised
