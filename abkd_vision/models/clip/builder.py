"""Build a frozen open_clip CLIP from an architecture name and pretrained weights (a tag or a local file).

``build_clip("ViT-B-16-quickgelu", "openai")`` or ``build_clip("ViT-B-16-quickgelu", "/weights/ViT-B-16.pt")``.
Any open_clip architecture with a built-in text tower works the same way (``open_clip.list_models()``).

Weights (``pretrained``):

* an open_clip tag (``open_clip.list_pretrained_tags_by_model(arch)``, e.g. ``"openai"``), fetched and cached by
  open_clip itself;
* a local file: an OpenAI TorchScript archive (``ViT-B-16.pt``, ``ViT-L-14.pt`` as CoOp/PromptKD keep them),
  a ``torch.save`` state dict (optionally under ``"state_dict"``), or a ``.safetensors`` file;
* ``None``: random weights (tests, or weights loaded later).

OpenAI's CLIPs were trained with QuickGELU. open_clip's ``ViT-B-16`` config uses nn.GELU, so OpenAI weights in it
run, but lose accuracy without any error. Here that mismatch is an error naming the ``-quickgelu`` config when
open_clip has one, and otherwise saying to set ``quick_gelu`` in the model config. A TorchScript archive is always
OpenAI's; a safetensors file can declare ``quick_gelu`` in its metadata (the :func:`convert_openai_archive` helper
writes it); for a plain state dict nothing can be checked.

Custom architectures: register an open_clip model config (a JSON file, a folder of them, or a dict) with
``open_clip.add_model_config`` before building (see ``docs/base-to-new.md``), then pass its name as ``arch``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
from torch import nn

from abkd_vision.models.checkpoint import CheckpointError, mismatch_message

__all__ = [
    "CLIPWeightsError",
    "build_clip",
    "convert_openai_archive",
    "get_tokenizer",
    "read_clip_state_dict",
    "register_clip_config",
    "resolve_arch",
]

log = logging.getLogger(__name__)

# Integer attributes of OpenAI's TorchScript archives that are not weights.
_OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")


class CLIPWeightsError(CheckpointError):
    """CLIP weights that do not fit the requested architecture, or that cannot be found."""


_REQUIRED_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_DICT_CONFIG_DIR: Path | None = None  # where configs given as dicts are written (one folder per process)


def register_clip_config(config: str | os.PathLike | dict, name: str | None = None) -> str:
    """Register an open_clip model config and return its architecture name.

    Args:
        config: a JSON file (registered under its file name without ``.json``, as open_clip names configs) or a
            dict in open_clip's config format (``embed_dim``, ``vision_cfg``, ``text_cfg``, optional
            ``quick_gelu``; see the JSON files of ``open_clip/model_configs/``).
        name: the architecture name for a dict (required then); for a file it must be the file's stem if given.

    Both go through ``open_clip.add_model_config``; a dict is written to a JSON file of a per-process temporary
    folder first (open_clip registers files, not dicts), so a later rescan by open_clip keeps it; the folder is
    removed when the process exits.
    """
    global _DICT_CONFIG_DIR
    if isinstance(config, dict):
        if not name:
            raise ValueError("register_clip_config(dict) needs name=<architecture name>")
        cfg, source = config, f"the config dict for {name!r}"
    else:
        path = Path(config).expanduser()
        if not path.is_file() or path.suffix != ".json":
            raise FileNotFoundError(f"open_clip model config not found: {path} (a .json file is expected)")
        if name is not None and name != path.stem:
            raise ValueError(f"open_clip names a config file by its stem: {path} registers {path.stem!r}, not "
                             f"{name!r}; rename the file")
        name, source = path.stem, str(path)
        try:
            cfg = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(f"{path} is not a JSON open_clip model config: {err}") from None
    missing = [k for k in _REQUIRED_CONFIG_KEYS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{source} is no open_clip model config: it lacks {', '.join(missing)} (open_clip would "
                         "skip it silently); see open_clip's model_configs/*.json for the format")
    if isinstance(config, dict):
        if _DICT_CONFIG_DIR is None:
            _DICT_CONFIG_DIR = Path(tempfile.mkdtemp(prefix="abkd-clip-configs-"))
            # the files live as long as the process that registered them (open_clip may rescan them until then)
            atexit.register(shutil.rmtree, _DICT_CONFIG_DIR, ignore_errors=True)
        path = _DICT_CONFIG_DIR / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=2))
    if open_clip.get_model_config(name) != cfg or not any(Path(str(p)) == path
                                                          for p in open_clip.factory._MODEL_CONFIG_PATHS):
        open_clip.add_model_config(path)
    return name


def resolve_arch(arch: str) -> str:
    """``arch`` itself, or for the path of a ``.json`` model config the name it is registered under."""
    if isinstance(arch, (str, os.PathLike)) and str(arch).endswith(".json"):
        return register_clip_config(arch)
    return arch


def _check_arch(arch: str) -> dict:
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        names = open_clip.list_models()
        hint = [n for n in names if n.lower().startswith(arch.lower().split("-")[0])][:12] or names[:12]
        raise ValueError(
            f"unknown open_clip architecture {arch!r}; e.g. {', '.join(hint)} "
            f"(all {len(names)}: open_clip.list_models()). The paper's pair is ViT-L-14-quickgelu (teacher) and "
            "ViT-B-16-quickgelu (student). A custom architecture: pass the path of its .json model config, or "
            "register it first (open_clip.add_model_config / abkd_vision.models.clip.register_clip_config)."
        )
    text_cfg = cfg.get("text_cfg", {})
    if cfg.get("custom_text") or "hf_model_name" in text_cfg or "multimodal_cfg" in cfg:
        raise ValueError(
            f"open_clip architecture {arch!r} has a custom or Hugging Face text tower; the prompt learners need "
            "open_clip's own CLIP text transformer (e.g. ViT-B-16-quickgelu, ViT-L-14-quickgelu)"
        )
    return cfg


def _quickgelu_variant(arch: str, quick_gelu: bool) -> str | None:
    """The registered open_clip architecture that is ``arch`` with (or without) QuickGELU, or None.

    open_clip registers ``<name>-quickgelu`` twins for its OpenAI-style configs only; a custom config has none
    unless one was registered (then its ``quick_gelu`` flag must say so)."""
    base = arch[: -len("-quickgelu")] if arch.endswith("-quickgelu") else arch
    name = f"{base}-quickgelu" if quick_gelu else base
    if name == arch:
        return None
    cfg = open_clip.get_model_config(name)
    return name if cfg is not None and bool(cfg.get("quick_gelu", False)) == quick_gelu else None


def _check_quickgelu(arch: str, cfg: dict, weights_quick_gelu: bool | None, source: str) -> None:
    if weights_quick_gelu is None:
        return
    if bool(cfg.get("quick_gelu", False)) != weights_quick_gelu:
        want = _quickgelu_variant(arch, weights_quick_gelu)
        act = "QuickGELU" if weights_quick_gelu else "GELU"
        fix = (f"Use the architecture {want!r} instead." if want is not None else
               f"open_clip has no {act} variant of {arch!r}: set \"quick_gelu\": "
               f"{'true' if weights_quick_gelu else 'false'} in its model config (the JSON file or dict registered "
               "with open_clip.add_model_config, see docs/base-to-new.md) and register it under its own name.")
        raise CLIPWeightsError(
            f"{source} were trained with {act} but architecture {arch!r} uses "
            f"{'QuickGELU' if cfg.get('quick_gelu') else 'GELU'}: the model would run with a silent loss of "
            f"accuracy. {fix}"
        )


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a ``constants.pkl`` (``torch.save`` zips have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in z.namelist())


def read_clip_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], bool | None]:
    """Read CLIP weights from a local file: ``(state_dict, quick_gelu)``.

    ``quick_gelu`` is True for OpenAI TorchScript archives, the value declared in a safetensors file's metadata,
    and None when the file cannot tell. Plain pickles are read with ``weights_only=True``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"CLIP weights file not found: {path}. Pass an open_clip tag (e.g. pretrained='openai') on a machine "
            "with internet access, or the path of a local file (OpenAI .pt archive, state dict or .safetensors)."
        )
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
        flag = meta.get("quick_gelu")
        return state, (flag.lower() == "true") if flag is not None else None
    if _is_torchscript(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, OpenAI's archives are not
            archive = torch.jit.load(str(path), map_location="cpu")
        state = {k: v for k, v in archive.state_dict().items() if k not in _OPENAI_NON_WEIGHTS}
        return state, True
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 -- any unpickling failure gets the same clear message
        raise CLIPWeightsError(f"cannot read CLIP weights from {path}: {err}") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise CLIPWeightsError(f"{path} holds no CLIP state dict (a dict of tensors, optionally under 'state_dict')")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
    return {k: v for k, v in state.items() if k not in _OPENAI_NON_WEIGHTS}, None


def _load_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    expected = model.state_dict()
    # Non-persistent buffers (the text causal mask) are rebuilt by the model; archives may carry them.
    derived = {name for name, _ in model.named_buffers()} - set(expected)
    state = {k: v for k, v in state.items() if k not in derived}
    if "logit_scale" in state and state["logit_scale"].ndim != expected["logit_scale"].ndim:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, list(v.shape), list(expected[k].shape)) for k, v in state.items()
                  if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CLIPWeightsError(
            mismatch_message(path, model, "", missing, unexpected, mismatched)
            + f"\nThese weights are not a {arch!r} CLIP; pick the open_clip architecture they were trained with "
            "(ViT-B-16.pt -> ViT-B-16-quickgelu, ViT-L-14.pt -> ViT-L-14-quickgelu)."
        )
    model.load_state_dict(state, strict=True)


def build_clip(arch: str, pretrained: str | None = None, cache_dir: str | None = None) -> nn.Module:
    """An open_clip ``CLIP`` with its weights loaded, frozen (``requires_grad=False``) and in eval mode.

    Args:
        arch: open_clip architecture, e.g. ``"ViT-B-16-quickgelu"`` (``open_clip.list_models()``), or the path
            of a ``.json`` model config (registered under its file name, :func:`register_clip_config`).
        pretrained: an open_clip tag, a local weights file, or None for random weights.
        cache_dir: where open_clip caches downloaded weights (tags only).

    Raises:
        ValueError: unknown architecture (names close matches) or one without open_clip's CLIP text tower.
        CLIPWeightsError: the weights do not fit the architecture (lists the keys), QuickGELU does not match
            (names the config to use), or a tag cannot be fetched (says how to use a local file).
        FileNotFoundError: ``pretrained`` is neither a tag nor an existing file.
    """
    arch = resolve_arch(arch)
    cfg = _check_arch(arch)
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if pretrained is not None and pretrained in tags:
        tag_cfg = open_clip.get_pretrained_cfg(arch, pretrained)
        _check_quickgelu(arch, cfg, bool(tag_cfg.get("quick_gelu", False)), f"the {pretrained!r} weights")
        try:
            model = open_clip.create_model(arch, pretrained=pretrained, cache_dir=cache_dir, require_pretrained=True)
        except Exception as err:  # noqa: BLE001 -- network/hub failures come in many types
            raise CLIPWeightsError(
                f"could not fetch the {pretrained!r} weights of {arch!r} ({type(err).__name__}: {err}). Offline, "
                f"download them elsewhere and pass the file instead: pretrained=/path/to/weights "
                "(OpenAI's ViT-B-16.pt / ViT-L-14.pt archives work as they are)."
            ) from None
    elif pretrained is not None and not Path(pretrained).expanduser().is_file():
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither an open_clip tag of {arch!r} (tags: {', '.join(tags) or 'none'}) "
            "nor an existing file; pass a tag such as 'openai' or the path of a local weights file."
        )
    else:
        logging.disable(logging.WARNING)  # open_clip warns "initialized randomly"; the weights come next (or never)
        try:
            model = open_clip.create_model(arch, pretrained=None)
        finally:
            logging.disable(logging.NOTSET)
        if pretrained is not None:
            path = Path(pretrained).expanduser()
            state, quick_gelu = read_clip_state_dict(path)
            _check_quickgelu(arch, cfg, quick_gelu, f"the weights in {path}")
            _load_state_dict(model, state, path, arch)
            log.info("loaded CLIP %s weights from %s", arch, path)
    model.requires_grad_(False)
    return model.eval()


def get_tokenizer(arch: str):
    """open_clip's tokenizer for ``arch`` (OpenAI BPE for CLIP text towers: bundled with open_clip, offline)."""
    return open_clip.get_tokenizer(resolve_arch(arch))


def convert_openai_archive(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert an OpenAI TorchScript archive to a ``.safetensors`` file that records ``quick_gelu=true``.

    TorchScript loading may go away in future open_clip/torch releases; the converted file loads everywhere.
    """
    from safetensors.torch import save_file

    state, quick_gelu = read_clip_state_dict(src)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    meta = {"quick_gelu": "true" if quick_gelu else "false"} if quick_gelu is not None else {}
    save_file({k: v.contiguous() for k, v in state.items()}, str(dst), metadata=meta)
    return dst
