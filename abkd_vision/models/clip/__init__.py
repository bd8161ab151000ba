"""CLIP for base-to-new prompt distillation, on open_clip.

* :func:`build_clip`: an open_clip CLIP from an architecture name and a tag or local weights file, frozen.
* :class:`PromptedCLIP`: the teacher, CLIP with deep vision-language prompts (PromptSRC's IVLP).
* :class:`PromptedImageStudent`: the student, a prompted image encoder + projector classifying with the
  teacher's text features (PromptKD).
* :class:`TextFeatureCache`: the teacher's text features, computed once per weights and class list.
* :func:`load_prompt_checkpoint`: prompts from this suite's checkpoints or PromptKD's released teachers;
  :func:`load_student_checkpoint`: students from this suite's checkpoints or PromptKD's released students.
* :class:`CLIPImageClassifier`: the deployable classifier (image tower + baked class vectors) ``run.py export``
  writes; :func:`load_clip_classifier` reads an export folder back.
* :func:`register_clip_config`: a custom open_clip architecture from a JSON file or a dict.

Importing this package registers the tiny test architectures of ``model_configs/`` (``abkd-tiny-vit*``) with
open_clip; they exist for CPU tests and smoke runs, not for results.
"""

from pathlib import Path

import open_clip

from abkd_vision.models.clip.builder import (
    CLIPWeightsError,
    build_clip,
    convert_openai_archive,
    get_tokenizer,
    read_clip_state_dict,
    register_clip_config,
    resolve_arch,
)
from abkd_vision.models.clip.checkpoint import (
    load_prompt_checkpoint,
    load_student_checkpoint,
    map_promptkd_state_dict,
    map_promptkd_student_state_dict,
    plain_clip_key,
)
from abkd_vision.models.clip.classifier import CLIPImageClassifier, load_clip_classifier
from abkd_vision.models.clip.prompts import (
    add_text_prompts,
    add_vision_prompts,
    prompt_parameters,
    prompts_disabled,
)
from abkd_vision.models.clip.student import PromptedImageStudent
from abkd_vision.models.clip.teacher import PromptedCLIP, clean_class_name
from abkd_vision.models.clip.text_cache import TextFeatureCache, TextFeatureMismatchError, weights_fingerprint

_CONFIGS = Path(__file__).parent / "model_configs"
if not any(Path(str(p)) == _CONFIGS for p in open_clip.factory._MODEL_CONFIG_PATHS):
    open_clip.add_model_config(_CONFIGS)

__all__ = [
    "CLIPImageClassifier",
    "CLIPWeightsError",
    "PromptedCLIP",
    "TextFeatureCache",
    "TextFeatureMismatchError",
    "PromptedImageStudent",
    "add_text_prompts",
    "add_vision_prompts",
    "build_clip",
    "clean_class_name",
    "convert_openai_archive",
    "get_tokenizer",
    "load_clip_classifier",
    "load_prompt_checkpoint",
    "load_student_checkpoint",
    "map_promptkd_state_dict",
    "map_promptkd_student_state_dict",
    "plain_clip_key",
    "prompt_parameters",
    "prompts_disabled",
    "read_clip_state_dict",
    "register_clip_config",
    "resolve_arch",
    "weights_fingerprint",
]
