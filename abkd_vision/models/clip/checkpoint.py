"""Load prompts into a :class:`PromptedCLIP` (the teacher) or a :class:`PromptedImageStudent`: this suite's
checkpoints and PromptKD's released files.

Teachers (:func:`load_prompt_checkpoint`):

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
      prompt_learner.token_prefix(2) / token_suffix(2)       -> not weights: re-derived from the class names
      prompt_learner.ZS_image_encoder.*                      -> not used: a frozen copy of the zero-shot encoder

  (``token_prefix2``/``token_suffix2``, in PromptKD's ``CustomCLIP_teacher``, are the new classes' buffers.)

Students (:func:`load_student_checkpoint`):

* a Lightning checkpoint of :class:`~abkd_vision.lit.PromptDistillationModule` (the student under ``student.``);
* a plain state dict of the student under this suite's names (``visual.ln_pre.prompt``, ``projector.0.weight``);
* PromptKD's students (Dassl ``<output_dir>/VLPromptLearner/model-best.pth.tar`` of its ``CustomCLIP``)::

      image_encoder.VPT                                      -> visual.ln_pre.prompt
      image_encoder.transformer.resblocks.<i>.VPT_shallow    -> visual.transformer.resblocks.<i>.prompt
      image_encoder.<w>                                      -> the frozen image tower it was trained with
      logit_scale                                            -> logit_scale_log (the student's own)
      VPT_image_trans.conv1.0.weight [t, d, 1, 1], .bias     -> projector.0 (Linear d -> t: the 1x1 conv on a
                                                                1x1 map is this linear layer)
      VPT_image_trans.conv1.1.{weight, bias, running_mean,   -> projector.1 (BatchNorm, statistics included)
          running_var, num_batches_tracked}
      VPT_image_trans.conv1.3.weight [t, t, 1, 1], .bias     -> projector.3 (Linear t -> t)

Loading is strict: every trained tensor of the model (prompts; for a student also the projector and its
BatchNorm statistics) must be in the file, and a key that maps nowhere or a shape that does not fit is an error
listing the keys. Dassl files pickle an optimizer and scheduler: reading them needs ``trusted=True``.
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

__all__ = [
    "load_prompt_checkpoint",
    "load_student_checkpoint",
    "map_promptkd_state_dict",
    "map_promptkd_student_state_dict",
    "plain_clip_key",
]

log = logging.getLogger(__name__)

# Keys of PromptKD's teacher files that are deliberately not loaded (see the module docstring).
_PROMPTKD_IGNORED = re.compile(r"^prompt_learner\.(token_prefix2?|token_suffix2?|ZS_image_encoder\..*)$")
_PROMPTKD_PROJECTOR = "VPT_image_trans."  # only PromptKD's students have it
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
            "trusted=True (config: teacher_ckpt_trusted: true, or student_ckpt_trusted: true for a student); "
            "unpickling can run arbitrary code."
        ) from err


def _read_state(path: str | Path, trusted: bool, what: str) -> tuple[Path, object, dict]:
    """``(path, the file's object, its state dict of tensors)``; a missing file or one without a state dict of
    tensors is an error naming ``what`` and the path."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    obj = _read(path, trusted)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"no state dict of tensors in {path} (found {type(obj).__name__})")
    return path, obj, state


def copy_checked(path, model: nn.Module, mapped: dict, unmapped: list[str], required: list[str], hint: str) -> None:
    """Copy ``mapped`` tensors into ``model``'s state (cast to its dtypes), strictly: a ``required`` key missing
    from ``mapped``, an ``unmapped`` key or a shape mismatch is a CheckpointError listing them, then ``hint``."""
    expected = model.state_dict()
    missing = [k for k in required if k not in mapped]
    mismatched = [(k, list(v.shape), list(expected[k].shape)) for k, v in mapped.items()
                  if v.shape != expected[k].shape]
    if missing or unmapped or mismatched:
        raise CheckpointError(mismatch_message(path, model, "", missing, unmapped, mismatched) + "\n" + hint)
    with torch.no_grad():
        for key, value in mapped.items():
            expected[key].copy_(value.to(expected[key].dtype))


def load_prompt_checkpoint(model: nn.Module, path: str | Path, trusted: bool = False) -> dict:
    """Load the prompts (and, from PromptKD files, the frozen CLIP weights) in ``path`` into ``model`` strictly.

    Returns metadata: ``{"format": "abkd"|"promptkd", "class_names": [...] or None, "num_prompt_classes": int or
    None, "epoch": ...}``; ``num_prompt_classes`` is the class count a PromptKD teacher's prompt buffers were made
    for (its base classes).
    """
    path, obj, state = _read_state(path, trusted, "teacher prompt checkpoint")
    meta = {"format": "abkd", "class_names": None, "num_prompt_classes": None,
            "epoch": obj.get("epoch") if isinstance(obj, dict) else None}
    if any(k.startswith(_PROMPTKD_PROJECTOR) for k in state):
        raise CheckpointError(
            f"{path} is a PromptKD student checkpoint (it holds the student's projector {_PROMPTKD_PROJECTOR}*), "
            "not a teacher's prompts: pass it as the student (model.init_args.student_ckpt, with "
            "student_ckpt_trusted: true) and the teacher's model-best.pth.tar as teacher_ckpt"
        )
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
    prompts = [name for name, _ in prompt_parameters(model)]
    copy_checked(path, model, mapped, unmapped, prompts,
                 "The prompts must match the teacher's architecture, prompt tokens and depths (PromptKD's teachers: "
                 "ViT-L-14-quickgelu, 4 tokens, text and vision depth 9).")
    log.info("loaded %d prompt tensors (+%d frozen CLIP tensors) from %s (%s format)", len(prompts),
             len(mapped) - len(prompts), path, meta["format"])
    return meta


# PromptKD's student: the projector's Sequential(Conv2d 1x1, BatchNorm2d, ReLU, Conv2d 1x1) -> our Linear/BN layers
_PROMPTKD_STUDENT = [
    (re.compile(r"^image_encoder\.VPT$"), "visual.ln_pre.prompt"),
    (re.compile(r"^image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow$"),
     r"visual.transformer.resblocks.\1.prompt"),
    (re.compile(r"^VPT_image_trans\.conv1\.([013])\.(weight|bias|running_mean|running_var|num_batches_tracked)$"),
     r"projector.\1.\2"),
    (re.compile(r"^logit_scale$"), "logit_scale_log"),
]


def map_promptkd_student_state_dict(state_dict: dict[str, Tensor], student: nn.Module
                                    ) -> tuple[dict[str, Tensor], list[str]]:
    """Rename a PromptKD student state dict to ``student``'s keys: ``(mapped, unmapped_keys)``.

    The 1x1-conv weights ``[t, d, 1, 1]`` become linear weights ``[t, d]``; other shapes are kept as they are (and
    reported as mismatches by the loader).
    """
    ours = student.state_dict()
    prompt_keys = {name for name, _ in prompt_parameters(student)}
    plain_to_ours = {plain_clip_key(k): k for k in ours if k.startswith("visual.") and k not in prompt_keys}
    mapped, unmapped = {}, []
    for key, value in state_dict.items():
        target = None
        for pattern, repl in _PROMPTKD_STUDENT:
            if pattern.match(key):
                target = pattern.sub(repl, key)
                break
        if target is None and key.startswith("image_encoder."):
            target = plain_to_ours.get("visual." + key[len("image_encoder."):])
        if target is None or target not in ours:
            unmapped.append(key)
            continue
        if target.startswith("projector.") and target.endswith(".weight") and value.ndim == 4 \
                and value.shape[2:] == (1, 1):
            value = value.reshape(value.shape[:2])
        if target == "logit_scale_log" and value.numel() == 1:
            value = value.reshape(ours[target].shape)
        mapped[target] = value
    return mapped, unmapped


def _student_trained_keys(student: nn.Module) -> list[str]:
    """The keys a student checkpoint must hold: prompts, projector parameters and BatchNorm statistics."""
    prompts = [name for name, _ in prompt_parameters(student)]
    return prompts + [k for k in student.state_dict() if k.startswith("projector.")]


def _check_projector_widths(path: Path, student: nn.Module, mapped: dict[str, Tensor]) -> None:
    first, last = mapped.get("projector.0.weight"), mapped.get("projector.3.weight")
    if first is None or first.ndim != 2:
        return
    want_in = int(student.projector[0].in_features)
    want_out = int(student.projector[0].out_features)
    got_out, got_in = (int(n) for n in first.shape)
    if last is not None and last.ndim == 2:
        got_out = int(last.shape[0])
    if (got_in, got_out) != (want_in, want_out):
        raise CheckpointError(
            f"the student projector in {path} maps {got_in} -> {got_out} features, but this student needs "
            f"{want_in} -> {want_out}: its image tower ({getattr(student, 'arch', '?')}) gives {want_in}-wide "
            f"features and the teacher's text features are {want_out} wide, while the checkpoint's student was "
            f"trained with {got_in}-wide image features for a teacher of width {got_out}. Use the student and "
            "teacher architectures it was trained with (PromptKD: ViT-B-16-quickgelu -> ViT-L-14-quickgelu, "
            "512 -> 768)."
        )


def load_student_checkpoint(student: nn.Module, path: str | Path, trusted: bool = False) -> dict:
    """Load a student's prompts and projector (and, from PromptKD files, its frozen image tower and logit scale)
    from ``path`` into a :class:`~abkd_vision.models.clip.PromptedImageStudent`, strictly.

    Returns metadata: ``{"format": "abkd"|"promptkd", "class_names": [...] or None, "epoch": ...}``.

    Raises:
        CheckpointError: a pickling file without ``trusted``, a teacher's file, projector widths that do not fit
            the student and teacher (names both), or any missing/unexpected/mis-shaped key (lists them).
    """
    path, obj, state = _read_state(path, trusted, "student checkpoint")
    meta = {"format": "abkd", "class_names": obj.get("class_names") if isinstance(obj, dict) else None,
            "epoch": obj.get("epoch") if isinstance(obj, dict) else None}
    expected = student.state_dict()
    if any(k.startswith(("prompt_learner.", "text_encoder.")) for k in state) and not any(
            k.startswith(_PROMPTKD_PROJECTOR) for k in state):
        raise CheckpointError(
            f"{path} is a PromptKD teacher checkpoint (prompt_learner.*/text_encoder.*, no projector "
            f"{_PROMPTKD_PROJECTOR}*), not a student: pass it as teacher_ckpt"
        )
    if any(k.startswith((_PROMPTKD_PROJECTOR, "image_encoder.")) for k in state):
        meta["format"] = "promptkd"
        mapped, unmapped = map_promptkd_student_state_dict(state, student)
    else:
        if any(k.startswith("student.") for k in state):  # a PromptDistillationModule checkpoint
            # its head's learned tensors (CTKD's temperature) are not the student's; any other key stays unexpected
            state = {(k[len("student."):] if k.startswith("student.") else k): v for k, v in state.items()
                     if not k.startswith("head.")}
        mapped = {k: v for k, v in state.items() if k in expected}
        unmapped = [k for k in state if k not in expected]
    _check_projector_widths(path, student, mapped)
    copy_checked(path, student, mapped, unmapped, _student_trained_keys(student),
                 "The student must match the checkpoint's image architecture, prompt tokens and depth and the "
                 "projector's widths (PromptKD's students: ViT-B-16-quickgelu, 4 tokens, vision depth 9, 512 -> 768).")
    log.info("loaded the student's %d prompt and projector tensors (+%d frozen tensors) from %s (%s format)",
             len(_student_trained_keys(student)), len(mapped) - len(_student_trained_keys(student)), path,
             meta["format"])
    return meta
