"""What a sweep runs: a grid of (method, setting, seed, overrides), each run a ``run.py fit`` of composed configs.

A run file is ``<root>/<method>/<setting>.yaml`` (``configs/cifar100/abkd/resnet32x4-resnet8x4.yaml``,
``configs/base_to_new/abkd/EuroSAT.yaml``): the method is its folder, the setting its stem. It is composed after
a shared base file (``<root>/base.yaml`` by default), exactly as one would run it by hand.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Run", "SweepError", "alpha_beta_overrides", "expand_grid", "parse_set", "runs_from_files"]

DIVERGENCE = "model.init_args.head.init_args.divergence"


class SweepError(ValueError):
    """A sweep that cannot start (unknown method, setting or file; a malformed override)."""


@dataclass(frozen=True)
class Run:
    """One run of a sweep. ``overrides`` are ``(dotted key, value)`` pairs passed to run.py as ``--key value``."""

    method: str
    setting: str
    seed: int
    configs: tuple[str, ...]
    overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def run_id(self) -> str:
        """Deterministic, readable and filename-safe: ``abkd__EuroSAT__seed1__kd_weight=200``."""
        parts = [self.method, self.setting, f"seed{self.seed}"]
        for key, value in self.overrides:
            short = "ab" if key.startswith(DIVERGENCE) and key.endswith(("alpha", "beta")) else ""
            leaf = key.rsplit(".", 1)[-1]
            parts.append(f"{short}{leaf}={value}")
        return re.sub(r"[^A-Za-z0-9_.=+-]", "_", "__".join(parts))

    def args(self) -> list[str]:
        out = [arg for path in self.configs for arg in ("--config", path)]
        out += ["--seed_everything", str(self.seed)]
        for key, value in self.overrides:
            out += [f"--{key}", value]
        return out

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "method": self.method, "setting": self.setting, "seed": self.seed,
                "configs": list(self.configs), "overrides": [list(kv) for kv in self.overrides]}

    @classmethod
    def from_dict(cls, d: dict) -> Run:
        return cls(d["method"], d["setting"], int(d["seed"]), tuple(d["configs"]),
                   tuple((k, v) for k, v in d.get("overrides", [])))


def parse_set(spec: str) -> list[tuple[str, str]]:
    """``"model.init_args.kd_weight=100,200"`` -> ``[(key, "100"), (key, "200")]``."""
    key, sep, values = spec.partition("=")
    if not sep or not key.strip() or not values.strip():
        raise SweepError(f"--set expects key=value[,value...], got {spec!r} (e.g. model.init_args.kd_weight=1,2)")
    return [(key.strip().lstrip("-"), v.strip()) for v in values.split(",") if v.strip()]


def alpha_beta_overrides(pairs: Iterable[str]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``["0.5,0.5", "0.8,0.2"]`` -> one (alpha, beta) override pair per grid point."""
    out = []
    for pair in pairs:
        parts = pair.split(",")
        try:
            alpha, beta = (float(p) for p in parts)
        except ValueError:
            raise SweepError(f"--alpha-beta expects alpha,beta pairs such as 0.8,0.2, got {pair!r}") from None
        out.append(((f"{DIVERGENCE}.init_args.alpha", repr(alpha)), (f"{DIVERGENCE}.init_args.beta", repr(beta))))
    return out


def _override_grid(sets: Sequence[str], alpha_beta: Sequence[str]) -> list[tuple[tuple[str, str], ...]]:
    axes = [[(kv,) for kv in parse_set(s)] for s in sets]
    if alpha_beta:
        axes.append(alpha_beta_overrides(alpha_beta))
    return [tuple(kv for group in combo for kv in group) for combo in itertools.product(*axes)] or [()]


def _choices(folder: Path, pattern: str) -> list[str]:
    return sorted(p.stem if p.is_file() else p.name for p in folder.glob(pattern)) if folder.is_dir() else []


def expand_grid(root: str | Path, methods: Sequence[str], settings: Sequence[str], seeds: Sequence[int],
                base: str | Path | None = None, sets: Sequence[str] = (), alpha_beta: Sequence[str] = ()) -> list[Run]:
    """Runs for ``<root>/<method>/<setting>.yaml`` x seeds x overrides, validated before anything starts."""
    root = Path(root)
    if not root.is_dir():
        raise SweepError(f"config root {root} does not exist (e.g. configs/cifar100 or configs/base_to_new)")
    base = Path(base) if base is not None else root / "base.yaml"
    if not base.is_file():
        raise SweepError(f"base config {base} does not exist; pass --base")
    known_methods = [m for m in _choices(root, "*") if (root / m).is_dir()]
    unknown = [m for m in methods if m not in known_methods]
    if unknown:
        raise SweepError(f"unknown method(s) {', '.join(unknown)} under {root}; "
                         f"choose from: {', '.join(known_methods)}")
    for method in methods:
        known = _choices(root / method, "*.yaml")
        missing = [s for s in settings if s not in known]
        if missing:
            raise SweepError(f"unknown setting(s) {', '.join(missing)} for method {method} ({root / method}); "
                             f"choose from: {', '.join(known)}")
    if not methods or not settings or not seeds:
        raise SweepError("a sweep needs at least one method, one setting and one seed")
    grid = _override_grid(sets, alpha_beta)
    return [Run(m, s, int(seed), (str(base), str(root / m / f"{s}.yaml")), ov)
            for m in methods for s in settings for seed in seeds for ov in grid]


def runs_from_files(files: Sequence[str | Path], seeds: Sequence[int], base: str | Path | None = None,
                    sets: Sequence[str] = (), alpha_beta: Sequence[str] = ()) -> list[Run]:
    """Runs for explicit run files (method = parent folder, setting = stem) x seeds x overrides."""
    runs = []
    grid = _override_grid(sets, alpha_beta)
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise SweepError(f"config file {path} does not exist")
        base_path = Path(base) if base is not None else path.parent.parent / "base.yaml"
        configs = ((str(base_path),) if base_path.is_file() else ()) + (str(path),)
        runs += [Run(path.parent.name, path.stem, int(seed), configs, ov) for seed in seeds for ov in grid]
    if not runs:
        raise SweepError("a sweep needs at least one config file and one seed")
    return runs
