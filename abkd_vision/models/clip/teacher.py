"""``PromptedCLIP``: CLIP with independent vision-language deep prompts (PromptSRC's IVLP), the teacher.

Text side: every class ``c`` is tokenized as ``"<prefix> <name_c>."``; with ``learn_ctx`` the prefix's token
embeddings (4 tokens for "a photo of a") become the learnable context, and blocks ``1..text_depth-1`` get their own
prompts of as many tokens. Image side: ``vision_tokens`` prompts appended at the input and own prompts in blocks
``1..vision_depth-1``. Logits: ``exp(logit_scale) * cos(image features, text features)``.

With ``learn_ctx=False`` and both depths 0 this is zero-shot CLIP with the prompt ``"a photo of a {class}."``.
Everything but the prompts is frozen; :func:`~abkd_vision.models.clip.prompts.prompts_disabled` gives zero-shot
features from the same weights (PromptSRC's self-consistency terms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from abkd_vision.models.clip.builder import build_clip, get_tokenizer
from abkd_vision.models.clip.prompts import add_text_prompts, add_vision_prompts, prompts_disabled

__all__ = ["PromptedCLIP", "clean_class_name"]


def clean_class_name(name: str) -> str:
    """CoOp's cleaning for prompts: underscores become spaces."""
    return name.replace("_", " ")


class PromptedCLIP(nn.Module):
    """A frozen open_clip CLIP with learnable deep prompts on both towers.

    Args:
        arch: open_clip architecture (the paper's teacher: ``ViT-L-14-quickgelu``).
        pretrained: open_clip tag or local weights file (see :func:`~abkd_vision.models.clip.build_clip`).
        prompt_prefix: the words before the class name; with ``learn_ctx`` their embeddings initialise the context.
        learn_ctx: learn the prefix's token embeddings (PromptSRC: 4 tokens from "a photo of a").
        n_ctx: number of context tokens when it differs from the prefix's token count: then the context is
            random (std 0.02) and the placeholder text is ``"X " * n_ctx``. None = the prefix's token count.
        text_depth: text prompt depth (input context + blocks ``1..text_depth-1``); needs ``learn_ctx``.
        vision_tokens, vision_depth: vision prompt tokens and depth (0 = no vision prompts).

    Shapes: ``encode_image [B, 3, S, S] -> [B, D]``, ``encode_text(names) -> [C, D]`` (both L2-normalised),
    ``forward(images, text_features [C, D]) -> logits [B, C]``.
    """

    def __init__(self, arch: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai",
                 prompt_prefix: str = "a photo of a", learn_ctx: bool = True, n_ctx: int | None = None,
                 text_depth: int = 9, vision_tokens: int = 4, vision_depth: int = 9):
        super().__init__()
        if not learn_ctx and text_depth > 0:
            raise ValueError(f"text_depth={text_depth} needs learn_ctx=True (deep text prompts extend the learnable "
                             "context); use text_depth=0 for a fixed prompt")
        self.arch = arch
        self.clip = build_clip(arch, pretrained)
        self.tokenizer = get_tokenizer(arch)
        prefix_ids = self._content_ids(prompt_prefix)
        ctx = None
        if learn_ctx:
            n = len(prefix_ids) if n_ctx is None else int(n_ctx)
            if n <= 0:
                raise ValueError(f"n_ctx must be positive, got {n} (prompt_prefix={prompt_prefix!r})")
            if n == len(prefix_ids):
                with torch.no_grad():
                    ctx = self.clip.token_embedding(torch.tensor(prefix_ids)).float()
            else:  # a context length the prefix cannot initialise: random context behind placeholder words
                prompt_prefix = " ".join(["X"] * n)
                ctx = torch.randn(n, self.clip.token_embedding.weight.shape[1]) * 0.02
        self.prompt_prefix = prompt_prefix
        add_text_prompts(self.clip, ctx, text_depth)
        add_vision_prompts(self.clip.visual, vision_tokens, vision_depth)
        self.clip.eval()

    def _content_ids(self, text: str) -> list[int]:
        ids = self.tokenizer([text])[0].tolist()
        end = ids.index(max(ids))  # the end-of-text token has the largest id
        return ids[1:end]

    def train(self, mode: bool = True) -> PromptedCLIP:
        # The frozen CLIP stays in eval mode (no dropout); prompts are plain parameters and need no mode.
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[-1])

    def tokenize(self, class_names: list[str], template: str | None = None) -> Tensor:
        """Token ids ``[C, context_length]`` of ``"<prefix> <name>."`` (or ``template.format(name)``)."""
        names = [clean_class_name(n) for n in class_names]
        texts = [template.format(n) if template else f"{self.prompt_prefix} {n}." for n in names]
        return self.tokenizer(texts)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the CLIP's weights (float32, or bfloat16/float16 under ``bf16-true``/``16-true``)."""
        return self.clip.visual.conv1.weight.dtype

    def encode_text(self, class_names: list[str]) -> Tensor:
        """Prompted, L2-normalised text features ``[C, D]`` of the classes."""
        tokens = self.tokenize(class_names).to(self.clip.positional_embedding.device)
        return self.clip.encode_text(tokens, normalize=True)

    def encode_image(self, images: Tensor) -> Tensor:
        """Prompted, L2-normalised image features ``[B, D]`` in the model's dtype (images are cast to it)."""
        return self.clip.encode_image(images.to(self.dtype), normalize=True)

    @torch.no_grad()
    def zero_shot_text_features(self, class_names: list[str],
                                templates: tuple[str, ...] = ("a photo of a {}.",)) -> Tensor:
        """Zero-shot CLIP text features ``[C, D]`` without prompts, averaged over ``templates`` then normalised."""
        with prompts_disabled(self.clip):
            device = self.clip.positional_embedding.device
            feats = torch.stack([self.clip.encode_text(self.tokenize(class_names, t).to(device), normalize=True)
                                 for t in templates]).mean(0)
        return F.normalize(feats, dim=-1)

    def zero_shot_image_features(self, images: Tensor) -> Tensor:
        with torch.no_grad(), prompts_disabled(self.clip):
            return self.clip.encode_image(images.to(self.dtype), normalize=True)

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp()

    def forward(self, images: Tensor, text_features: Tensor) -> Tensor:
        """Logits ``[B, C]`` in the model's dtype (the text features are cast to it; losses upcast them)."""
        features = self.encode_image(images)
        return self.logit_scale().to(features.dtype) * features @ text_features.t().to(features.dtype)
