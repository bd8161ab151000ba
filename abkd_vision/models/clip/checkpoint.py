"""Load prompts into a :class:`PromptedCLIP`: this suite's checkpoints and PromptKD's released teachers.

Accepted files:

* a Lightning checkpoint of :class:`~abkd_vision.lit.PromptTuningModule` (prompts under ``model.clip.``, class
  names in ``checkpoint["class_names"]``);
* a plain state dict of the prompts under this suite's names (``clip.visual.ln_pre.prompt``, ...);
* PromptKD's teachers (Dassl ``model-best.pth.tar`` of PromptSRC's ``CustomCLIP``: ``state_dict`` / ``epoch`` /
  ``optimizer`` / ``scheduler`` / ``val_result``). Their keys map as follows::

      prompt_learner.ctx                                     -> clip.token_embedding.ctx
      image_encoder.VPT                                      -> clip.visual.ln_pre.prompt
      image_encoder.transformer.resblocks.<i>.VPT_shallow    -> clip.visual.transformer.resblocks.<i>.prompt
      text_encoder.transformer.resblocks.<i>.VPT_shallow     -> clip.transformer.resblocks.<i>.prompt
      image_encoder.<w>, text_encoder.<w>, logit_scale       -> the frozen CLIP weights they were trained with
      prompt_learner.token_prefix / token_suffix             -> not weights: re-derived from the class names
      prompt_learner.ZS_image_encoder.*                      -> not used: a frozen copy of the zero-shot encoder

Loading is strict: every prompt of the model must be in the file, and a key that maps nowhere or a shape that
does not fit is an error listing the keys.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from abkd_vision.models.checkpoint import CheckpointError, mismatch_message
from abkd_vision.models.clip.prompts import prompt_parameters

__all__ = ["load_prompt_checkpoint", "map_promptkd_state_dict", "plain_clip_key"]

log = logging.getLogger(__name__)

# Keys of PromptKD's teacher files that are deliberately not loaded (see the module docstring).
_PROMPTKD_IGNORED = re.compile(r"^prompt_learner\.(token_prefix|token_suffix|ZS_image_encoder\..*)$")
_PROMPTKD_PROMPTS = [
    (re.compile(r"^prompt_learner\.ctx$"), "clip.token_embedding.ctx"),
    (re.compile(r"^image_encoder\.VPT$"), "clip.visual.ln_pre.prompt"),
    (re.compile(r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$"),
     r"clip.visual.transformer.resblocks.\1.prompt"),
    (re.compile(r"^text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$"),
     r"clip.transformer.resblocks.\1.prompt"),
]


def plain_clip_key(key: str) -> str:
    """The open_clip name of a (possibly prompt-wrapped) CLIP weight: drops the wrappers' ``block.``/``norm.``/..."""
    return (key.replace(".block.", ".").replace("ln_pre.norm.", "ln_pre.")
            .replace("token_embedding.embedding.", "token_embedding."))


def map_promptkd_state_dict(state_dict: dict[str, Tensor], model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a PromptKD teacher state dict to ``model``'s keys: ``(mapped, unmapped_keys)``."""
    ours = model.state_dict()
    prompt_keys = {name for name, _ in prompt_parameters(model)}
    plain_to_ours = {plain_clip_key(k[len("clip."):]): k for k in ours
                     if k.startswith("clip.") and k not in prompt_keys}
    mapped, unmapped = {}, []
    for key, value in state_dict.items():
        if _PROMPTKD_IGNORED.match(key):
            continue
        target = None
        for pattern, repl in _PROMPTKD_PROMPTS:
            if pattern.match(key):
                target = pattern.sub(repl, key)
                break
        if target is None:
            if key.startswith("image_encoder."):
                target = plain_to_ours.get("visual." + key[len("image_encoder."):])
            elif key.startswith("text_encoder."):
                target = plain_to_ours.get(key[len("text_encoder."):])
            elif key == "logit_scale":
                target = plain_to_ours.get("logit_scale")
        if target is None or target not in ours:
            unmapped.append(key)
        else:
            mapped[target] = value
    return mapped, unmapped


def _read(path: Path, trusted: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds Python objects besides tensors (PromptKD's files pickle their optimizer and scheduler), "
            "so it cannot be read with weights_only=True. If it comes from a source you trust, pass "
            "trusted=True (config: teacher_ckpt_trusted: true); unpickling can run arbitrary code."
        ) from err


def load_prompt_checkpoint(model: nn.Module, path: str | Path, trusted: bool = False) -> dict:
    """Load the prompts (and, from PromptKD files, the frozen CLIP weights) in ``path`` into ``model`` strictly.

    Returns metadata: ``{"format": "abkd"|"promptkd", "class_names": [...] or None, "num_prompt_classes": int or
    None, "epoch": ...}``; ``num_prompt_classes`` is the class count a PromptKD teacher's prompt buffers were made
    for (its base classes).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher prompt checkpoint not found: {path}")
    obj = _read(path, trusted)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"no state dict of tensors in {path} (found {type(obj).__name__})")
    meta = {"format": "abkd", "class_names": None, "num_prompt_classes": None,
            "epoch": obj.get("epoch") if isinstance(obj, dict) else None}
    if any(k.startswith(("prompt_learner.", "image_encoder.", "text_encoder.")) for k in state):
        meta["format"] = "promptkd"
        prefix = state.get("prompt_learner.token_prefix")
        meta["num_prompt_classes"] = int(prefix.shape[0]) if prefix is not None else None
        mapped, unmapped = map_promptkd_state_dict(state, model)
    else:
        meta["class_names"] = obj.get("class_names") if isinstance(obj, dict) else None
        stripped = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
        expected = model.state_dict()
        mapped = {k: v for k, v in stripped.items() if k in expected}
        unmapped = [k for k in stripped if k not in expected]
    expected = model.state_dict()
    prompts = [name for name, _ in prompt_parameters(model)]
    missing = [k for k in prompts if k not in mapped]
    mismatched = [(k, list(v.shape), list(expected[k].shape)) for k, v in mapped.items()
                  if v.shape != expected[k].shape]
    if missing or unmapped or mismatched:
        raise CheckpointError(
            mismatch_message(path, model, "", missing, unmapped, mismatched)
            + "\nThe prompts must match the teacher's architecture, prompt tokens and depths (PromptKD's teachers: "
            "ViT-L-14-quickgelu, 4 tokens, text and vision depth 9)."
        )
    with torch.no_grad():
        for key, value in mapped.items():
            expected[key].copy_(value.to(expected[key].dtype))
    log.info("loaded %d prompt tensors (+%d frozen CLIP tensors) from %s (%s format)", len(prompts),
             len(mapped) - len(prompts), path, meta["format"])
    return meta
