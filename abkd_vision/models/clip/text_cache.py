"""The teacher's text features for a class list, computed once per teacher weights, in memory and on disk.

Prompt distillation classifies with the frozen teacher's prompted text features. Recomputing them every step
costs a full text-tower pass over all classes (about 5x slower training in the reference code); computing them
*before* the teacher's weights are loaded gives garbage features. The cache is keyed by the weights themselves:

* in memory by the class names and the version counters of every tensor of the model (PyTorch bumps a tensor's
  version on every in-place write, which is how ``load_state_dict`` and optimiser steps change weights), so a
  lookup costs no hashing and any weight change recomputes;
* on disk by a SHA-256 of the architecture, the prompt prefix, the class names and the bytes of every weight, so
  a later run with the same teacher and classes reads the file instead of running the text tower.

A file whose stored class names differ from the requested ones is an error, never a silent reuse.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from abkd_vision.io import atomic_write_with

__all__ = ["TextFeatureCache", "TextFeatureMismatchError", "weights_fingerprint"]

log = logging.getLogger(__name__)


class TextFeatureMismatchError(ValueError):
    """Cached text features whose class names are not the requested ones."""


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every tensor in ``module.state_dict()``."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _versions(module: nn.Module) -> tuple[int, ...]:
    return tuple(t._version for t in module.state_dict(keep_vars=True).values())


class TextFeatureCache:
    """``cache.get(model, class_names) -> [C, D]`` text features of a :class:`PromptedCLIP` teacher.

    Args:
        cache_dir: folder of the on-disk cache (one ``<key>.pt`` per teacher and class list); None = memory only.

    ``computed`` counts how often the text tower actually ran (tests and logs use it).
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.computed = 0
        self._key: tuple | None = None
        self._features: Tensor | None = None

    def key(self, model: nn.Module, class_names: list[str]) -> str:
        h = hashlib.sha256()
        h.update(f"{getattr(model, 'arch', type(model).__name__)}|{getattr(model, 'prompt_prefix', '')}|".encode())
        h.update("\x1f".join(class_names).encode())
        h.update(weights_fingerprint(model).encode())
        return h.hexdigest()[:32]

    def path(self, key: str) -> Path | None:
        return self.cache_dir / f"text_features-{key}.pt" if self.cache_dir is not None else None

    def get(self, model: nn.Module, class_names: list[str]) -> Tensor:
        """Text features ``[C, D]`` (as ``model.encode_text`` returns them), on the model's device."""
        names = list(class_names)
        device = next(model.parameters()).device
        mem_key = (id(model), tuple(names), _versions(model))
        if self._features is not None and self._key == mem_key:
            return self._features.to(device)
        features = None
        path = self.path(self.key(model, names)) if self.cache_dir is not None else None
        if path is not None and path.is_file():
            features = load_text_features(path, names)
            log.info("teacher text features read from %s", path)
        if features is None:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                features = model.encode_text(names).float()
            model.train(was_training)
            self.computed += 1
            if path is not None:
                save_text_features(path, features, names)
        self._key, self._features = mem_key, features.detach()
        return self._features.to(device)


def save_text_features(path: str | os.PathLike, features: Tensor, class_names: list[str]) -> None:
    """Write ``{"features", "class_names"}`` atomically (temporary file, then rename)."""
    atomic_write_with(path, lambda tmp: torch.save({"features": features.detach().cpu(),
                                                    "class_names": list(class_names)}, tmp))


def load_text_features(path: str | os.PathLike, class_names: list[str]) -> Tensor:
    """Read features written by :func:`save_text_features`, checking they belong to ``class_names``."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    stored = list(obj.get("class_names", []))
    if stored != list(class_names):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(stored, class_names)) if a != b][:5]
        raise TextFeatureMismatchError(
            f"text features in {path} are for {len(stored)} other class names than the {len(class_names)} requested "
            f"(first differences, stored vs requested: {'; '.join(diff) or 'different lengths'}); delete the file or "
            "use the teacher and dataset it was made for"
        )
    return obj["features"]
