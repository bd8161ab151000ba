"""The (alpha, beta) search space: continuous ranges for TPE or an exact grid, validated before any trial."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

ALPHA_KEY = "model.init_args.head.init_args.divergence.init_args.alpha"
BETA_KEY = "model.init_args.head.init_args.divergence.init_args.beta"


class SearchError(Exception):
    """A bad search input: printed as one message, exit code 2."""


def check_range(name: str, bounds) -> tuple[float, float]:
    """(low, high) with both finite and low < high, or a SearchError naming the bound."""
    if bounds is None or len(bounds) != 2:
        raise SearchError(f"--{name}-range takes two numbers, the lower and the upper bound, e.g. "
                          f"--{name}-range 0 1.5")
    low, high = (float(b) for b in bounds)
    for label, value in (("lower", low), ("upper", high)):
        if not math.isfinite(value):
            raise SearchError(f"{name} range [{low}, {high}]: the {label} bound {value} is not a finite number")
    if low == high:
        raise SearchError(f"{name} range [{low}, {high}] is empty: the lower bound {low} must be below the upper "
                          f"bound {high}")
    if low > high:
        raise SearchError(f"{name} range [{low}, {high}] is inverted: the lower bound {low} must be below the upper "
                          f"bound {high}")
    return low, high


def check_grid(name: str, values) -> list[float]:
    """Sorted distinct finite grid values, or a SearchError naming the bad one."""
    if not values:
        raise SearchError(f"--grid-{name} needs at least one value")
    out = []
    for v in values:
        v = float(v)
        if not math.isfinite(v):
            raise SearchError(f"--grid-{name}: {v} is not a finite number")
        if v not in out:
            out.append(v)
    return sorted(out)


@dataclass
class SearchSpace:
    """Either ``grid`` (alpha values x beta values, every point once) or TPE over the two ranges."""

    alpha_range: tuple[float, float] = (0.0, 1.5)
    beta_range: tuple[float, float] = (-0.5, 1.5)
    grid_alpha: list[float] = field(default_factory=list)
    grid_beta: list[float] = field(default_factory=list)

    @property
    def is_grid(self) -> bool:
        return bool(self.grid_alpha)

    @classmethod
    def from_args(cls, alpha_range, beta_range, grid_alpha, grid_beta) -> SearchSpace:
        if bool(grid_alpha) != bool(grid_beta):
            given, missing = ("alpha", "beta") if grid_alpha else ("beta", "alpha")
            raise SearchError(f"grid mode needs both --grid-alpha and --grid-beta (--grid-{given} given, "
                              f"--grid-{missing} missing)")
        if grid_alpha:
            return cls(grid_alpha=check_grid("alpha", grid_alpha), grid_beta=check_grid("beta", grid_beta))
        return cls(alpha_range=check_range("alpha", alpha_range), beta_range=check_range("beta", beta_range))

    @property
    def grid_size(self) -> int:
        return len(self.grid_alpha) * len(self.grid_beta)

    def suggest(self, trial) -> tuple[float, float]:
        """The trial's (alpha, beta). In grid mode the GridSampler fixes them (the ranges just cover the grid)."""
        if self.is_grid:
            alpha = trial.suggest_float("alpha", min(self.grid_alpha), max(self.grid_alpha))
            beta = trial.suggest_float("beta", min(self.grid_beta), max(self.grid_beta))
        else:
            alpha = trial.suggest_float("alpha", *self.alpha_range)
            beta = trial.suggest_float("beta", *self.beta_range)
        return float(alpha), float(beta)

    def sampler(self, seed: int | None):
        import optuna

        if self.is_grid:
            return optuna.samplers.GridSampler({"alpha": self.grid_alpha, "beta": self.grid_beta}, seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def to_dict(self) -> dict:
        if self.is_grid:
            return {"mode": "grid", "grid_alpha": self.grid_alpha, "grid_beta": self.grid_beta}
        return {"mode": "tpe", "alpha_range": list(self.alpha_range), "beta_range": list(self.beta_range)}

    @classmethod
    def from_dict(cls, d: dict) -> SearchSpace:
        if d.get("mode") == "grid":
            return cls(grid_alpha=list(d["grid_alpha"]), grid_beta=list(d["grid_beta"]))
        return cls(alpha_range=tuple(d["alpha_range"]), beta_range=tuple(d["beta_range"]))

    def describe(self) -> str:
        if self.is_grid:
            return (f"grid alpha {self.grid_alpha} x beta {self.grid_beta} ({self.grid_size} points)")
        return f"TPE over alpha [{self.alpha_range[0]}, {self.alpha_range[1]}], beta [{self.beta_range[0]}, " \
               f"{self.beta_range[1]}]"
