"""What a sweep runs: a grid of (method, setting, seed, overrides), each run a ``run.py fit`` of composed configs.

A run file is ``<root>/<method>/<setting>.yaml`` (``configs/cifar100/abkd/resnet32x4-resnet8x4.yaml``,
``configs/base_to_new/abkd/EuroSAT.yaml``): the method is its folder, the setting its stem. It is composed after
a shared base file (``<root>/base.yaml`` by default), exactly as one would run it by hand. Everything here is
checked before any run starts; problems raise :class:`SweepError` naming the choices that do exist.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DIVERGENCE", "OWNED_ARGS", "Run", "SweepError", "alpha_beta_overrides", "check_alpha_beta",
           "check_extra", "dedupe", "expand_grid", "parse_run_id", "parse_set", "runs_from_files", "short_keys",
           "split_extra"]

DIVERGENCE = "model.init_args.head.init_args.divergence"
# Arguments the sweep sets itself for every run (the run folder and the seed): not allowed in --extra or --set.
OWNED_ARGS = ("seed_everything", "trainer.logger")
_MAX_ID = 150


class SweepError(ValueError):
    """A sweep that cannot start (unknown method, setting or file; a malformed override)."""


def short_keys(keys: Sequence[str]) -> list[str]:
    """Shortest dotted suffix of each key (``init_args`` dropped) that tells it apart from the other keys.

    ``["model.init_args.kd_weight", "model.init_args.head.init_args.divergence.init_args.alpha"]`` ->
    ``["kd_weight", "alpha"]``; two ``temperature`` keys become ``head.temperature`` and ``model.temperature``.
    """
    parts = [[p for p in k.split(".") if p != "init_args"] or [k] for k in keys]
    out = []
    for i, mine in enumerate(parts):
        n = 1
        while n < len(mine) and any(j != i and other[-n:] == mine[-n:] for j, other in enumerate(parts)):
            n += 1
        out.append(".".join(mine[-n:]))
    return out


def _clean(part: str) -> str:
    """Filename-safe: letters, digits and ``. = + -``; other runs of characters become one ``_``; never ``__``."""
    part = re.sub(r"[^A-Za-z0-9.=+-]+", "_", str(part)).strip("_")
    return re.sub(r"_{2,}", "_", part).lstrip(".") or "x"


@dataclass(frozen=True)
class Run:
    """One run of a sweep. ``overrides`` are ``(dotted key, value)`` pairs passed to run.py as ``--key value``."""

    method: str
    setting: str
    seed: int
    configs: tuple[str, ...]
    overrides: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        """The overrides in short form, ``kd_weight=2 alpha=0.8`` (empty without overrides)."""
        shorts = short_keys([k for k, _ in self.overrides])
        return " ".join(f"{s}={v}" for s, (_, v) in zip(shorts, self.overrides))

    @property
    def run_id(self) -> str:
        """Deterministic, readable and filename-safe: ``abkd__EuroSAT__seed1__kd_weight=200``.

        Parts are joined by ``__`` (never inside a part). An id longer than 150 characters keeps its start and
        ends with a hash of the whole, so it stays unique.
        """
        shorts = short_keys([k for k, _ in self.overrides])
        parts = [_clean(self.method), _clean(self.setting), f"seed{self.seed}"]
        parts += [f"{_clean(s)}={_clean(v)}" for s, (_, v) in zip(shorts, self.overrides)]
        run_id = "__".join(parts)
        if len(run_id) > _MAX_ID:
            digest = hashlib.sha1(run_id.encode()).hexdigest()[:10]
            run_id = run_id[: _MAX_ID - 12].rstrip("_") + "__" + digest
        return run_id

    def args(self) -> list[str]:
        out = [arg for path in self.configs for arg in ("--config", path)]
        out += ["--seed_everything", str(self.seed)]
        for key, value in self.overrides:
            out += [f"--{key}", value]
        return out

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "method": self.method, "setting": self.setting, "seed": self.seed,
                "configs": list(self.configs), "overrides": [list(kv) for kv in self.overrides], "label": self.label}

    @classmethod
    def from_dict(cls, d: dict) -> Run:
        return cls(d["method"], d["setting"], int(d["seed"]), tuple(d.get("configs", ())),
                   tuple((k, v) for k, v in d.get("overrides", [])))


def parse_run_id(run_id: str) -> dict | None:
    """``method__setting__seedN[__key=value...]`` -> ``{"method", "setting", "seed", "label"}`` (None otherwise).

    Used for run folders that carry no sweep record (copied in, or written by hand)."""
    parts = run_id.split("__")
    if len(parts) < 3 or not re.fullmatch(r"seed-?\d+", parts[2]):
        return None
    return {"run_id": run_id, "method": parts[0], "setting": parts[1], "seed": int(parts[2][4:]),
            "overrides": [], "label": " ".join(parts[3:])}


def _split_values(values: str) -> list[str]:
    """Split on commas outside brackets: ``1,2`` -> 2 values, ``[25,35],[30,40]`` -> 2 lists."""
    out, depth, current = [], 0, []
    for ch in values:
        if ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return [v.strip() for v in out if v.strip()]


def _owned(key: str) -> bool:
    return any(key == o or key.startswith(o + ".") for o in OWNED_ARGS)


def parse_set(spec: str) -> list[tuple[str, str]]:
    """``"model.init_args.kd_weight=100,200"`` -> ``[(key, "100"), (key, "200")]`` (lists keep their commas:
    ``model.init_args.lr_milestones=[150,180],[100,150]``)."""
    key, sep, values = spec.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key or not values.strip():
        raise SweepError(f"--set expects key=value[,value...], got {spec!r} (e.g. model.init_args.kd_weight=1,2)")
    if _owned(key):
        raise SweepError(f"--set {key}: the sweep sets {key} itself (seeds: --seeds; run folders: --out)")
    return [(key, v) for v in _split_values(values)]


def alpha_beta_overrides(pairs: Iterable[str]) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """``["0.5,0.5", "0.8,0.2"]`` -> one (alpha, beta) override pair per grid point."""
    out = []
    for pair in pairs:
        try:
            alpha, beta = (float(p) for p in pair.split(","))
        except ValueError:
            raise SweepError(f"--alpha-beta expects alpha,beta pairs such as 0.8,0.2, got {pair!r}") from None
        if not (math.isfinite(alpha) and math.isfinite(beta)):
            raise SweepError(f"--alpha-beta {pair}: alpha and beta must be finite")
        out.append(((f"{DIVERGENCE}.init_args.alpha", repr(alpha)), (f"{DIVERGENCE}.init_args.beta", repr(beta))))
    return out


def _override_grid(sets: Sequence[str], alpha_beta: Sequence[str]) -> list[tuple[tuple[str, str], ...]]:
    axes = [[(kv,) for kv in parse_set(s)] for s in sets]
    if alpha_beta:
        axes.append(alpha_beta_overrides(alpha_beta))
    keys = [kv[0] for axis in axes for kv in axis[0]]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise SweepError(f"{', '.join(repeated)} given by more than one --set/--alpha-beta; give each key once")
    return [tuple(kv for group in combo for kv in group) for combo in itertools.product(*axes)] or [()]


def check_extra(extra: Sequence[str], overrides: Sequence[tuple[str, str]] = ()) -> None:
    """``--extra`` may not set what the sweep sets (seed, logger folder) nor a key that an override grid varies."""
    grid_keys = {k for k, _ in overrides}
    for token in extra:
        if not token.startswith("--"):
            continue
        key = token[2:].split("=", 1)[0]
        if _owned(key):
            raise SweepError(f"--extra {token}: the sweep sets {key} itself for every run "
                             "(seeds: --seeds; run folders: --out)")
        if key in grid_keys:
            raise SweepError(f"--extra {token}: {key} is also varied by --set/--alpha-beta; give it in one place")


def split_extra(extra: str | Sequence[str]) -> list[str]:
    if not isinstance(extra, str):
        return list(extra)
    try:
        return shlex.split(extra)
    except ValueError as err:
        raise SweepError(f"--extra {extra!r}: {err}") from None


def _load_yaml(path: str) -> dict:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SweepError(f"cannot read config {path}: {err}") from None
    return data if isinstance(data, dict) else {}


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_alpha_beta(runs: Sequence[Run]) -> None:
    """Every run of an ``--alpha-beta`` grid must have an alpha-beta divergence at ``DIVERGENCE`` in its configs."""
    seen = set()
    for run in runs:
        if not any(k.startswith(DIVERGENCE) for k, _ in run.overrides) or run.configs in seen:
            continue
        seen.add(run.configs)
        node: object = {}
        for path in run.configs:
            node = _merge(node, _load_yaml(path))  # type: ignore[arg-type]
        for part in DIVERGENCE.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        init = node.get("init_args") if isinstance(node, dict) else None
        cls = str(node.get("class_path", "")) if isinstance(node, dict) else ""
        if not ("AlphaBeta" in cls or (isinstance(init, dict) and {"alpha", "beta"} <= set(init))):
            raise SweepError(f"--alpha-beta: {run.configs[-1]} (method {run.method}) has no alpha-beta divergence at "
                             f"{DIVERGENCE} (found {cls or 'none'}); use it with the ab* methods")


def _choices(folder: Path, pattern: str) -> list[str]:
    return sorted(p.stem if p.is_file() else p.name for p in folder.glob(pattern)) if folder.is_dir() else []


def dedupe(runs: Iterable[Run]) -> list[Run]:
    """Drop repeats of the same run; two different runs with one id (e.g. ``a/kd/x.yaml`` and ``b/kd/x.yaml``)
    are an error, since they would share a run folder."""
    by_id: dict[str, Run] = {}
    for run in runs:
        other = by_id.setdefault(run.run_id, run)
        if other != run:
            raise SweepError(f"two different runs would share the run id {run.run_id}: {other.configs} with "
                             f"{other.overrides} and {run.configs} with {run.overrides}")
    return list(by_id.values())


def expand_grid(root: str | Path, methods: Sequence[str], settings: Sequence[str], seeds: Sequence[int],
                base: str | Path | None = None, sets: Sequence[str] = (), alpha_beta: Sequence[str] = ()) -> list[Run]:
    """Runs for ``<root>/<method>/<setting>.yaml`` x seeds x overrides, validated before anything starts."""
    root = Path(root)
    if not root.is_dir():
        raise SweepError(f"config root {root} does not exist (e.g. configs/cifar100 or configs/base_to_new)")
    known_methods = [m for m in _choices(root, "*") if (root / m).is_dir()]
    if not methods or not settings or not seeds:
        raise SweepError("a sweep needs at least one method (--methods), one setting (--settings) and one seed; "
                         f"methods under {root}: {', '.join(known_methods)}")
    problems = []
    unknown = [m for m in methods if m not in known_methods]
    if unknown:
        problems.append(f"unknown method(s) {', '.join(unknown)} under {root}; available: {', '.join(known_methods)}")
    for method in (m for m in methods if m in known_methods):
        known = _choices(root / method, "*.yaml")
        missing = [s for s in settings if s not in known]
        if missing:
            problems.append(f"unknown setting(s) {', '.join(missing)} for method {method} ({root / method}); "
                            f"available: {', '.join(known)}")
    base = Path(base) if base is not None else root / "base.yaml"
    if not base.is_file():
        problems.append(f"base config {base} does not exist; pass --base")
    if problems:
        raise SweepError("; ".join(problems))
    grid = _override_grid(sets, alpha_beta)
    runs = dedupe(Run(m, s, int(seed), (str(base.resolve()), str((root / m / f"{s}.yaml").resolve())), ov)
                  for m in dict.fromkeys(methods) for s in dict.fromkeys(settings) for seed in seeds for ov in grid)
    if alpha_beta:
        check_alpha_beta(runs)
    return runs


def _find_base(path: Path) -> Path | None:
    for folder in (path.parent, path.parent.parent):
        candidate = folder / "base.yaml"
        if candidate.is_file() and candidate.resolve() != path.resolve():
            return candidate
    return None


def runs_from_files(files: Sequence[str | Path], seeds: Sequence[int], base: str | Path | None = None,
                    sets: Sequence[str] = (), alpha_beta: Sequence[str] = ()) -> list[Run]:
    """Runs for explicit run files (method = parent folder, setting = stem) x seeds x overrides.

    Each run is ``base`` + one file. Without ``base``, the nearest ``base.yaml`` (the file's folder, then its
    parent) is used; ``base="none"`` runs the files alone.
    """
    if not files or not seeds:
        raise SweepError("a sweep needs at least one config file (--configs) and one seed")
    problems = []
    for f in map(Path, files):
        if not f.is_file():
            known = _choices(f.parent, "*.yaml")
            where = (f"available in {f.parent}: {', '.join(known)}" if known else f"folder {f.parent} "
                     + ("has no .yaml file" if f.parent.is_dir() else "does not exist"))
            problems.append(f"config file {f} does not exist; {where}")
    no_base = base is not None and str(base).lower() == "none"
    if base is not None and not no_base and not Path(base).is_file():
        problems.append(f"base config {base} does not exist")
    if problems:
        raise SweepError("; ".join(problems))
    grid = _override_grid(sets, alpha_beta)
    runs = []
    for path in map(Path, files):
        base_path = None if no_base else Path(base) if base is not None else _find_base(path)
        if base_path is None and not no_base:
            raise SweepError(f"no base.yaml next to {path} or in its parent folder: pass --base <file> "
                             "(or --base none to run the files alone)")
        configs = ((str(base_path.resolve()),) if base_path is not None else ()) + (str(path.resolve()),)
        runs += [Run(path.parent.name, path.stem, int(seed), configs, ov) for seed in seeds for ov in grid]
    runs = dedupe(runs)
    if alpha_beta:
        check_alpha_beta(runs)
    return runs
