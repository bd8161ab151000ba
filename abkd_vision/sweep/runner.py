"""Run a sweep: skip finished runs, launch the rest on an executor, record failures, regenerate the outputs.

Each run is an independent ``python run.py fit ...`` process (working directory: the folder holding run.py)
writing into ``<out>/runs/<run_id>/version_0/``, its stdout + stderr into ``<out>/logs/<run_id>.log``. A run
counts as done only when its ``results.json`` says ``"finished": true`` (its planned epochs ran). Every run is
started with ``--resume auto``: an unfinished run that has a ``last.ckpt`` continues from it exactly; one
without is started afresh (its folder is removed first, so it stays ``version_0``).

Stopping: SIGINT or SIGTERM to the sweep sends SIGTERM to its runs, which save ``last.ckpt`` at the end of their
current step and exit with code 75 (recorded as ``preempted``; the next sweep continues them). Runs also get
SIGTERM when the sweep process dies in any other way (SIGKILL included: Linux's parent-death signal), so no run
is left behind. Executors:

* ``local``: a pool of ``workers`` runs at a time on this machine (threads waiting on subprocesses), optionally
  one run per listed GPU (``gpus``, through ``CUDA_VISIBLE_DEVICES``);
* ``submitit``: one SLURM array task per run (``submitit.AutoExecutor``), or submitit's ``LocalExecutor``; a job
  that SLURM preempts or times out is requeued by submitit (:class:`RunCommand` is checkpointable: the run saves
  ``last.ckpt`` first) and continues from it;
* ``ray``: one Ray task per run (``ray`` is imported only then).
"""

from __future__ import annotations

import ctypes
import os
import queue
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from abkd_vision.errors import PREEMPTED_EXIT_CODE
from abkd_vision.sweep.grid import Run, SweepError
from abkd_vision.sweep.store import (
    all_runs,
    finished_result,
    log_path,
    read_record,
    run_dir,
    write_manifest,
    write_record,
)
from abkd_vision.sweep.tables import collect_rows, headline, summary_line, write_outputs

__all__ = ["EXECUTORS", "RunCommand", "SweepOptions", "SweepResult", "build_command", "execute_run", "run_sweep"]

REPO = Path(__file__).resolve().parents[2]
EXECUTORS = ("local", "submitit", "ray")
# Environment of every run: Python warnings off (they only fill the logs) and unbuffered output, so a log is
# current while its run is going.
CHILD_ENV = {"PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
_ACTIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED"}


@dataclass
class SweepOptions:
    out: Path
    run_script: Path = REPO / "run.py"
    python: str = sys.executable
    extra: Sequence[str] = ()
    workers: int | None = None  # local: runs at a time (default 1); submitit/SLURM: array parallelism
    gpus: Sequence[str] = ()  # local: one run per listed GPU id at a time
    executor: str = "local"
    submitit_local: bool = False
    submitit: dict = field(default_factory=dict)  # update_parameters(): timeout_min, gpus_per_node, slurm_*, ...
    ray_address: str | None = None
    ray_gpus: float = 0.0
    ray_cpus: float = 1.0
    poll_seconds: float | None = None  # submitit: how often job states are polled
    cwd: Path | None = None  # where runs start (default: the folder holding run_script)
    rerun_changed: bool = False  # finished runs whose command changed run again (else: an error naming them)


@dataclass
class SweepResult:
    rows: list[dict]
    failed: list[str]  # run ids
    interrupted: bool = False
    paths: dict = field(default_factory=dict)
    preempted: list[str] = field(default_factory=list)  # stopped by a signal, continue next time

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else 1 if self.failed else PREEMPTED_EXIT_CODE if self.preempted else 0


@dataclass(frozen=True)
class _Job:
    run: Run
    cmd: tuple[str, ...]
    log: str
    cwd: str


# --- one run --------------------------------------------------------------------------------------------------

def build_command(run: Run, opts: SweepOptions) -> list[str]:
    """``python run.py fit --config ... --seed_everything N --key value ... --resume auto`` into the run's own
    folder (the same command starts the run and continues it)."""
    return [opts.python, str(opts.run_script), "fit", *run.args(), "--resume", "auto",
            "--trainer.logger.init_args.save_dir", str(Path(opts.out).resolve() / "runs"),
            "--trainer.logger.init_args.name", run.run_id, "--trainer.logger.init_args.version", "0", *opts.extra]


_LIVE: set[subprocess.Popen] = set()
_LIVE_LOCK = threading.Lock()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the thread that started it ends (the sweep process dies, even by
    SIGKILL); a no-op elsewhere."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_arguments(cmd: Sequence[str]) -> list[str]:
    """What makes a run this run: its command without the interpreter and run script (a new venv or checkout runs
    the same run) and without the logger's save_dir (a moved sweep folder holds the same runs)."""
    args = list(cmd[2:])
    if "--trainer.logger.init_args.save_dir" in args:
        i = args.index("--trainer.logger.init_args.save_dir")
        del args[i:i + 2]
    return args


def _pairs(args: Sequence[str]) -> list[tuple[str, str | None]]:
    out, i = [], 0
    while i < len(args):
        if args[i].startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append((args[i], args[i + 1]))
            i += 2
        else:
            out.append((args[i], None))
            i += 1
    return out


def command_change(recorded: Sequence[str], new: Sequence[str]) -> str:
    """How ``new`` differs from ``recorded`` (run arguments only): ``--key old -> new``, ``without ...``,
    ``with ...``."""
    old_pairs, new_pairs = _pairs(run_arguments(recorded)), _pairs(run_arguments(new))
    removed, added = list(old_pairs), []
    for pair in new_pairs:
        if pair in removed:
            removed.remove(pair)
        else:
            added.append(pair)

    def show(pair: tuple[str, str | None]) -> str:
        return pair[0] if pair[1] is None else f"{pair[0]} {shlex.quote(pair[1])}"

    parts = []
    for flag, value in list(added):
        before = next((r for r in removed if r[0] == flag), None)
        if before is not None:
            removed.remove(before)
            added.remove((flag, value))
            parts.append(f"{flag} {shlex.quote(str(before[1]))} -> {shlex.quote(str(value))}")
    parts += [f"without {show(r)}" for r in removed] + [f"with {show(a)}" for a in added]
    if not parts:
        return "the same arguments in another order"
    return "; ".join(parts[:6]) + (f"; and {len(parts) - 6} more" if len(parts) > 6 else "")


def execute_run(cmd: Sequence[str], log: str, cwd: str, env: dict | None = None) -> dict:
    """Run one command with its stdout + stderr in ``log``: ``{"exit_code", "seconds", "host"}``.

    The log is appended to: the attempts of a run that was stopped and continued follow each other.
    A plain top-level function, so that every executor can pickle it. In a multi-task SLURM job (one run over
    several GPUs) every task runs the command; tasks other than the first log to ``<log>.rank<N>``.
    """
    start = time.time()
    rank = int(os.environ.get("SLURM_PROCID") or os.environ.get("SUBMITIT_LOCAL_GLOBALID") or 0)
    log_file = Path(log if rank == 0 else f"{log}.rank{rank}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as f:  # a continued run's log follows the earlier attempts' logs
        f.write(f"{'' if f.tell() == 0 else chr(10)}# {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                f"$ cd {shlex.quote(cwd)} && {shlex.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env={**os.environ, **CHILD_ENV, **(env or {})},
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
        with _LIVE_LOCK:
            _LIVE.add(proc)
        try:
            code = proc.wait()
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(proc)
    return {"exit_code": code, "seconds": time.time() - start, "host": socket.gethostname()}


class RunCommand:
    """:func:`execute_run` as a submitit job that SLURM may preempt or time out: submitit then calls
    :meth:`checkpoint`, which stops the run (SIGTERM: it saves ``last.ckpt``) and asks for the same command to be
    requeued; being ``run.py fit ... --resume auto``, the requeued job continues from that checkpoint."""

    def __call__(self, cmd: Sequence[str], log: str, cwd: str, env: dict | None = None) -> dict:
        return execute_run(cmd, log, cwd, env)

    def checkpoint(self, cmd, log, cwd, env=None):
        import submitit

        _stop_children(grace_seconds=60.0)
        return submitit.helpers.DelayedSubmission(RunCommand(), cmd, log, cwd, env)


def _stop_children(grace_seconds: float = 30.0) -> None:
    """SIGTERM to every run of this process (each saves ``last.ckpt`` after its current step and exits with code
    75), then kill what is left after ``grace_seconds``."""
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.time() + grace_seconds
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def _mark_started(out: Path, job: _Job, **fields) -> None:
    write_record(out, job.run.run_id, run=job.run.to_dict(), started=time.time(), exit_code=None, log=job.log,
                 **fields)


# --- executors ------------------------------------------------------------------------------------------------

class _LocalBackend:
    """A thread pool; each thread waits on one run's subprocess. With ``gpus``, each run holds one GPU id."""

    name = "local"

    def __init__(self, opts: SweepOptions):
        if opts.gpus and opts.workers:
            raise SweepError("give --gpus or --workers, not both (--gpus 0 0 1 1 runs two at a time per GPU)")
        self.slots: queue.Queue = queue.Queue()
        for gpu in opts.gpus:
            self.slots.put(str(gpu))
        if opts.workers is not None and opts.workers < 1:
            raise SweepError(f"--workers must be at least 1, got {opts.workers}")
        self.workers = len(opts.gpus) or opts.workers or 1
        self.use_gpus = bool(opts.gpus)
        self.out, self.pool = opts.out, None

    def reattach(self, record: dict | None):
        return None

    def _one(self, job: _Job) -> dict:
        gpu = self.slots.get() if self.use_gpus else None
        try:
            _mark_started(self.out, job, status="running", executor=self.name, gpu=gpu)
            return execute_run(job.cmd, job.log, job.cwd, None if gpu is None else {"CUDA_VISIBLE_DEVICES": gpu})
        finally:
            if gpu is not None:
                self.slots.put(gpu)

    def run(self, jobs: Sequence[_Job], attached: Sequence = ()) -> Iterator[tuple[_Job, dict]]:
        self.pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sweep-run")
        try:
            futures = {self.pool.submit(self._one, job): job for job in jobs}
            for fut in as_completed(futures):
                yield futures[fut], fut.result()
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> str:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        _stop_children()
        return "runs in progress were stopped (each saved its last.ckpt; the same command continues them)"


class _SubmititBackend:
    """One job per run through submitit: a SLURM job array (AutoExecutor), or local processes (LocalExecutor)."""

    def __init__(self, opts: SweepOptions):
        try:
            import submitit
        except ImportError:
            raise SweepError("--executor submitit needs submitit: pip install 'abkd-vision[sweep]'") from None
        self.submitit, self.out = submitit, opts.out
        self.folder = Path(opts.out).resolve() / "submitit"
        params = dict(opts.submitit)
        params.setdefault("timeout_min", 24 * 60)
        if opts.submitit_local:
            self.name = "submitit-local"
            self.executor = submitit.LocalExecutor(folder=self.folder)
            # LocalExecutor understands timeout_min, gpus_per_node, tasks_per_node; the SLURM ones do not apply.
            params = {k: v for k, v in params.items() if k in ("timeout_min", "gpus_per_node", "tasks_per_node")}
            self.poll = opts.poll_seconds or 0.5
        else:
            if shutil.which("sbatch") is None:
                raise SweepError("--executor submitit: no SLURM on this machine (sbatch not found); "
                                 "--submitit-local runs the jobs as local processes")
            self.name = "submitit-slurm"
            try:
                self.executor = submitit.AutoExecutor(folder=self.folder, cluster="slurm")
            except RuntimeError as err:  # e.g. no srun
                raise SweepError(f"--executor submitit: {err}") from None
            params.setdefault("name", f"sweep-{Path(opts.out).name}")
            if opts.workers:
                params["slurm_array_parallelism"] = opts.workers
            self.poll = opts.poll_seconds or 15.0
        try:
            self.executor.update_parameters(**params)
        except (NameError, ValueError, TypeError, AssertionError) as err:
            raise SweepError(f"submitit parameters {params}: {err}") from None
        self.jobs: list = []

    def reattach(self, record: dict | None):
        """A SLURM job of an earlier sweep (its driver died) that is still queued or running: follow it instead of
        starting the run again."""
        if not record or record.get("executor") != "submitit-slurm" or not record.get("job_id") \
                or self.name != "submitit-slurm":
            return None
        try:
            job = self.submitit.SlurmJob(folder=record["submitit_folder"], job_id=str(record["job_id"]))
            state = str(job.state).split()[0]
        except Exception:  # noqa: BLE001 -- sacct unavailable or the job is unknown: start the run again
            return None
        return job if state in _ACTIVE_SLURM_STATES else None

    def run(self, jobs: Sequence[_Job], attached: Sequence = ()) -> Iterator[tuple[_Job, dict]]:
        handles = list(attached)
        if jobs:
            submitted = self.executor.map_array(RunCommand(), [j.cmd for j in jobs], [j.log for j in jobs],
                                                [j.cwd for j in jobs], [None] * len(jobs))
            for job, handle in zip(jobs, submitted):
                _mark_started(self.out, job, status="submitted", executor=self.name, job_id=handle.job_id,
                              submitit_folder=str(self.folder))
            handles += list(zip(jobs, submitted))
        self.jobs = [h for _, h in handles]
        by_handle = {id(h): j for j, h in handles}
        for handle in self.submitit.helpers.as_completed(self.jobs, poll_frequency=self.poll):
            try:
                outcome = handle.result()
            except Exception as err:  # noqa: BLE001 -- timeout, preemption, node failure: the run failed
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                outcome = {"exit_code": None, "seconds": None,
                           "error": f"submitit job {handle.job_id}: {first[:300]} (see {handle.paths.stderr})"}
            yield by_handle[id(handle)], outcome

    def stop(self) -> str:
        if self.name == "submitit-local":
            for job in self.jobs:
                job.cancel(check=False)
            return "the local submitit jobs were cancelled"
        ids = " ".join(str(j.job_id) for j in self.jobs if not j.done())
        return f"the SLURM jobs keep running: run the same command again to follow them (or scancel {ids})"


class _RayBackend:
    """One Ray task per run (``ray.init(address)``: an existing cluster, or a local one when no address)."""

    name = "ray"

    def __init__(self, opts: SweepOptions):
        try:
            import ray
        except ImportError:
            raise SweepError("--executor ray needs ray: pip install 'ray[default]'") from None
        self.ray = ray
        try:
            ray.init(address=opts.ray_address, ignore_reinit_error=True, log_to_driver=False)
        except Exception as err:  # noqa: BLE001
            raise SweepError(f"ray.init(address={opts.ray_address!r}) failed: {err}") from None
        self.task = ray.remote(num_gpus=opts.ray_gpus, num_cpus=opts.ray_cpus, max_retries=0)(execute_run)
        self.out, self.refs = opts.out, {}

    def reattach(self, record: dict | None):
        return None

    def run(self, jobs: Sequence[_Job], attached: Sequence = ()) -> Iterator[tuple[_Job, dict]]:
        for job in jobs:
            _mark_started(self.out, job, status="submitted", executor=self.name)
            self.refs[self.task.remote(job.cmd, job.log, job.cwd, None)] = job
        while self.refs:
            done, _ = self.ray.wait(list(self.refs), num_returns=1)
            for ref in done:
                job = self.refs.pop(ref)
                try:
                    outcome = self.ray.get(ref)
                except Exception as err:  # noqa: BLE001 -- a lost worker or node: the run failed
                    outcome = {"exit_code": None, "seconds": None, "error": f"ray task: {err}"[:300]}
                yield job, outcome

    def stop(self) -> str:
        for ref in self.refs:
            self.ray.cancel(ref, force=True)
        return "the Ray tasks were cancelled"


def make_backend(opts: SweepOptions):
    """The executor, checked (importable, reachable, valid parameters) before any run starts."""
    if opts.executor == "local":
        return _LocalBackend(opts)
    if opts.executor == "submitit":
        return _SubmititBackend(opts)
    if opts.executor == "ray":
        return _RayBackend(opts)
    raise SweepError(f"unknown executor {opts.executor!r}; choose one of {', '.join(EXECUTORS)}")


# --- the sweep ------------------------------------------------------------------------------------------------

@contextmanager
def _lock(out: Path):
    """One sweep at a time per folder (two would remove each other's unfinished run folders)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    f = open(out / ".sweep.lock", "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SweepError(f"another sweep is running into {out}; wait for it or use another --out") from None
        yield
    finally:
        f.close()


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"


def run_sweep(runs: Sequence[Run], opts: SweepOptions, echo: Callable[[str], None] = print,
              command: Callable[[Run, SweepOptions], list[str]] = build_command) -> SweepResult:
    """Run what is not finished yet, then write the outputs. ``command`` builds a run's command line."""
    from tqdm import tqdm

    opts.out = Path(opts.out).resolve()
    if opts.out.exists() and not opts.out.is_dir():
        raise SweepError(f"--out {opts.out} is a file")
    if not Path(opts.run_script).is_file():
        raise SweepError(f"run script {opts.run_script} not found")
    backend = make_backend(opts)  # every check before anything is created, removed or started
    opts.out.mkdir(parents=True, exist_ok=True)
    with _lock(opts.out):
        commands = {run.run_id: tuple(command(run, opts)) for run in runs}
        # a finished run counts for this sweep only if it ran this command (records without one predate the
        # check and are taken as they are); otherwise refuse before anything is written or removed
        finished = {run.run_id for run in runs if finished_result(opts.out, run.run_id) is not None}
        changed, rerun = [], set()
        for run in runs:
            if run.run_id in finished:
                recorded = (read_record(opts.out, run.run_id) or {}).get("command")
                if recorded and run_arguments(recorded) != run_arguments(commands[run.run_id]):
                    changed.append(f"{run.run_id}: {command_change(recorded, commands[run.run_id])}")
                    rerun.add(run.run_id)
        if changed and not opts.rerun_changed:
            shown = "\n  ".join(changed[:10]) + (f"\n  ... and {len(changed) - 10} more" if len(changed) > 10 else "")
            raise SweepError(
                f"{len(changed)} finished run(s) in {opts.out} ran another command than this sweep would give them, "
                f"so their results are not this sweep's:\n  {shown}\nGive --rerun-changed to run them again (their "
                "folders are replaced), or another --out to keep both")
        write_manifest(opts.out, runs)
        cwd = str(Path(opts.cwd).resolve() if opts.cwd is not None else Path(opts.run_script).resolve().parent)
        todo, attached, skipped, continuing = [], [], 0, 0
        for run in runs:
            cmd = commands[run.run_id]
            if run.run_id in rerun:
                shutil.rmtree(opts.out / "runs" / run.run_id, ignore_errors=True)  # a new run: start clean
            elif run.run_id in finished:
                skipped += 1
                continue
            job = _Job(run, cmd, str(log_path(opts.out, run.run_id)), cwd)
            handle = backend.reattach(read_record(opts.out, run.run_id))
            if handle is not None:
                attached.append((job, handle))
                continue
            if (run_dir(opts.out, run.run_id) / "checkpoints" / "last.ckpt").is_file():
                continuing += 1  # --resume auto continues it exactly
            else:
                shutil.rmtree(opts.out / "runs" / run.run_id, ignore_errors=True)  # start clean, stay version_0
            todo.append(job)
        more = f", {len(attached)} still running from an earlier sweep" if attached else ""
        more += f", {continuing} of them continue from their last.ckpt" if continuing else ""
        echo(f"sweep {opts.out}: {len(runs)} runs, {skipped} already finished, {len(todo)} to run{more} "
             f"({backend.name} executor)")
        failed, preempted, interrupted = [], [], False
        previous_term = _term_as_interrupt()
        bar = tqdm(total=len(runs), initial=skipped, unit="run", dynamic_ncols=True, leave=False,
                   disable=not (todo or attached), file=sys.stderr)
        try:
            for job, outcome in backend.run(todo, attached):
                rid = job.run.run_id
                code, seconds = outcome.get("exit_code"), outcome.get("seconds")
                result = run_dir(opts.out, rid) / "results.json"
                ok = code == 0 and finished_result(opts.out, rid) is not None
                stopped = code == PREEMPTED_EXIT_CODE
                status = "finished" if ok else "preempted" if stopped else "failed"
                write_record(opts.out, rid, run=job.run.to_dict(), status=status,
                             exit_code=code, seconds=seconds, host=outcome.get("host"), log=job.log,
                             error=outcome.get("error"), command=list(job.cmd), cwd=job.cwd, ended=time.time())
                if ok:
                    bar.write(f"done    {rid}  {headline(finished_result(opts.out, rid))}  ({_duration(seconds)})")
                elif stopped:
                    preempted.append(rid)
                    bar.write(f"stopped {rid}  by a signal, last.ckpt saved: the next sweep continues it  "
                              f"({_duration(seconds)})  log: {job.log}")
                else:
                    failed.append(rid)
                    why = outcome.get("error") or (f"exit {code}" if code else
                                                   f"exit 0 but {result} is missing or not finished")
                    bar.write(f"FAILED  {rid}  {why}  ({_duration(seconds)})  log: {job.log}")
                bar.update(1)
        except KeyboardInterrupt:
            interrupted = True
            bar.write(f"interrupted: {backend.stop()}")
        finally:
            bar.close()
            _restore_term(previous_term)
        rows = collect_rows(opts.out, all_runs(opts.out, runs))
        paths = write_outputs(rows, opts.out)
    echo(summary_line(rows) + (" (interrupted: run the same command to resume)" if interrupted else ""))
    for rid in failed:
        echo(f"  failed: {rid}  log: {log_path(opts.out, rid)}")
    echo(f"outputs: {paths['csv']}  {paths['tables']}  {paths['plot']}")
    return SweepResult(rows, failed, interrupted, paths, preempted)


def _term_as_interrupt():
    """SIGTERM to the sweep (a scheduler stopping it) stops it like Ctrl-C: its runs save and stop."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, on_term)


def _restore_term(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
