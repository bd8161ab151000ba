"""LightningModules: one per task shape, with heads and models injected by configuration."""

from abkd_vision.lit.classifier import ClassifierModule, ImageClassificationTask
from abkd_vision.lit.distillation import DistillationModule, FrozenTeacher

__all__ = ["ClassifierModule", "DistillationModule", "FrozenTeacher", "ImageClassificationTask"]
