"""Strict, safe loading of model weights from the checkpoint formats met in this suite.

Accepted layouts (weights are found, then a wrapper prefix is stripped so the keys fit the model):

* published RepDistiller/mdistiller teachers: ``{"epoch", "model": state_dict, "accuracy", "optimizer"}``;
* a raw state dict, optionally with the ``module.`` prefix of (Distributed)DataParallel;
* ``_orig_mod.`` segments added by ``torch.compile``;
* Lightning checkpoints: ``{"state_dict": ..., "epoch", ...}`` whose keys start with the LightningModule
  attribute holding the network (``model.`` for ``ClassifierModule``, ``student.`` for
  ``DistillationModule``); keys outside that prefix (the teacher, loss modules) are ignored.

Files are read with ``torch.load(weights_only=True)``, which cannot execute code; full unpickling has to be
requested with ``trusted=True``.
"""

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple, Union

import torch
from torch import nn

__all__ = ["CheckpointError", "load_checkpoint", "mismatch_message"]

_logger = logging.getLogger(__name__)

# Where the weights may sit inside a checkpoint dict, in order of preference.
_STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
# Top-level entries that are not returned as metadata (bulky training state).
_NOT_METADATA = {"optimizer", "optimizer_states", "lr_schedulers", "callbacks", "loops", *_STATE_DICT_KEYS}
_WRAPPER_PREFIXES = ("model.", "student.", "module.")
_MAX_LISTED = 25

MapLocation = Union[str, torch.device, Callable, Dict[str, str], None]


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded: unsafe content, no weights found, or keys/shapes not fitting the model."""


def load_checkpoint(
    model: nn.Module,
    path: Union[str, Path],
    *,
    trusted: bool = False,
    map_location: MapLocation = "cpu",
) -> Dict[str, Any]:
    """Load weights from ``path`` into ``model`` strictly and return the checkpoint's metadata.

    Args:
        model: the network (not the LightningModule) to fill; it stays on its device.
        path: checkpoint file (see the module docstring for the accepted layouts).
        trusted: unpickle arbitrary Python objects (``weights_only=False``). Only for files from a source
            you trust: unpickling can run arbitrary code.
        map_location: passed to ``torch.load``.

    Returns:
        The checkpoint's small top-level entries, e.g. ``{"epoch": 240, "accuracy": 75.61}`` (one-element
        tensors become Python numbers; optimizer/scheduler/callback state is left out).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file needs ``trusted=True``, holds no state dict, fits the model under several
            prefixes, or does not fit it (the message lists missing/unexpected keys and shape mismatches).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    obj = _torch_load(path, trusted, map_location)
    state_dict, metadata = _split(obj, path)
    state_dict = _fit_to_model(state_dict, model, path)
    model.load_state_dict(state_dict, strict=True)
    return metadata


def _torch_load(path: Path, trusted: bool, map_location: MapLocation) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted)
    except (RuntimeError, EOFError) as err:  # torch's reader: truncated zip archives, half-written files
        raise CheckpointError(
            f"cannot read checkpoint {path}: the file is truncated or corrupted "
            f"({str(err).splitlines()[0].split('. ')[0]}). "
            "Download or copy it again, or use an earlier checkpoint."
        ) from err
    except pickle.UnpicklingError as err:
        if trusted:
            raise
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise CheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it contains Python objects other "
            "than tensors and plain containers"
            + (f" (e.g. {found.group(1)})" if found else "")
            + ". If the file comes from a source "
            "you trust, call load_checkpoint(..., trusted=True) to unpickle it fully; never do this for files "
            "of unknown origin, since unpickling can execute arbitrary code."
        ) from err


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def _split(obj: Any, path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Separate the weights from the metadata of a loaded checkpoint."""
    if _is_state_dict(obj):
        return dict(obj), {}
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            value = obj.get(key)
            if isinstance(value, nn.Module):  # whole pickled model (only possible with trusted=True)
                value = value.state_dict()
            if _is_state_dict(value):
                return dict(value), _metadata(obj)
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointError(
        f"No state dict found in {path}: expected a dict of tensors or a dict with one of "
        f"{', '.join(_STATE_DICT_KEYS)}; found {found}"
    )


def _metadata(obj: Mapping) -> Dict[str, Any]:
    meta = {}
    for key, value in obj.items():
        if key in _NOT_METADATA:
            continue
        if torch.is_tensor(value):
            if value.numel() != 1:
                continue
            value = value.item()
        meta[key] = value
    return meta


def _strip(state_dict: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _weights_only(keys) -> set:
    # BatchNorm step counters are not weights; old checkpoints may lack them.
    return {k for k in keys if not k.endswith("num_batches_tracked")}


def _fit_to_model(state_dict: Dict[str, torch.Tensor], model: nn.Module, path: Path) -> Dict[str, torch.Tensor]:
    """Strip the wrapper prefix that makes the keys fit ``model``; raise with a full diff if none does."""
    # torch.compile wraps the network as ``_orig_mod``; no real layer has that name.
    state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
    expected = model.state_dict()
    wanted = _weights_only(expected)

    prefixes = [""] + list(_WRAPPER_PREFIXES)
    prefixes += [a + b for a in _WRAPPER_PREFIXES for b in _WRAPPER_PREFIXES if a != b]
    candidates = {p: _strip(state_dict, p) for p in prefixes}
    fitting = [p for p, sub in candidates.items() if _weights_only(sub) == wanted]
    if len(fitting) > 1:
        raise CheckpointError(
            f"Ambiguous checkpoint {path}: its keys fit {type(model).__name__} under several prefixes "
            f"({', '.join(repr(p) for p in fitting)}); extract the wanted sub-module's state dict first."
        )
    if fitting:
        prefix = fitting[0]
    else:  # report against the prefix that explains most keys
        prefix = max(prefixes, key=lambda p: len(_weights_only(candidates[p]) & wanted))
    sub = candidates[prefix]
    if prefix and len(sub) < len(state_dict):
        _logger.debug("%s: ignoring %d keys outside prefix %r", path, len(state_dict) - len(sub), prefix)

    # Keep state-dict order (model order for missing keys) so that the listing reads like the architecture.
    missing = [k for k in expected if k in wanted and k not in sub]
    unexpected = [k for k in sub if k not in expected]
    mismatched = [
        (k, list(v.shape), list(expected[k].shape))
        for k, v in sub.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(mismatch_message(path, model, prefix, missing, unexpected, mismatched))

    for key in set(expected) - set(sub):  # only num_batches_tracked left: keep the model's own counters
        sub[key] = expected[key]
    return sub


def _listing(items: List[str], sep: str = ", ") -> str:
    shown = sep.join(items[:_MAX_LISTED])
    return shown + (f"{sep}... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def mismatch_message(path, model, prefix, missing, unexpected, mismatched) -> str:
    """A readable diff of a state dict against ``model``: missing, unexpected and shape-mismatched keys."""
    lines = [
        f"Checkpoint {path} does not fit {type(model).__name__}"
        + (f" (after stripping prefix {prefix!r})" if prefix else "")
        + ":"
    ]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        shapes = [f"{k}: checkpoint {c} vs model {m}" for k, c, m in mismatched]
        # One mismatch per line: each carries two shapes and would be unreadable comma-joined.
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines.append("    " + _listing(shapes, sep="\n    "))
    return "\n".join(lines)
