"""Deep prompts added to open_clip's own modules by wrapping them (no open_clip code is copied).

Three wrappers, each owning its prompt parameters and calling the original module:

* :class:`AppendVisionPrompts` wraps ``VisionTransformer.ln_pre``: the input prompt tokens are appended after
  ``[CLS, patches]`` (after the positional embedding, so they get none) and pass through ``ln_pre`` with them.
* :class:`DeepPromptBlock` wraps residual block ``i``: before the block runs, ``n`` token slots are overwritten
  by the block's own prompt: the last ``n`` tokens (vision) or positions ``1..n`` right after the start token
  (text). Blocks at or beyond the prompt depth are left alone, so prompts flow through them unchanged.
* :class:`ContextTokenEmbedding` wraps the text ``token_embedding``: positions ``1..n_ctx`` of every tokenized
  prompt (the placeholder words of ``"<prefix> <class name>."``) are replaced by the learnable context; open_clip
  then adds the positional embedding to the whole sequence as usual.

This is the independent vision-language prompting (IVLP) of PromptSRC and the student of PromptKD. Every wrapper
has an ``enabled`` switch (:func:`prompts_disabled`), so the same frozen CLIP also gives zero-shot features.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = [
    "AppendVisionPrompts",
    "ContextTokenEmbedding",
    "DeepPromptBlock",
    "add_text_prompts",
    "add_vision_prompts",
    "prompt_parameters",
    "prompts_disabled",
]

PROMPT_INIT_STD = 0.02  # normal init of VPT and deep text prompts (PromptSRC / PromptKD)


def _prompt(n_tokens: int, width: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(n_tokens, width) * PROMPT_INIT_STD)


class _PromptWrapper(nn.Module):
    enabled: bool = True


class AppendVisionPrompts(_PromptWrapper):
    """``norm(cat([x, prompt]))``: appends ``prompt [n, W]`` to ``x [B, L, W]`` before ``ln_pre`` (input depth)."""

    def __init__(self, norm: nn.Module, n_tokens: int, width: int):
        super().__init__()
        self.norm = norm
        self.prompt = _prompt(n_tokens, width)

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled:
            x = torch.cat([x, self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return self.norm(x)


class DeepPromptBlock(_PromptWrapper):
    """A residual block whose input has ``n`` token slots replaced by this block's ``prompt [n, W]``.

    Args:
        block: the open_clip residual block (called with the same arguments).
        position: ``"last"`` (vision: the appended prompt tokens) or ``"after_first"`` (text: positions 1..n).
        batch_first: layout of the block's input, ``[B, L, W]`` if True else ``[L, B, W]``.
    """

    def __init__(self, block: nn.Module, n_tokens: int, width: int, position: str, batch_first: bool = True):
        super().__init__()
        if position not in ("last", "after_first"):
            raise ValueError(f"position must be 'last' or 'after_first', got {position!r}")
        self.block = block
        self.prompt = _prompt(n_tokens, width)
        self.position = position
        self.batch_first = batch_first

    def get_weight_dtype(self) -> torch.dtype:  # open_clip asks resblocks[i] for the cast dtype
        return self.block.get_weight_dtype()

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.enabled:
            seq = 1 if self.batch_first else 0
            n = self.prompt.shape[0]
            p = self.prompt.to(x.dtype)
            p = p.unsqueeze(0).expand(x.shape[0], -1, -1) if self.batch_first else p.unsqueeze(1).expand(
                -1, x.shape[1], -1)  # [B, n, W] or [n, B, W]
            if self.position == "last":
                x = torch.cat([x.narrow(seq, 0, x.shape[seq] - n), p], dim=seq)
            else:
                rest = x.shape[seq] - 1 - n
                x = torch.cat([x.narrow(seq, 0, 1), p, x.narrow(seq, 1 + n, rest)], dim=seq)
        return self.block(x, *args, **kwargs)


class ContextTokenEmbedding(_PromptWrapper):
    """Token embedding whose positions ``1..n_ctx`` are the learnable context ``ctx [n_ctx, W]``."""

    def __init__(self, embedding: nn.Embedding, ctx: Tensor):
        super().__init__()
        self.embedding = embedding
        self.ctx = nn.Parameter(ctx.detach().clone().float())

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight

    def forward(self, text: Tensor) -> Tensor:
        x = self.embedding(text)
        if not self.enabled:
            return x
        n = self.ctx.shape[0]
        ctx = self.ctx.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, :1], ctx, x[:, 1 + n:]], dim=1)


def _check_depth(depth: int, layers: int, what: str) -> None:
    if not 0 <= depth <= layers:
        raise ValueError(f"{what} prompt depth must be in [0, {layers}] (the number of blocks), got {depth}")


def add_vision_prompts(visual: nn.Module, n_tokens: int, depth: int) -> nn.Module:
    """Add deep vision prompts to an open_clip ``VisionTransformer`` in place (``depth`` 0 = none).

    Depth d: input prompts (before ``ln_pre``) and own prompts in blocks ``1..d-1``; ``d * n_tokens * width``
    parameters (ViT-B/16, 4 tokens, depth 9: 27,648).
    """
    blocks = visual.transformer.resblocks
    _check_depth(depth, len(blocks), "vision")
    if depth == 0:
        return visual
    if n_tokens <= 0:
        raise ValueError(f"vision prompt tokens must be positive, got {n_tokens}")
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
        raise ValueError("vision prompts need a ViT pooled by its class token (pool_type 'tok', no attention pool)")
    width = visual.class_embedding.shape[-1]
    batch_first = getattr(visual.transformer, "batch_first", True)
    visual.ln_pre = AppendVisionPrompts(visual.ln_pre, n_tokens, width)
    for i in range(1, depth):
        blocks[i] = DeepPromptBlock(blocks[i], n_tokens, width, "last", batch_first)
    return visual


def add_text_prompts(clip: nn.Module, ctx: Tensor | None, depth: int) -> nn.Module:
    """Add a learnable text context and deep text prompts to an open_clip ``CLIP`` in place.

    Args:
        ctx: initial context ``[n_ctx, W]`` for positions ``1..n_ctx`` (None: no learnable context, depth 0).
        depth: text prompt depth: the context at the input and own prompts of ``n_ctx`` tokens in blocks
            ``1..depth-1`` (0 or 1 with ``ctx``: context only).
    """
    blocks = clip.transformer.resblocks
    _check_depth(depth, len(blocks), "text")
    if ctx is None:
        if depth > 0:
            raise ValueError("text prompt depth > 0 needs a learnable context (n_ctx > 0)")
        return clip
    n_ctx, width = ctx.shape
    clip.token_embedding = ContextTokenEmbedding(clip.token_embedding, ctx)
    batch_first = getattr(clip.transformer, "batch_first", True)
    for i in range(1, depth):
        blocks[i] = DeepPromptBlock(blocks[i], n_ctx, width, "after_first", batch_first)
    return clip


def prompt_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every prompt held by a wrapper inside ``module``."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("prompt", "ctx"):
            yield name, p


@contextmanager
def prompts_disabled(module: nn.Module):
    """Run ``module`` as if it had no prompts (zero-shot CLIP), restoring each wrapper's state afterwards."""
    wrappers = [m for m in module.modules() if isinstance(m, _PromptWrapper)]
    saved = [m.enabled for m in wrappers]
    try:
        for m in wrappers:
            m.enabled = False
        yield module
    finally:
        for m, flag in zip(wrappers, saved):
            m.enabled = flag
