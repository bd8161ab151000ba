"""Run a sweep: skip finished runs, launch the rest on an executor, record failures, regenerate the outputs.

Each run is an independent ``python run.py fit ...`` process writing into ``<out>/runs/<run_id>/version_0/``,
its console output into ``<out>/logs/<run_id>.log``. A run counts as done only when its ``results.json`` says
``"finished": true``; anything else is rerun from scratch next time (its folder is cleared first). Executors:

* ``local``: a pool of ``workers`` processes on this machine (default);
* ``submitit``: one SLURM job per run (``submitit.AutoExecutor``), or submitit's local executor for testing;
* ``ray``: one Ray task per run on an existing cluster (``ray.init(address="auto")``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from abkd_vision.io import atomic_write
from abkd_vision.sweep.grid import Run
from abkd_vision.sweep.tables import collect_rows, read_result, write_outputs

__all__ = ["SweepOptions", "execute_run", "run_sweep"]

REPO = Path(__file__).resolve().parents[2]
EXECUTORS = ("local", "submitit", "ray")


@dataclass
class SweepOptions:
    out: Path
    run_script: Path = REPO / "run.py"
    extra: Sequence[str] = ()
    workers: int = 1
    executor: str = "local"
    submitit_local: bool = False
    slurm: dict = field(default_factory=dict)  # passed to submitit's update_parameters
    ray_address: str | None = None
    ray_gpus: float = 0.0


def execute_run(cmd: Sequence[str], log_path: str, cwd: str) -> int:
    """Run one command with its output in ``log_path``; the exit code (a picklable job for any executor)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        return subprocess.run(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env).returncode


def command(run: Run, opts: SweepOptions) -> list[str]:
    runs_dir = opts.out / "runs"
    return [sys.executable, str(opts.run_script), "fit", *run.args(),
            "--trainer.logger.init_args.save_dir", str(runs_dir), "--trainer.logger.init_args.name", run.run_id,
            "--trainer.logger.init_args.version", "0", *opts.extra]


def _manifest(out: Path, runs: Sequence[Run]) -> list[dict]:
    """Merge ``runs`` into ``<out>/manifest.json`` (keyed by run id, so rows never duplicate)."""
    path = out / "manifest.json"
    known = {}
    if path.is_file():
        known = {r["run_id"]: r for r in json.loads(path.read_text())}
    for run in runs:
        known[run.run_id] = run.to_dict()
    atomic_write(path, json.dumps(list(known.values()), indent=1) + "\n")
    return list(known.values())


def load_manifest(out: Path) -> list[dict]:
    path = out / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {out} is not a sweep folder (run a sweep into it first)")
    return json.loads(path.read_text())


def _submit(opts: SweepOptions, jobs: list[tuple[Run, list[str], str]]):
    """Start every job; yields ``(run, exit code)`` as they finish."""
    cwd = str(opts.run_script.parent)
    if opts.executor == "local":
        with ThreadPoolExecutor(max_workers=max(1, opts.workers)) as pool:
            futures = {pool.submit(execute_run, cmd, log, cwd): run for run, cmd, log in jobs}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
    elif opts.executor == "submitit":
        try:
            import submitit
        except ImportError:
            raise RuntimeError("the submitit executor needs submitit: pip install 'abkd-vision[sweep]'") from None
        folder = opts.out / "submitit"
        executor = (submitit.LocalExecutor(folder=folder) if opts.submitit_local
                    else submitit.AutoExecutor(folder=folder))
        params = {"timeout_min": 60 * 24, **opts.slurm}
        executor.update_parameters(**params)
        pending = {executor.submit(execute_run, cmd, log, cwd): run for run, cmd, log in jobs}
        while pending:
            for job in [j for j in pending if j.done()]:
                run = pending.pop(job)
                try:
                    code = job.result()
                except Exception:  # noqa: BLE001 -- a job killed by the scheduler counts as failed
                    code = -1
                yield run, code
            time.sleep(0.5)
    elif opts.executor == "ray":
        try:
            import ray
        except ImportError:
            raise RuntimeError("the ray executor needs ray: pip install 'ray[default]'") from None
        ray.init(address=opts.ray_address or "auto", ignore_reinit_error=True)
        task = ray.remote(num_gpus=opts.ray_gpus)(execute_run)
        pending = {task.remote(cmd, log, cwd): run for run, cmd, log in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield pending.pop(ref), ray.get(ref)
    else:
        raise ValueError(f"unknown executor {opts.executor!r}; choose one of {EXECUTORS}")


def run_sweep(runs: Sequence[Run], opts: SweepOptions, echo: Callable[[str], None] = print) -> tuple[list[dict], int]:
    """Run what is not finished yet, then write the outputs. Returns ``(rows, number of failed runs)``."""
    from tqdm import tqdm

    opts.out.mkdir(parents=True, exist_ok=True)
    planned = _manifest(opts.out, runs)
    todo = []
    for run in runs:
        run_dir = opts.out / "runs" / run.run_id / "version_0"
        if read_result(run_dir) is not None:
            continue
        shutil.rmtree(run_dir.parent, ignore_errors=True)  # an unfinished attempt: start clean, stay version_0
        todo.append((run, command(run, opts), str(opts.out / "logs" / f"{run.run_id}.log")))
    skipped = len(runs) - len(todo)
    echo(f"sweep: {len(runs)} runs, {skipped} already finished, {len(todo)} to run ({opts.executor} executor)")
    failed: dict[str, str] = {}
    start = {run.run_id: time.time() for run, _, _ in todo}
    with tqdm(total=len(todo), unit="run", dynamic_ncols=True, disable=not todo) as bar:
        for run, code in _submit(opts, todo):
            result = read_result(opts.out / "runs" / run.run_id / "version_0")
            minutes = (time.time() - start[run.run_id]) / 60
            log = opts.out / "logs" / f"{run.run_id}.log"
            if code == 0 and result is not None:
                metric = _headline(result)
                bar.write(f"done    {run.run_id}  {metric}  ({minutes:.1f} min)")
            else:
                failed[run.run_id] = str(log)
                bar.write(f"FAILED  {run.run_id}  exit {code}; log: {log}")
            bar.update(1)
    rows = collect_rows(planned, opts.out, failed)
    paths = write_outputs(rows, opts.out)
    echo(f"outputs: {paths['csv']}, {paths['tables']}, {paths['plot']}")
    return rows, len(failed)


def _headline(result: dict) -> str:
    if "reported" in result and result["reported"]:
        r = result["reported"]
        return f"base {100 * r['base_acc']:.2f} new {100 * r['new_acc']:.2f} HM {100 * r['hm']:.2f}"
    best = result.get("val_acc1_best")
    return f"best top-1 {100 * best:.2f}" if best is not None else ""
