"""Export a distilled (or any trained) network: a plain state dict and ONNX, verified and measured.

CLIP checkpoints (``PromptDistillationModule``, ``PromptTuningModule``) are exported by :mod:`abkd_vision.clip_export`
(an image classifier with the teacher's class vectors baked in; ``--classes``, ``--base-only``, ``--new-only``); the
CIFAR zoo as follows.

    python run.py export --ckpt runs/abkd/resnet32x4-resnet8x4/version_0/checkpoints/last.ckpt \\
        --images data/my_dataset --out exports/resnet8x4

reads a checkpoint of ``DistillationModule`` (its student) or ``ClassifierModule`` (its network) and writes
into ``--out``:

* ``model.pt``: the network's state dict, loadable by ``timm.create_model("cifar_<name>", num_classes=C)`` +
  ``abkd_vision.models.load_checkpoint`` (strict);
* ``model.onnx``: ONNX with a dynamic batch dimension (input ``images [B, 3, S, S]``, output ``logits [B, C]``),
  checked with onnxruntime against PyTorch's logits on real images (``--images``: an ImageFolder root whose
  ``test`` split is used, or an ``.npz`` with ``images`` uint8 [N, H, W, 3]) within ``--atol`` (1e-4);
* ``export.json``: model name, classes, parameter count, file sizes, the largest ONNX/PyTorch difference, and the
  CPU latency (median ms at batch 1 and 64, PyTorch and onnxruntime) next to the teacher's when the checkpoint
  names one (``--teacher-ckpt`` to point at its weights if the recorded path moved).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from abkd_vision.commands import command_prog
from abkd_vision.io import atomic_write
from abkd_vision.models import create_model, load_checkpoint, resolve_model_name

__all__ = ["export_network", "main", "network_from_checkpoint", "read_checkpoint"]


class ExportError(ValueError):
    """An export that cannot be done as asked (bad checkpoint, mismatch beyond tolerance, ...)."""


def read_checkpoint(path: str | Path, trusted: bool = False) -> dict:
    """A suite Lightning checkpoint read on the CPU (``weights_only`` unless ``trusted``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}; pass the run's checkpoints/last.ckpt (or best-*.ckpt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as err:  # noqa: BLE001 -- unpickling and zip errors alike get one message
        raise ExportError(f"cannot read {path}: {str(err).splitlines()[0]} (a suite Lightning checkpoint is "
                          "expected; trusted=True unpickles other objects)") from None
    return ckpt if isinstance(ckpt, dict) else {}


def _unsupported(path: str | Path, hp: dict) -> ExportError:
    from abkd_vision.clip_export import SUPPORTED_MODULES

    return ExportError(f"{path} is not a checkpoint export supports (its hyper_parameters have the keys "
                       f"{sorted(hp) or 'none'}): export works on Lightning checkpoints of {SUPPORTED_MODULES}. "
                       "A PromptKD student (model-best.pth.tar) loads into PromptDistillationModule with "
                       "student_ckpt; export that module's checkpoint.")


def network_from_checkpoint(path: str | Path, trusted: bool = False) -> tuple[nn.Module, dict]:
    """The trained network of a suite checkpoint and what is known about it: ``(network, info)``.

    ``info`` holds ``model`` (registered name), ``num_classes``, ``image_size`` and, for a distilled student,
    ``teacher`` / ``teacher_ckpt`` as recorded in its hyper-parameters.
    """
    ckpt = read_checkpoint(path, trusted)
    hp = ckpt.get("hyper_parameters", {}) or {}
    name = hp.get("student") or hp.get("model")
    if not isinstance(name, str):
        raise _unsupported(path, hp)
    info = {"model": resolve_model_name(name), "num_classes": int(hp.get("num_classes", 100)),
            "teacher": hp.get("teacher") if "student" in hp else None, "teacher_ckpt": hp.get("teacher_ckpt")}
    net = create_model(name, num_classes=info["num_classes"], **(hp.get("student_kwargs") or hp.get("model_kwargs")
                                                                  or {}))
    load_checkpoint(net, path, trusted=trusted)
    return net.eval(), info


def _load_images(source: str | Path | None, image_size: int, limit: int = 64, transform=None) -> torch.Tensor | None:
    """Up to ``limit`` evaluation images as ``transform`` (default: the CIFAR eval transform) gives them
    (``[N, 3, S, S]``)."""
    if source is None:
        return None
    from PIL import Image

    from abkd_vision.data.transforms import cifar_eval_transform

    transform = transform or cifar_eval_transform(image_size)
    source = Path(source)
    if source.suffix == ".npz":
        arrays = np.load(source)["images"][:limit]
        return torch.stack([transform(Image.fromarray(a)) for a in arrays])
    folder = source / "test" if (source / "test").is_dir() else source
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
    if not files:
        raise FileNotFoundError(f"no image found under {folder} (expected an ImageFolder root or an .npz file)")
    step = max(1, len(files) // limit)
    return torch.stack([transform(Image.open(p)) for p in files[::step][:limit]])


def _latency_ms(fn, batch: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time (ms) of ``fn(batch)`` over ``repeats`` calls after ``warmup`` untimed ones."""
    times = []
    for i in range(repeats + warmup):
        start = time.perf_counter()
        fn(batch)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _measure(net: nn.Module, image_size: int, session=None) -> dict:
    out = {}
    input_name = session.get_inputs()[0].name if session is not None else None

    def run_onnx(t: torch.Tensor):
        return session.run(None, {input_name: t.numpy()})

    with torch.no_grad():
        for b in (1, 64):
            x = torch.randn(b, 3, image_size, image_size)
            out[f"torch_ms_batch{b}"] = round(_latency_ms(net, x), 3)
            if session is not None:
                out[f"onnxruntime_ms_batch{b}"] = round(_latency_ms(run_onnx, x), 3)
    return out


def export_network(net: nn.Module, info: dict, out: str | Path, images: torch.Tensor | None = None,
                   image_size: int = 32, atol: float = 1e-4, teacher: nn.Module | None = None) -> dict:
    """Write ``model.pt``, ``model.onnx`` and ``export.json`` into ``out``; returns the report."""
    import onnxruntime as ort

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    net = net.eval()
    state_path = out / "model.pt"
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, buf)
    atomic_write(state_path, buf.getvalue())
    onnx_path = out / "model.onnx"
    example = images[:2] if images is not None else torch.randn(2, 3, image_size, image_size)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter narrates its passes
        program = torch.onnx.export(net, (example,), input_names=["images"], output_names=["logits"],
                                    dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True)
    program.save(str(onnx_path))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    check = images if images is not None else torch.randn(16, 3, image_size, image_size)
    with torch.no_grad():
        expected = net(check).numpy()
    got = session.run(None, {session.get_inputs()[0].name: check.numpy()})[0]
    max_diff = float(np.abs(got - expected).max())
    if not max_diff <= atol:
        raise ExportError(f"ONNX logits differ from PyTorch's by {max_diff:.3g} > atol={atol} on {len(check)} "
                          "images; the exported model is not faithful (file kept for inspection)")
    report = {
        **info,
        "image_size": image_size,
        "parameters": sum(p.numel() for p in net.parameters()),
        "state_dict_mb": round(state_path.stat().st_size / 2**20, 3),
        "onnx_mb": round(onnx_path.stat().st_size / 2**20, 3),
        "checked_on": f"{len(check)} {'real' if images is not None else 'random'} images",
        "onnx_max_abs_diff": max_diff,
        "latency_cpu": {**_measure(net, image_size, session), "threads": torch.get_num_threads()},
    }
    if teacher is not None:
        report["teacher_parameters"] = sum(p.numel() for p in teacher.parameters())
        report["teacher_latency_cpu"] = _measure(teacher.eval(), image_size)
        report["speedup_batch64"] = round(report["teacher_latency_cpu"]["torch_ms_batch64"]
                                          / report["latency_cpu"]["torch_ms_batch64"], 2)
    atomic_write(out / "export.json", json.dumps(report, indent=2) + "\n")
    return report


def _hparam(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=command_prog("python -m abkd_vision.export"),
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint of DistillationModule or ClassifierModule (CIFAR "
                        "zoo), PromptDistillationModule or PromptTuningModule (CLIP)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--images", help="images to check the ONNX model on: an ImageFolder root (its test split; "
                        "for CLIP any folder of images, e.g. a dataset root) or an .npz of uint8 images")
    parser.add_argument("--image-size", type=int, default=32, help="CIFAR input size (CLIP: the model's own)")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--teacher-ckpt", help="CIFAR: the teacher's weights, for the size/latency comparison; "
                        "CLIP: the teacher's prompts if the recorded teacher_ckpt (init_ckpt) moved")
    parser.add_argument("--trusted", action="store_true", help="allow full unpickling (trusted files only)")
    clip = parser.add_argument_group("CLIP checkpoints")
    which = clip.add_mutually_exclusive_group()
    which.add_argument("--classes", help="a file of class names (one per line, or a JSON list): their class vectors "
                       "come from the teacher's prompted text tower now (open vocabulary)")
    which.add_argument("--base-only", action="store_true", help="only the dataset's base classes")
    which.add_argument("--new-only", action="store_true", help="only the dataset's new classes")
    clip.add_argument("--hparam", action="append", type=_hparam, default=[], metavar="KEY=VALUE",
                      help="replace a recorded hyper-parameter of the module, e.g. teacher_pretrained=/w/ViT-L-14.pt "
                      "(repeatable; VALUE is YAML)")
    clip.add_argument("--latency-repeats", type=int, default=10, help="timed calls per latency figure")
    args = parser.parse_args(argv)
    try:
        from abkd_vision import clip_export

        ckpt = read_checkpoint(args.ckpt, trusted=args.trusted)
        hp = ckpt.get("hyper_parameters", {}) or {}
        if clip_export.clip_module_kind(hp) is not None:
            classes = clip_export.read_class_names(args.classes) if args.classes else None
            report = clip_export.export_clip(args.ckpt, args.out, args.images, classes, args.base_only, args.new_only,
                                             args.atol, args.trusted, args.teacher_ckpt, dict(args.hparam),
                                             args.latency_repeats, ckpt=ckpt)
            clip_export.print_report(report, Path(args.out))
            return 0
        if not isinstance(hp.get("student") or hp.get("model"), str):
            raise _unsupported(args.ckpt, hp)
        if args.classes or args.base_only or args.new_only or args.hparam:
            raise ExportError("--classes, --base-only, --new-only and --hparam apply to CLIP checkpoints "
                              f"(PromptDistillationModule, PromptTuningModule); {args.ckpt} is a CIFAR-zoo checkpoint")
        net, info = network_from_checkpoint(args.ckpt, trusted=args.trusted)
        teacher = None
        teacher_ckpt = args.teacher_ckpt or info.get("teacher_ckpt")
        if info.get("teacher") and teacher_ckpt and Path(teacher_ckpt).is_file():
            teacher = create_model(info["teacher"], num_classes=info["num_classes"])
            load_checkpoint(teacher, teacher_ckpt, trusted=args.trusted)
        images = _load_images(args.images, args.image_size)
        report = export_network(net, info, args.out, images, args.image_size, args.atol, teacher)
    except (ExportError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    lat = report["latency_cpu"]
    line = (f"{report['model']}: {report['parameters']:,} parameters, state dict {report['state_dict_mb']} MB, "
            f"ONNX {report['onnx_mb']} MB, max |ONNX - PyTorch| {report['onnx_max_abs_diff']:.2e} "
            f"({report['checked_on']}); CPU ms batch 1/64: PyTorch {lat['torch_ms_batch1']}/"
            f"{lat['torch_ms_batch64']}, "
            f"onnxruntime {lat['onnxruntime_ms_batch1']}/{lat['onnxruntime_ms_batch64']}")
    print(line)
    if "teacher_latency_cpu" in report:
        t = report["teacher_latency_cpu"]
        print(f"teacher {info['teacher']}: {report['teacher_parameters']:,} parameters, CPU ms batch 1/64: "
              f"{t['torch_ms_batch1']}/{t['torch_ms_batch64']} ({report['speedup_batch64']}x slower at batch 64)")
    print(f"written: {Path(args.out) / 'model.pt'}, {Path(args.out) / 'model.onnx'}, {Path(args.out) / 'export.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
