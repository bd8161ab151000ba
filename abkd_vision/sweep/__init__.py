"""Sweeps: grids of runs (config files x seeds x overrides), resumable, on a local pool, SLURM (submitit) or
Ray, with results tables in the layouts of the papers. ``python -m abkd_vision.sweep --help``."""

from abkd_vision.sweep.grid import Run, SweepError, expand_grid, runs_from_files
from abkd_vision.sweep.runner import SweepOptions, run_sweep
from abkd_vision.sweep.tables import average_row, collect_rows, write_outputs

__all__ = ["Run", "SweepError", "SweepOptions", "average_row", "collect_rows", "expand_grid", "run_sweep",
           "runs_from_files", "write_outputs"]
