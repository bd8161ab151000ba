"""ClassifierModule: train one network with cross-entropy (teachers and from-scratch baselines).

It also holds what every image-classification task here shares: the CIFAR SGD recipe, top-1/top-5
accuracy (micro average, as the KD literature reports), best- and last-epoch tracking, a guard
against non-finite losses, and a ``results.json`` summary in the run directory.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from abkd_vision.data.device import IndexBatch
from abkd_vision.lit.common import GuardedTraining, write_results
from abkd_vision.models import create_model

# The modules move batches themselves (channels_last inputs; teacher-cache indices kept on the host) while the data
# modules only build loaders: Lightning's notice that the module's hook is the one used is expected here.
warnings.filterwarnings("ignore", message=r"You have overridden `(transfer_batch_to_device|on_after_batch_transfer)` "
                                          r"in `LightningModule` but have passed in a `LightningDataModule`")

# The reference CIFAR recipe (CRD/RepDistiller, mdistiller) uses lr 0.01 for these light networks.
_LOW_LR_FAMILIES = ("mobilenet", "shuffle")


def default_lr(model_name: str) -> float:
    """0.05, or 0.01 for MobileNet/ShuffleNet, as in the reference CIFAR-100 recipe."""
    return 0.01 if any(f in model_name.lower() for f in _LOW_LR_FAMILIES) else 0.05


def accuracy_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 (and top-5 when there are at least 5 classes) accuracy in percent-free [0, 1], micro average."""
    metrics = {"acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro")}
    if num_classes >= 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
    return MetricCollection(metrics, prefix=prefix)


def compile_network(network: nn.Module, options: bool | dict | None) -> CompiledNetwork | None:
    """A :class:`CompiledNetwork` for ``torch.compile(network, **options)`` (``True``: default options;
    ``False``/``None``: None, no compilation)."""
    if options is None or options is False:
        return None
    if options is True:
        options = {}
    if not isinstance(options, dict):
        raise ValueError(f"compile must be true, false or a dict of torch.compile options, got {options!r}")
    return CompiledNetwork(network, options)


class CompiledNetwork:
    """``torch.compile(network, **options)``, kept outside the LightningModule's module tree: it shares the
    network's parameters but adds no state-dict keys, so checkpoints are the same compiled or not and load either
    way. Compiled on the first call (after Lightning moved the network to its device); not pickled (spawned DDP
    processes compile their own)."""

    def __init__(self, network: nn.Module, options: dict):
        self.network, self.options = network, dict(options)
        self._compiled = None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = torch.compile(self.network, **self.options)
        return self._compiled(*args, **kwargs)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compiled": None}


def mean_entropy(logits: Tensor) -> Tensor:
    """Mean Shannon entropy (nats) of softmax(logits) over the batch: [B, C] -> scalar."""
    log_q = logits.float().log_softmax(dim=-1)
    return -(log_q.exp() * log_q).sum(dim=-1).mean()


class ImageClassificationTask(GuardedTraining, LightningModule):
    """What the image-classification modules share; subclasses build the network(s).

    Subclasses call ``save_hyperparameters()`` (which must include lr, momentum, weight_decay, nesterov,
    lr_milestones, lr_decay, label_smoothing), create their network under ``network_attr`` and then call
    ``init_task``.
    """

    network_attr = "model"  # attribute holding the trained network (its checkpoint key prefix)

    def init_task(self, network_name: str, num_classes: int, lr: float | None, nonfinite: str = "raise",
                  max_skipped_steps: int = 100, channels_last: bool = False,
                  compile: bool | dict | None = False) -> None:
        self.init_guard(nonfinite, max_skipped_steps)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            # NHWC weights and inputs: faster convolutions with cuDNN / oneDNN, especially under mixed precision.
            self.to(memory_format=torch.channels_last)
        self.compiled_network = compile_network(self.network, compile)
        self.num_classes = num_classes
        self.lr = float(lr) if lr is not None else default_lr(network_name)
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"lr must be a positive number, got {lr}")
        self.val_metrics = accuracy_metrics(num_classes, "val/")
        self.test_metrics = accuracy_metrics(num_classes, "test/")
        # Best/last-epoch tracking lives in the state dict, so a resumed run keeps it.
        self.val_acc1_best = MaxMetric()
        self.val_acc1_best.persistent(True)
        # [best epoch, last acc1, last acc5], -1 = none yet
        self.register_buffer("tracked_epochs", torch.tensor([-1.0, -1.0, -1.0]))
        # The test after a fit whose val split is held out (abkd_vision.protocol.final_test): which weights are
        # tested ("last", "best_val"), their test metrics, and the fit's summary they are written beside.
        self.test_tag: str | None = None
        self.test_results: dict[str, dict[str, float]] = {}
        self.fit_summary: dict | None = None

    @property
    def network(self) -> nn.Module:
        """The network being trained (``model`` here, ``student`` in ``DistillationModule``)."""
        return getattr(self, self.network_attr)

    def forward(self, images: Tensor) -> Tensor:
        """Logits [B, C] of the trained network (compiled when ``compile`` is set)."""
        return self.compiled_network(images) if self.compiled_network is not None else self.network(images)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if isinstance(batch, IndexBatch):  # data.on_device: the images are made here, on the batch's device
            batch = self.materialise_batch(batch)
        if not (self.channels_last and isinstance(batch, (list, tuple)) and batch):
            return batch
        images = batch[0]  # a tensor, or [weak, strong] of two-view training data

        def nhwc(x):
            return x.contiguous(memory_format=torch.channels_last) if isinstance(x, Tensor) and x.dim() == 4 else x

        images = [nhwc(x) for x in images] if isinstance(images, (list, tuple)) else nhwc(images)
        return [images, *batch[1:]]

    def materialise_batch(self, batch: IndexBatch) -> list:
        """``[images, target, ...]`` of an index batch (``data.init_args.on_device``), made on its device in this
        module's memory format and the trainer's input dtype (what the precision plugin makes of host images)."""
        batch = batch.materialise(channels_last=self.channels_last)
        trainer = self._trainer
        if trainer is not None:
            batch[0] = trainer.precision_plugin.convert_input(batch[0])
        return batch

    def _update(self, metrics: MetricCollection, batch) -> None:
        images, target = batch
        metrics.update(self(images), target)

    def _flush(self, metrics: MetricCollection, prog_bar: bool) -> dict[str, Tensor]:
        values = metrics.compute()  # torchmetrics syncs across processes: every rank holds the same value
        metrics.reset()
        self.log_dict(values, prog_bar=prog_bar, sync_dist=True)
        return values

    def validation_step(self, batch, batch_idx: int) -> None:
        self._update(self.val_metrics, batch)

    def on_validation_epoch_end(self) -> None:
        values = self._flush(self.val_metrics, prog_bar=True)
        if self.trainer.sanity_checking:
            return
        acc1 = values["val/acc1"]
        if self._best_epoch < 0 or acc1 > self.val_acc1_best.compute():
            self.tracked_epochs[0] = self.current_epoch
        self.val_acc1_best.update(acc1)
        self.log("val/acc1_best", self.val_acc1_best.compute(), prog_bar=True, sync_dist=True)
        self.tracked_epochs[1] = float(values["val/acc1"])
        self.tracked_epochs[2] = float(values["val/acc5"]) if "val/acc5" in values else -1.0

    @property
    def _best_epoch(self) -> int:
        return int(self.tracked_epochs[0])

    @property
    def _last_val(self) -> dict[str, float]:
        acc1, acc5 = (float(v) for v in self.tracked_epochs[1:])
        return {k: v for k, v in (("val/acc1", acc1), ("val/acc5", acc5)) if v >= 0}

    def test_step(self, batch, batch_idx: int) -> None:
        self._update(self.test_metrics, batch)

    def on_test_epoch_end(self) -> None:
        values = self._flush(self.test_metrics, prog_bar=False)
        if self.test_tag is not None:
            self.test_results[self.test_tag] = {k.split("/", 1)[-1]: float(v) for k, v in values.items()}

    def on_test_end(self) -> None:
        if self.test_tag is not None and self.fit_summary is not None:  # the test after a fit (final_test)
            write_results(self, {**self.fit_summary, "test": dict(self.test_results)})

    # -- optimisation ------------------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # a frozen teacher is never optimised
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.hparams.momentum,
                                    weight_decay=self.hparams.weight_decay, nesterov=self.hparams.nesterov)
        milestones = self.hparams.lr_milestones if self.hparams.lr_milestones is not None else [150, 180, 210]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones),
                                                         gamma=self.hparams.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -- checkpoints ---------------------------------------------------------------------------------------
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Our own compiled runs save plain keys (the compiled wrapper is not a submodule); a checkpoint of a
        # network that was compiled in place by other code has "_orig_mod." in its keys: drop it.
        state = checkpoint.get("state_dict")
        if state and any("_orig_mod." in k for k in state):
            checkpoint["state_dict"] = {k.replace("_orig_mod.", ""): v for k, v in state.items()}

    # -- checks and summaries ----------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        self.check_data_classes()

    def check_data_classes(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes but the model was built for {self.num_classes}; "
                "set model.init_args.num_classes to match (the CLI links it to data.num_classes)"
            )

    def summary(self) -> dict:
        """What a results table needs: best/last validation accuracy and the epoch of the best."""
        best = self.val_acc1_best.compute()
        return {
            "val_acc1_best": float(best) if self._best_epoch >= 0 else None,
            "best_epoch": self._best_epoch if self._best_epoch >= 0 else None,
            "val_acc1_last": self._last_val.get("val/acc1"),
            "val_acc5_last": self._last_val.get("val/acc5"),
            "epochs": self.trainer.current_epoch if self._trainer is not None else None,
        }

    def on_fit_end(self) -> None:
        self.fit_summary = self.summary()
        write_results(self, self.fit_summary)


class ClassifierModule(ImageClassificationTask):
    """Cross-entropy training of one network created by name (``abkd_vision.models.create_model``).

    Args:
        model: registered or published model name, e.g. ``cifar_resnet32x4`` or ``resnet32x4``.
        num_classes: output classes; the CLI links it to ``data.num_classes``.
        model_kwargs: extra keyword arguments for the model constructor.
        lr: initial SGD learning rate; None picks 0.05 (0.01 for MobileNet/ShuffleNet).
        momentum, weight_decay, nesterov: SGD settings (reference: 0.9, 5e-4, False).
        lr_milestones: epochs at which the lr is multiplied by ``lr_decay`` (reference: 150, 180, 210; 0.1).
        label_smoothing: for the cross-entropy term.
        nonfinite, max_skipped_steps: what a NaN/inf loss does: "raise" (stop, saving a checkpoint to resume
            from) or "skip" the step, at most ``max_skipped_steps`` times (see ``GuardedTraining``).
        channels_last: keep weights and input batches in NHWC memory format (faster convolutions on GPUs,
            notably with ``trainer.precision`` 16-mixed / bf16-mixed).
        compile: ``torch.compile`` the network: true, or a dict of its options (``{mode: max-autotune}``,
            ``{backend: aot_eager}``). Checkpoints have the same keys either way and load compiled or not.
    """

    network_attr = "model"

    def __init__(self, model: str = "cifar_resnet32x4", num_classes: int = 100, model_kwargs: dict | None = None,
                 lr: float | None = None, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False,
                 lr_milestones: list[int] | None = None, lr_decay: float = 0.1, label_smoothing: float = 0.0,
                 nonfinite: str = "raise", max_skipped_steps: int = 100, channels_last: bool = False,
                 compile: bool | dict = False):
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(model, num_classes=num_classes, **(model_kwargs or {}))
        self.init_task(model, num_classes, lr, nonfinite, max_skipped_steps, channels_last, compile)

    def training_step(self, batch, batch_idx: int) -> Tensor:
        images, target = batch
        logits = self(images)
        # fp32 loss under mixed precision (autocast leaves the logits in bf16/fp16)
        ce = F.cross_entropy(logits.float(), target, label_smoothing=self.hparams.label_smoothing)
        self.log_dict({"train/loss": ce, "train/ce": ce}, on_step=True, on_epoch=True, prog_bar=True)
        return self.guard_loss(ce, ce=ce)
