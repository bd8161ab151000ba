"""``PromptedImageStudent``: PromptKD's student, an image-only CLIP with deep vision prompts and a projector.

``logits = exp(student logit_scale) * cos(projector(student image features), teacher text features)``.
The student has no text tower: its classifier is the teacher's (cached) prompted text features, so new classes
only need the teacher's text features. Trainable: the vision prompts and the projector
(ViT-B/16 -> ViT-L/14: 27,648 + 986,112 parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_vision.models.clip.builder import build_clip
from abkd_vision.models.clip.prompts import add_vision_prompts

__all__ = ["PromptedImageStudent"]


class PromptedImageStudent(nn.Module):
    """The student image encoder (frozen CLIP vision tower + deep prompts) and a projector to the teacher's width.

    Args:
        arch, pretrained: the student CLIP (paper: ``ViT-B-16-quickgelu``, ``"openai"`` or a local file).
        teacher_dim: width of the teacher's text features (ViT-L/14: 768).
        vision_tokens, vision_depth: deep vision prompts (PromptKD: 4 tokens, depth 9).

    The projector is Linear(d, t) -> BatchNorm1d(t) -> ReLU -> Linear(t, t) (the reference's 1x1 convolutions
    on a 1x1 map are these linear layers).

    Shapes: ``encode_image [B, 3, S, S] -> [B, teacher_dim]`` (normalised); ``forward(images, text [C, teacher_dim])
    -> logits [B, C]``.
    """

    def __init__(self, arch: str = "ViT-B-16-quickgelu", pretrained: str | None = "openai", teacher_dim: int = 768,
                 vision_tokens: int = 4, vision_depth: int = 9):
        super().__init__()
        self.arch = arch
        clip = build_clip(arch, pretrained)
        self.visual = add_vision_prompts(clip.visual, vision_tokens, vision_depth)
        self.logit_scale_log = nn.Parameter(clip.logit_scale.detach().clone(), requires_grad=False)
        del clip  # the text tower is never used
        dim = int(self.visual.output_dim)
        self.projector = nn.Sequential(
            nn.Linear(dim, teacher_dim), nn.BatchNorm1d(teacher_dim), nn.ReLU(inplace=True),
            nn.Linear(teacher_dim, teacher_dim),
        )
        self.visual.eval()

    def train(self, mode: bool = True) -> PromptedImageStudent:
        super().train(mode)
        self.visual.eval()  # frozen tower; only the projector's BatchNorm follows the mode
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the projector (and, under ``bf16-true``/``16-true``, of the whole student)."""
        return self.projector[0].weight.dtype

    def encode_image(self, images: Tensor) -> Tensor:
        # images in the tower's dtype, its features in the projector's: one dtype each, whatever the precision
        visual = self.visual(images.to(self.visual.conv1.weight.dtype))
        return F.normalize(self.projector(visual.to(self.dtype)), dim=-1)

    def logit_scale(self) -> Tensor:
        return self.logit_scale_log.exp()

    def forward(self, images: Tensor, text_features: Tensor) -> Tensor:
        features = self.encode_image(images)
        return self.logit_scale().to(features.dtype) * features @ text_features.t().to(features.dtype)
