"""``CLIPImageClassifier``: the deployable CLIP classifier, an image tower with the class vectors baked in.

``logits = logit_scale * cos(projector(visual(images)), text_features)``: the prompted image tower of a student
(:class:`~abkd_vision.models.clip.PromptedImageStudent`, with its projector) or of a prompt-tuned CLIP (no
projector), with the teacher's L2-normalised prompted text features of the chosen classes ``[C, D]`` and the
(exponentiated) logit scale as buffers. It needs no text tower and no teacher: ``run.py export`` writes its plain
state dict (``model.pt``) and ONNX; :func:`load_clip_classifier` rebuilds it from an export folder.

Shapes: ``images [B, 3, S, S]`` in CLIP's normalisation -> ``logits [B, C]``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_vision.models.checkpoint import CheckpointError, mismatch_message
from abkd_vision.models.clip.builder import build_clip, register_clip_config, resolve_arch
from abkd_vision.models.clip.prompts import AppendVisionPrompts, DeepPromptBlock, add_vision_prompts

__all__ = ["CLIPImageClassifier", "load_clip_classifier"]

log = logging.getLogger(__name__)


def _projector(dim: int, teacher_dim: int) -> nn.Sequential:
    """The student's projector layout (see :class:`~abkd_vision.models.clip.PromptedImageStudent`)."""
    return nn.Sequential(nn.Linear(dim, teacher_dim), nn.BatchNorm1d(teacher_dim), nn.ReLU(inplace=True),
                         nn.Linear(teacher_dim, teacher_dim))


def _vision_prompt_layout(visual: nn.Module) -> tuple[int, int]:
    """``(tokens, depth)`` of the deep vision prompts wrapped into an open_clip ``VisionTransformer``."""
    if not isinstance(visual.ln_pre, AppendVisionPrompts):
        return 0, 0
    tokens = int(visual.ln_pre.prompt.shape[0])
    deep = sum(isinstance(b, DeepPromptBlock) for b in visual.transformer.resblocks)
    return tokens, 1 + deep


class CLIPImageClassifier(nn.Module):
    """A prompted CLIP image tower (+ projector) classifying against stored class vectors.

    Args:
        arch: the open_clip architecture of the image tower (recorded for :meth:`from_config`).
        visual: the (prompted) open_clip ``VisionTransformer``.
        projector: the student's projector, or None (a prompt-tuned CLIP's own image features).
        text_features: ``[C, D]`` class vectors (normalised again here).
        logit_scale: the *exponentiated* logit scale (a scalar).
    """

    def __init__(self, arch: str, visual: nn.Module, projector: nn.Module | None, text_features: Tensor,
                 logit_scale: Tensor | float):
        super().__init__()
        self.arch = arch
        self.visual = visual
        self.projector = projector if projector is not None else nn.Identity()
        self.register_buffer("text_features", F.normalize(text_features.detach().float(), dim=-1).clone())
        self.register_buffer("logit_scale", torch.as_tensor(logit_scale, dtype=torch.float32).detach().reshape(()))
        self.requires_grad_(False)
        self.eval()

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_student(cls, student: nn.Module, text_features: Tensor) -> CLIPImageClassifier:
        """From a :class:`~abkd_vision.models.clip.PromptedImageStudent` (copied, in eval mode)."""
        return cls(student.arch, copy.deepcopy(student.visual).eval(), copy.deepcopy(student.projector).eval(),
                   text_features, student.logit_scale().detach())

    @classmethod
    def from_prompted_clip(cls, model: nn.Module, text_features: Tensor) -> CLIPImageClassifier:
        """From a :class:`~abkd_vision.models.clip.PromptedCLIP` (its prompted image tower, copied)."""
        return cls(model.arch, copy.deepcopy(model.clip.visual).eval(), None, text_features,
                   model.logit_scale().detach())

    def config(self) -> dict:
        """What :meth:`from_config` needs to rebuild this classifier without its weights (JSON-serialisable)."""
        tokens, depth = _vision_prompt_layout(self.visual)
        projector = None
        if isinstance(self.projector, nn.Sequential):
            projector = [int(self.projector[0].in_features), int(self.projector[0].out_features)]
        size = getattr(self.visual, "image_size", None)
        name = resolve_arch(self.arch)
        return {"arch": self.arch, "open_clip_name": name, "vision_tokens": tokens, "vision_depth": depth,
                "projector": projector, "num_classes": int(self.text_features.shape[0]),
                "embed_dim": int(self.text_features.shape[1]),
                "image_size": int(size[0] if isinstance(size, (tuple, list)) else size),
                "model_config": open_clip.get_model_config(name)}

    @classmethod
    def from_config(cls, config: dict) -> CLIPImageClassifier:
        """An untrained classifier of the layout ``config`` describes (random weights: load a state dict next).

        The open_clip model config travels in ``config["model_config"]``: a custom architecture is registered
        from it when open_clip does not know the name (the JSON file it was trained from need not exist here)."""
        name = config.get("open_clip_name") or config["arch"]
        if open_clip.get_model_config(name) is None and config.get("model_config"):
            register_clip_config(config["model_config"], name=name)
        clip = build_clip(name, None)
        visual = add_vision_prompts(clip.visual, int(config["vision_tokens"]), int(config["vision_depth"]))
        del clip
        projector = _projector(*config["projector"]) if config.get("projector") else None
        text = torch.zeros(int(config["num_classes"]), int(config["embed_dim"]))
        return cls(name, visual, projector, text, 1.0)

    # -- inference ---------------------------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.config()["image_size"]

    def train(self, mode: bool = True) -> CLIPImageClassifier:
        return super().train(False)  # a deployed classifier: BatchNorm statistics and no dropout, always

    def forward(self, images: Tensor) -> Tensor:
        features = self.visual(images.to(self.text_features.dtype))
        features = F.normalize(self.projector(features), dim=-1)
        return self.logit_scale * features @ self.text_features.t()


def load_clip_classifier(folder: str | os.PathLike) -> tuple[CLIPImageClassifier, list[dict]]:
    """The classifier of a ``run.py export`` folder and its classes: ``(classifier, [{"name", "group"}, ...])``.

    Reads ``export.json`` (the layout), ``model.pt`` (the plain state dict, strictly, ``weights_only``) and
    ``classes.json``. Needs neither the teacher nor the training checkpoint, nor a custom architecture's config
    file (``export.json`` holds the open_clip model config).
    """
    folder = Path(folder).expanduser()
    for name in ("export.json", "model.pt", "classes.json"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} not found: pass the folder `run.py export --out` wrote")
    report = json.loads((folder / "export.json").read_text())
    if "classifier" not in report:
        raise CheckpointError(f"{folder / 'export.json'} describes no CLIP classifier (a CIFAR export? load its "
                              "model.pt with timm.create_model + abkd_vision.models.load_checkpoint)")
    model = CLIPImageClassifier.from_config(report["classifier"])
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, list(v.shape), list(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(folder / "model.pt", model, "", missing, unexpected, mismatched))
    model.load_state_dict(state, strict=True)
    classes = json.loads((folder / "classes.json").read_text())
    return model.eval(), classes
