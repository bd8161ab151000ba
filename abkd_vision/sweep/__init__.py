"""Sweeps: grids of runs (config files x seeds x overrides), resumable, on a local pool, SLURM (submitit) or
Ray, with results tables in the layouts of the papers. ``python -m abkd_vision.sweep --help``.

Importing this package does not import torch (the runs are subprocesses), so the command starts at once.
"""

from abkd_vision.sweep.grid import Run, SweepError, expand_grid, parse_run_id, runs_from_files
from abkd_vision.sweep.runner import SweepOptions, SweepResult, build_command, execute_run, run_sweep
from abkd_vision.sweep.tables import average_row, collect_rows, dataset_summary, harmonic_mean, mean_std, write_outputs

__all__ = ["Run", "SweepError", "SweepOptions", "SweepResult", "average_row", "build_command", "collect_rows",
           "dataset_summary", "execute_run", "expand_grid", "harmonic_mean", "mean_std", "parse_run_id",
           "run_sweep", "runs_from_files", "write_outputs"]
