"""LightningModules: one per task shape, with heads and models injected by configuration."""

from abkd_vision.lit.base_to_new import BaseToNewTask
from abkd_vision.lit.classifier import ClassifierModule, ImageClassificationTask
from abkd_vision.lit.distillation import DistillationModule, FrozenTeacher
from abkd_vision.lit.prompt_distillation import FrozenCLIPTeacher, PromptDistillationModule
from abkd_vision.lit.prompt_tuning import PromptTuningModule

__all__ = [
    "BaseToNewTask",
    "ClassifierModule",
    "DistillationModule",
    "FrozenCLIPTeacher",
    "FrozenTeacher",
    "ImageClassificationTask",
    "PromptDistillationModule",
    "PromptTuningModule",
]
