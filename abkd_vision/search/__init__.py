"""Alpha-beta search with Optuna: ``python -m abkd_vision.search`` (TPE or an exact grid over (alpha, beta)).

Each trial is one distillation run through the real CLI; the objective is the run's best validation top-1
(``val/acc1``), reported every epoch so that unpromising trials are pruned. See ``docs/search.md``.
"""

from abkd_vision.search.space import SearchError, SearchSpace

__all__ = ["SearchError", "SearchSpace"]
