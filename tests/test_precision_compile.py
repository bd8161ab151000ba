"""Performance options of the image-classification modules, in real (tiny) runs on the CPU: a whole training step
without host reads, mixed precision with fp32 losses, channels_last, and compiled students whose checkpoints
load compiled and uncompiled."""

from __future__ import annotations

import contextlib
from pathlib import Path
from unittest import mock

import pytest
import torch
from helpers import tiny_image_folder
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from test_sync_free import no_host_sync

from abkd_vision.data import ImageFolderDataModule
from abkd_vision.heads import DKD, KD, CurriculumTemperature
from abkd_vision.lit import ClassifierModule, DistillationModule
from abkd_vision.losses import AlphaBetaDivergence


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return tiny_image_folder(tmp_path_factory.mktemp("tiny"), 48, 12)


def _datamodule(data: Path) -> ImageFolderDataModule:
    return ImageFolderDataModule(str(data), image_size=16, batch_size=8, num_workers=0)


def _distiller(head=None, **kw) -> DistillationModule:
    module = DistillationModule(student="resnet8", teacher="resnet8", num_classes=3, head=head,
                                evaluate_teacher=False, **kw)
    module.hparams.teacher_ckpt = "given"  # random teacher weights are enough here
    return module


def _trainer(tmp_path, callbacks=(), **kw) -> Trainer:
    kw = {"max_epochs": 1, "limit_train_batches": 4, "limit_val_batches": 1, **kw}
    return Trainer(accelerator="cpu", logger=False, callbacks=list(callbacks), enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=str(tmp_path), **kw)


class _Record(Callback):
    """What the test needs to see inside the run: the returned loss per step, the input layout."""

    def __init__(self):
        self.losses, self.input_channels_last = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.input_channels_last.append(batch[0].is_contiguous(memory_format=torch.channels_last))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach())


# --- a whole training step is free of host reads -----------------------------------------------------------

@pytest.mark.parametrize("head", ["abkd", "abdkd", "ctkd_ls", "ce"])
def test_whole_training_step_reads_nothing_back_from_the_device(tmp_path, tiny_data, head):
    """The step as Lightning runs it (our training_step incl. self.log, backward, the gradient guard before the
    optimiser step, the scheduler-free step) never turns a tensor into a Python value. The guard's periodic
    check (every 50 steps on accelerators, every step on the CPU where it is free) is set beyond the run."""
    if head == "ce":
        module = ClassifierModule("resnet8", num_classes=3)
    elif head == "ctkd_ls":  # a learned temperature (its own parameter, logged per epoch) on standardised logits
        module = _distiller(KD(standardize=True, learned_temperature=CurriculumTemperature()))
    else:
        ab = AlphaBetaDivergence(0.8, 0.3)
        module = _distiller(KD(divergence=ab) if head == "abkd" else DKD(divergence=ab), kd_warmup_epochs=2)
    module.nonfinite_guard.check_every = 10**6
    guarded = []

    def strict(name):
        original = getattr(module, name)

        def run(*args, **kwargs):
            guarded.append(name)
            with no_host_sync():
                return original(*args, **kwargs)
        return run

    with contextlib.ExitStack() as stack:
        for name in ("training_step", "backward", "on_before_optimizer_step"):
            stack.enter_context(mock.patch.object(module, name, strict(name)))
        _trainer(tmp_path, limit_val_batches=0).fit(module, datamodule=_datamodule(tiny_data))
    assert guarded.count("training_step") == 4 and guarded.count("backward") == 4
    assert guarded.count("on_before_optimizer_step") == 4


def test_cache_indices_stay_on_the_host():
    """With the teacher cache on, index and view are not sent to the device (the cache reads them on the host),
    so a warm cache costs no device -> host copy; images and targets move as usual ("meta" stands in for a GPU)."""
    module = _distiller()
    batch = [torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), torch.tensor([5, 7]), torch.tensor([3, 161])]
    module.teacher.cache = object()  # only its presence matters to the transfer
    images, target, index, view = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert images.device.type == "meta" and target.device.type == "meta"
    assert index.device.type == "cpu" and view.device.type == "cpu"
    module.teacher.cache = None
    moved = module.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert all(t.device.type == "meta" for t in moved)


# --- mixed precision ----------------------------------------------------------------------------------------

class _LogitDtype(Callback):
    def on_train_start(self, trainer, module):
        self.dtypes = []
        self.handle = module.student.register_forward_hook(lambda m, i, out: self.dtypes.append(out.dtype))


@pytest.mark.parametrize("precision,low", [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)])
@pytest.mark.parametrize("head", ["abkd", "abdkd"])
def test_mixed_precision_trains_with_fp32_losses(tmp_path, tiny_data, precision, low, head):
    ab = AlphaBetaDivergence(0.8, 0.3)
    module = _distiller(KD(divergence=ab) if head == "abkd" else DKD(divergence=ab))
    before = [p.detach().clone() for p in module.student.parameters()]
    record, dtypes = _Record(), _LogitDtype()
    if precision == "16-mixed":
        # Lightning swaps 16-mixed for bf16-mixed on the CPU; its own fp16 plugin (autocast + gradient scaler,
        # what a GPU run with precision 16-mixed uses) is passed explicitly instead.
        kw = {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}
    else:
        kw = {"precision": precision}
    trainer = _trainer(tmp_path, [record, dtypes], max_epochs=2, **kw)
    trainer.fit(module, datamodule=_datamodule(tiny_data))
    assert dtypes.dtypes and all(d == low for d in dtypes.dtypes), "autocast did not run the student in 16 bits"
    assert all(loss.dtype == torch.float32 for loss in record.losses)
    assert all(torch.isfinite(loss) for loss in record.losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
    assert all(p.dtype == torch.float32 for p in module.student.parameters())  # master weights stay fp32


# --- channels_last ------------------------------------------------------------------------------------------

def test_channels_last_converts_weights_and_batches_and_keeps_the_outputs(tmp_path, tiny_data):
    torch.manual_seed(0)
    plain = _distiller()
    nhwc = _distiller(channels_last=True)
    nhwc.load_state_dict(plain.state_dict())
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    x = torch.randn(4, 3, 16, 16)
    (nhwc_x,) = nhwc.on_after_batch_transfer([x], 0)[:1]
    assert nhwc_x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc.eval()(nhwc_x), plain.eval()(x), atol=1e-5, rtol=1e-5)
    record = _Record()
    _trainer(tmp_path, [record]).fit(nhwc, datamodule=_datamodule(tiny_data))
    assert record.input_channels_last and all(record.input_channels_last)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


# --- compiled students --------------------------------------------------------------------------------------

@pytest.mark.parametrize("module_cls", ["distillation", "classifier"])
def test_compiled_checkpoints_load_compiled_and_uncompiled(tmp_path, tiny_data, module_cls):
    """``compile`` (here with the tracing-only "eager" backend: no C++ compiler needed in the test) trains, and
    its checkpoint has exactly the uncompiled module's keys: it loads strictly into either."""
    torch._dynamo.reset()

    def make(compile):
        if module_cls == "classifier":
            return ClassifierModule("resnet8", num_classes=3, compile=compile)
        return _distiller(compile=compile)

    compiled = make({"backend": "eager"})
    assert compiled.compiled_network is not None
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(tmp_path, [ckpt]).fit(compiled, datamodule=_datamodule(tiny_data))
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["state_dict"]
    plain = make(False)
    assert not any("_orig_mod" in k for k in state)
    expected = {k for k in plain.state_dict() if not k.startswith("teacher.")}
    assert set(state) == expected

    x = torch.randn(4, 3, 16, 16)
    reference = compiled.eval()(x)
    # it pickles (spawned DDP processes, deepcopy) and the copy compiles again on its first call
    import pickle

    torch.testing.assert_close(pickle.loads(pickle.dumps(compiled)).eval()(x), reference)
    for compile in (False, {"backend": "eager"}):
        loaded = type(plain).load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=False,
                                                  compile=compile, **({"teacher_ckpt": None}
                                                                      if module_cls == "distillation" else {}))
        torch.testing.assert_close(loaded.eval()(x), reference)

    # A checkpoint of a network compiled in place elsewhere ("_orig_mod." in its keys) loads too.
    foreign = {"state_dict": {k.replace(f"{compiled.network_attr}.", f"{compiled.network_attr}._orig_mod."): v
                              for k, v in state.items()}}
    fresh = make(False)
    fresh.on_load_checkpoint(foreign)
    fresh.load_state_dict(foreign["state_dict"], strict=True)
    torch.testing.assert_close(fresh.eval()(x), reference)


def test_compile_option_is_checked():
    with pytest.raises(ValueError, match="compile must be true, false or a dict"):
        ClassifierModule("resnet8", num_classes=3, compile="yes")


def test_ce_only_distillation_never_runs_the_teacher_in_training(tmp_path, tiny_data):
    """kd_weight 0 (the CE baseline through the distillation module, as the study runs it) skips the teacher."""
    module = _distiller(kd_weight=0.0)

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher ran in a CE-only step")

    module.teacher.forward = refuse
    record = _Record()
    _trainer(tmp_path, [record], limit_val_batches=0).fit(module, datamodule=_datamodule(tiny_data))
    assert len(record.losses) == 4 and all(torch.isfinite(loss) for loss in record.losses)


def test_learned_temperature_is_trained_with_the_student_and_checkpointed(tmp_path, tiny_data):
    """CTKD's temperature parameter is in the student's optimiser (it moves), follows the curriculum per epoch,
    is logged per epoch, and is saved in (and restored from) the checkpoint."""
    module = _distiller(KD(learned_temperature=CurriculumTemperature(curriculum_epochs=2)))
    raw_before = module.head.learned_temperature.raw.detach().clone()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = _trainer(tmp_path, [checkpoint], max_epochs=2, limit_val_batches=0)
    trainer.fit(module, datamodule=_datamodule(tiny_data))
    raw_after = module.head.learned_temperature.raw.detach()
    assert not torch.equal(raw_before, raw_after)
    assert module.head.learned_temperature.reversal.item() == 1.0  # epoch 1 of a 2-epoch curriculum
    logged = trainer.logged_metrics
    assert logged["train/temperature_lambda"].item() == 1.0
    assert 1.0 < logged["train/temperature"].item() < 21.0
    state = torch.load(checkpoint.last_model_path, weights_only=True)["state_dict"]
    torch.testing.assert_close(state["head.learned_temperature.raw"], raw_after)
    fresh = _distiller(KD(learned_temperature=CurriculumTemperature(curriculum_epochs=2)))
    fresh.load_state_dict(state, strict=False)
    torch.testing.assert_close(fresh.head.learned_temperature.raw.detach(), raw_after)
