"""Export a distilled CLIP student (or a prompt-tuned CLIP) as a classifier that needs no text tower.

    python run.py export --ckpt runs/abkd/EuroSAT/version_0/checkpoints/last.ckpt \\
        --images data/eurosat --out exports/eurosat-student

reads a checkpoint of ``PromptDistillationModule`` (its student, classifying with the teacher's class vectors) or
``PromptTuningModule`` (the prompt-tuned CLIP itself), rebuilds the module from its recorded hyper-parameters
(the frozen CLIPs from ``*_pretrained``, the teacher's prompts from ``teacher_ckpt``) and writes into ``--out``:

* ``model.onnx``: the image classifier (input ``images [B, 3, S, S]`` in CLIP's normalisation, output
  ``logits [B, C]``, dynamic batch): the prompted image tower and projector, with the teacher's L2-normalised
  prompted text features of the classes and the logit scale baked in as constants; checked with onnxruntime
  against PyTorch on real images (``--images``: an image folder, e.g. a dataset root, or an ``.npz`` with
  ``images`` uint8 [N, H, W, 3]) within ``--atol`` (1e-4);
* ``model.pt``: the plain state dict of the same classifier
  (:class:`~abkd_vision.models.clip.CLIPImageClassifier`; :func:`~abkd_vision.models.clip.load_clip_classifier`
  rebuilds it from this folder without the teacher);
* ``classes.json``: the classes in logit order, each marked ``base``, ``new`` (the dataset's split) or ``other``
  (a name given with ``--classes`` that is not one of the dataset's classes);
* ``export.json``: the classifier's layout, parameters, file sizes, the largest ONNX/PyTorch difference and the
  median CPU latency at batch 1 and 8 (PyTorch and onnxruntime) next to the teacher's full forward (its image
  tower and its text tower over the same classes, as a CLIP without stored class vectors runs).

Classes: all the dataset's classes (base first), ``--base-only``/``--new-only``, or ``--classes <file>`` (one name
per line, or a JSON list): class vectors computed by the teacher's prompted text tower at export time, so the
deployed student recognises classes it never saw (open vocabulary).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from abkd_vision.io import atomic_write
from abkd_vision.models.checkpoint import CheckpointError, mismatch_message

# abkd_vision.models.clip (open_clip) is imported where needed: `run.py export` of a CIFAR checkpoint never pays
# for it

__all__ = [
    "CLIP_MODULES",
    "SUPPORTED_MODULES",
    "clip_classifier",
    "clip_module_from_checkpoint",
    "clip_module_kind",
    "export_clip",
    "read_class_names",
]

log = logging.getLogger(__name__)

CLIP_MODULES = ("PromptDistillationModule", "PromptTuningModule")
SUPPORTED_MODULES = ("DistillationModule and ClassifierModule (CIFAR zoo), PromptDistillationModule and "
                     "PromptTuningModule (CLIP base-to-new)")
GROUPS = ("base", "new", "other")


class ClassListError(ValueError):
    """A ``--classes`` file with empty or duplicate names (lists them)."""


def clip_module_kind(hparams: dict) -> str | None:
    """``"PromptDistillationModule"`` / ``"PromptTuningModule"`` from a checkpoint's hyper-parameters, or None."""
    if "student_arch" in hparams and "teacher_arch" in hparams:
        return "PromptDistillationModule"
    if "arch" in hparams and "prompt_prefix" in hparams:
        return "PromptTuningModule"
    return None


def _prompt_key(name: str) -> str:
    """What the tokenizer sees of a class name: CoOp's cleaning, lower case (CLIP's BPE lowercases), one space."""
    from abkd_vision.models.clip import clean_class_name

    return " ".join(clean_class_name(name).lower().split())


def read_class_names(path: str | os.PathLike) -> list[str]:
    """Class names from a text file (one per line; trailing blank lines ignored) or a JSON list of strings.

    Raises:
        ClassListError: empty names or names that give the same prompt (both listed with their positions).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class list not found: {path} (one class name per line, or a JSON list)")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ClassListError(f"{path} must hold a JSON list of class names (strings)")
        where = "entry"
    else:
        names = text.splitlines()
        while names and not names[-1].strip():
            names.pop()
        where = "line"
    names = [n.strip() for n in names]
    if not names:
        raise ClassListError(f"{path} holds no class name")
    empty = [i + 1 for i, n in enumerate(names) if not n]
    first: dict[str, int] = {}
    duplicates = []
    for i, name in enumerate(names):
        if not name:
            continue
        key = _prompt_key(name)
        if key in first:
            duplicates.append(f"{names[first[key]]!r} ({where} {first[key] + 1}) and {name!r} ({where} {i + 1})")
        else:
            first[key] = i
    problems = []
    if empty:
        problems.append(f"empty names at {where}{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty))}")
    if duplicates:
        problems.append("duplicate names (the same prompt after cleaning and lower-casing): " + "; ".join(duplicates))
    if problems:
        raise ClassListError(f"bad class list {path}: " + "; ".join(problems))
    return names


# -- the module from its checkpoint ------------------------------------------------------------------------------
def clip_module_from_checkpoint(path: str | os.PathLike, ckpt: dict, teacher_ckpt: str | None = None,
                                overrides: dict | None = None) -> nn.Module:
    """Rebuild the CLIP module of a checkpoint (already read into ``ckpt``) and load its trained tensors strictly.

    ``teacher_ckpt`` replaces the recorded teacher prompts file (``teacher_ckpt`` of PromptDistillationModule,
    ``init_ckpt`` of PromptTuningModule); ``overrides`` replace any other recorded hyper-parameter (moved files).
    """
    from abkd_vision.lit import PromptDistillationModule, PromptTuningModule

    hp = dict(ckpt.get("hyper_parameters") or {})
    kind = clip_module_kind(hp)
    if kind is None:
        raise CheckpointError(f"{path} is not a checkpoint of {' or '.join(CLIP_MODULES)}")
    cls = PromptDistillationModule if kind == "PromptDistillationModule" else PromptTuningModule
    accepted = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
    kwargs = {k: v for k, v in hp.items() if k in accepted}
    skipped = sorted(k for k in hp if k not in accepted and not k.startswith("_"))
    if skipped:
        log.warning("hyper-parameters of %s that %s no longer takes, ignored: %s", path, kind, ", ".join(skipped))
    if teacher_ckpt is not None:
        kwargs["teacher_ckpt" if kind == "PromptDistillationModule" else "init_ckpt"] = teacher_ckpt
    for key, value in (overrides or {}).items():
        if key not in accepted:
            raise ValueError(f"--hparam {key}: {kind} has no such argument (it takes {', '.join(sorted(accepted))})")
        kwargs[key] = value
    if kind == "PromptDistillationModule":
        kwargs["teacher_logit_cache"] = None  # nothing is trained here
        kwargs["evaluate_teacher"] = False
    module = cls(**kwargs)
    prefix = "student." if kind == "PromptDistillationModule" else "model."
    state = {k: v for k, v in (ckpt.get("state_dict") or {}).items() if k.startswith(prefix)}
    expected = module.state_dict()
    trained = sorted(k for k in module.trained_state_keys() if k.startswith(prefix))
    missing = [k for k in trained if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, list(v.shape), list(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(path, module, "", missing, unexpected, mismatched))
    module.load_state_dict(state, strict=False)  # every trained key checked above; the rest is frozen
    names = ckpt.get("class_names")
    if not names or ckpt.get("num_base_classes") is None:
        raise CheckpointError(f"{path} records no class names (class_names / num_base_classes); export a "
                              "checkpoint written by a run of this suite")
    module.class_names, module.num_base_classes = list(names), int(ckpt["num_base_classes"])
    return module.eval()


def _teacher_of(module: nn.Module) -> nn.Module:
    """The prompted CLIP whose text tower makes the class vectors (the distillation teacher, or the model)."""
    return module.teacher.model if hasattr(module, "student") else module.model


def clip_classifier(module: nn.Module, classes: list[str] | None = None, base_only: bool = False,
                    new_only: bool = False) -> tuple[nn.Module, list[dict]]:
    """The deployable classifier of a CLIP module for its classes (or ``classes``): ``(classifier, class_list)``.

    The class vectors are the teacher's prompted text features as evaluation uses them (all of the dataset's
    classes, then sliced to ``base_only``/``new_only``), or those of ``classes`` computed now by the teacher's text
    tower. ``class_list`` is ``[{"index", "name", "group"}]`` with group ``base``/``new``/``other``; the
    classifier is a :class:`~abkd_vision.models.clip.CLIPImageClassifier` in fp32.
    """
    from abkd_vision.models.clip import CLIPImageClassifier, TextFeatureCache

    if sum(bool(x) for x in (classes, base_only, new_only)) > 1:
        raise ValueError("--classes, --base-only and --new-only exclude each other; pick one")
    teacher = _teacher_of(module)
    names, nb = list(module.class_names), module.num_base_classes
    with torch.no_grad():
        if classes:
            text = TextFeatureCache(None).get(teacher, list(classes))
            groups = {_prompt_key(n): ("base" if i < nb else "new") for i, n in enumerate(names)}
            chosen = [(n, groups.get(_prompt_key(n), "other")) for n in classes]
        else:
            if hasattr(module, "student"):
                full = module.teacher.text_features(names)
            else:
                full = TextFeatureCache(None).get(teacher, names)
            part = slice(0, nb) if base_only else slice(nb, None) if new_only else slice(None)
            text = full[part]
            chosen = [(n, "base" if i < nb else "new") for i, n in enumerate(names)][part]
    if not chosen:
        raise ValueError(f"no class to export: the checkpoint has {nb} base and {len(names) - nb} new classes")
    if hasattr(module, "student"):
        classifier = CLIPImageClassifier.from_student(module.student, text)
    else:
        classifier = CLIPImageClassifier.from_prompted_clip(teacher, text)
    classifier = classifier.float()
    class_list = [{"index": i, "name": n, "group": g} for i, (n, g) in enumerate(chosen)]
    return classifier, class_list


# -- export --------------------------------------------------------------------------------------------------
def _load_clip_images(source: str | os.PathLike | None, image_size: int, limit: int = 32) -> Tensor | None:
    from abkd_vision.data.base_to_new import clip_eval_transform
    from abkd_vision.export import _load_images

    return _load_images(source, image_size, limit=limit, transform=clip_eval_transform(image_size))


def _tensor_dtype(state: dict) -> str:
    dtypes = {str(v.dtype).replace("torch.", "") for v in state.values()
              if torch.is_tensor(v) and v.is_floating_point()}
    return ", ".join(sorted(dtypes)) or "none"


def export_clip(ckpt_path: str | os.PathLike, out: str | os.PathLike, images: str | os.PathLike | None = None,
                classes: list[str] | None = None, base_only: bool = False, new_only: bool = False,
                atol: float = 1e-4, trusted: bool = False, teacher_ckpt: str | None = None,
                overrides: dict | None = None, latency_repeats: int = 10, ckpt: dict | None = None) -> dict:
    """Write ``model.onnx``, ``model.pt``, ``classes.json`` and ``export.json`` into ``out``; returns the report."""
    import onnxruntime as ort

    from abkd_vision.export import ExportError, _latency_ms, read_checkpoint

    ckpt_path = Path(ckpt_path)
    if ckpt is None:
        ckpt = read_checkpoint(ckpt_path, trusted)
    module = clip_module_from_checkpoint(ckpt_path, ckpt, teacher_ckpt, overrides)
    kind = type(module).__name__
    classifier, class_list = clip_classifier(module, classes, base_only, new_only)
    config = classifier.config()
    size = config["image_size"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    state_path = out / "model.pt"
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in classifier.state_dict().items()}, buf)
    atomic_write(state_path, buf.getvalue())
    atomic_write(out / "classes.json", json.dumps(class_list, indent=1) + "\n")

    onnx_path = out / "model.onnx"
    check = _load_clip_images(images, size)
    real = check is not None
    if check is None:
        check = torch.randn(16, 3, size, size, generator=torch.Generator().manual_seed(0))
    example = check[:2] if len(check) >= 2 else check.repeat(2, 1, 1, 1)  # batch 1 would be specialised
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter narrates its passes
        program = torch.onnx.export(classifier, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"images": {0: torch.export.Dim("batch")}}, dynamo=True)
    program.save(str(onnx_path))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = classifier(check).numpy()
    got = session.run(None, {"images": check.numpy()})[0]
    max_diff = float(np.abs(got - expected).max())
    if not max_diff <= atol:
        raise ExportError(f"ONNX logits differ from PyTorch's by {max_diff:.3g} > atol={atol} on {len(check)} "
                          "images; the exported model is not faithful (file kept for inspection)")

    teacher = _teacher_of(module)
    names = [c["name"] for c in class_list]

    def teacher_forward(x: Tensor) -> Tensor:  # a CLIP without stored class vectors: both towers every call
        return teacher(x, teacher.encode_text(names))

    latency, teacher_latency = {}, {}
    repeats, warmup = max(1, int(latency_repeats)), min(3, max(1, int(latency_repeats)))
    with torch.no_grad():
        for b in (1, 8):
            x = torch.randn(b, 3, size, size)
            latency[f"torch_ms_batch{b}"] = round(_latency_ms(classifier, x, repeats, warmup), 3)
            latency[f"onnxruntime_ms_batch{b}"] = round(
                _latency_ms(lambda t: session.run(None, {"images": t.numpy()}), x, repeats, warmup), 3)
            teacher_latency[f"torch_ms_batch{b}"] = round(_latency_ms(teacher_forward, x, repeats, warmup), 3)
    hp = ckpt.get("hyper_parameters") or {}
    counts = {g: sum(c["group"] == g for c in class_list) for g in GROUPS}
    report = {
        "module": kind,
        "student": hp.get("student_arch", hp.get("arch")),
        "teacher": hp.get("teacher_arch", hp.get("arch")),
        "checkpoint_dtype": _tensor_dtype(ckpt.get("state_dict") or {}),
        "exported_dtype": "float32",
        "classifier": config,
        "classes": {"count": len(class_list), **counts, "source": "--classes" if classes else
                    "base" if base_only else "new" if new_only else "all"},
        "image_size": size,
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "class_vectors": list(classifier.text_features.shape),
        "state_dict_mb": round(state_path.stat().st_size / 2**20, 3),
        "onnx_mb": round(onnx_path.stat().st_size / 2**20, 3),
        "checked_on": f"{len(check)} {'real' if real else 'random'} images",
        "onnx_max_abs_diff": max_diff,
        "latency_cpu": {**latency, "threads": torch.get_num_threads(), "repeats": repeats},
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "teacher_latency_cpu": {**teacher_latency, "forward": "image tower + text tower over the classes"},
        "speedup_batch1": round(teacher_latency["torch_ms_batch1"] / latency["torch_ms_batch1"], 2),
        "speedup_batch8": round(teacher_latency["torch_ms_batch8"] / latency["torch_ms_batch8"], 2),
    }
    atomic_write(out / "export.json", json.dumps(report, indent=2) + "\n")
    return report


def print_report(report: dict, out: Path) -> None:
    lat, t = report["latency_cpu"], report["teacher_latency_cpu"]
    c = report["classes"]
    what = "student" if report["module"] == "PromptDistillationModule" else "prompt-tuned image tower of"
    print(f"{report['module']} {what} {report['student']}: {report['parameters']:,} parameters, "
          f"{c['count']} classes ({c['base']} base, {c['new']} new, {c['other']} other), state dict "
          f"{report['state_dict_mb']} MB, ONNX {report['onnx_mb']} MB, max |ONNX - PyTorch| "
          f"{report['onnx_max_abs_diff']:.2e} ({report['checked_on']}); CPU ms batch 1/8: PyTorch "
          f"{lat['torch_ms_batch1']}/{lat['torch_ms_batch8']}, onnxruntime {lat['onnxruntime_ms_batch1']}/"
          f"{lat['onnxruntime_ms_batch8']}")
    print(f"teacher {report['teacher']} (image + text towers): {report['teacher_parameters']:,} parameters, CPU ms "
          f"batch 1/8: {t['torch_ms_batch1']}/{t['torch_ms_batch8']} ({report['speedup_batch8']}x the student's "
          "time at batch 8)")
    print(f"written: {out / 'model.onnx'}, {out / 'model.pt'}, {out / 'classes.json'}, {out / 'export.json'}")
