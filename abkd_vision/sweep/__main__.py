"""``python -m abkd_vision.sweep``: run a grid of configs x seeds x overrides, resumably, and print the tables.

examples:
  # CIFAR-100: 2 methods x 2 pairs x 3 seeds, 2 runs at a time
  python -m abkd_vision.sweep --root configs/cifar100 --methods kd abkd \\
      --settings resnet32x4-resnet8x4 wrn_40_2-wrn_16_2 --seeds 0 1 2 --out runs/sweeps/cifar --workers 2
  # base-to-new: an (alpha, beta) grid and a lambda grid for ABKD on 2 datasets, 3 seeds
  python -m abkd_vision.sweep --root configs/base_to_new --methods abkd --settings EuroSAT DTD --seeds 1 2 3 \\
      --alpha-beta 1.0,0.2 0.8,0.4 --set model.init_args.kd_weight=100,200 --out runs/sweeps/b2n
  # explicit run files with a common base, tiny smoke runs
  python -m abkd_vision.sweep --base configs/demo/base.yaml --configs configs/demo/ce.yaml configs/demo/teacher.yaml \\
      --seeds 0 1 --extra "--trainer.max_epochs 1 --trainer.limit_train_batches 2" --out runs/sweeps/smoke
  # SLURM: one job per run (submitit)
  python -m abkd_vision.sweep ... --executor submitit --slurm-partition gpu --gpus-per-node 1 --timeout-min 600
  # the outputs again from the run folders, without running anything
  python -m abkd_vision.sweep --out runs/sweeps/b2n --report-only

Running the same command again resumes: finished runs (results.json says "finished": true: their planned
epochs ran) are skipped, unfinished ones continue exactly from their last.ckpt (or start afresh without one).
Ctrl-C, SIGTERM or SIGKILL of the sweep stop its runs, which save last.ckpt first. Exit code: 0 all finished,
1 some run failed, 2 nothing started (invalid sweep), 75 some run was stopped by a signal (run again to continue),
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from abkd_vision.commands import command_prog
from abkd_vision.sweep.grid import SweepError, check_extra, expand_grid, runs_from_files, split_extra
from abkd_vision.sweep.runner import EXECUTORS, SweepOptions, build_command, run_sweep
from abkd_vision.sweep.store import all_runs, run_status
from abkd_vision.sweep.tables import collect_rows, summary_line, write_outputs

SLURM_ONLY = ("slurm_partition", "cpus_per_task", "mem_gb", "slurm_param")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=command_prog("python -m abkd_vision.sweep"),
                                description="Run a grid of configs x seeds x overrides, resumably; print the tables.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n", 2)[2])
    p.add_argument("--out", type=Path, required=True,
                   help="sweep folder: runs/<run_id>/version_0/, logs/, results.csv, tables.md, plot.png")
    g = p.add_argument_group("what to run")
    g.add_argument("--root", type=Path, help="config root holding <method>/<setting>.yaml (and base.yaml)")
    g.add_argument("--methods", nargs="+", default=[], help="method folders under --root")
    g.add_argument("--settings", nargs="+", default=[], help="setting files (stems) in each method folder")
    g.add_argument("--configs", nargs="+", default=[], type=Path,
                   help="explicit run files instead of --root/--methods/--settings (method = folder, setting = stem)")
    g.add_argument("--base", help="shared first config (default: <root>/base.yaml; with --configs the nearest "
                                  "base.yaml; 'none' for no base)")
    g.add_argument("--seeds", nargs="+", type=int, default=[], help="seeds (--seed_everything), e.g. 1 2 3")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                   help="an override grid, e.g. model.init_args.kd_weight=100,200 (repeatable: cartesian product)")
    g.add_argument("--alpha-beta", nargs="+", default=[], metavar="A,B",
                   help="an (alpha, beta) grid for the head's alpha-beta divergence, e.g. 0.5,0.5 0.8,0.2")
    g.add_argument("--extra", default="", help="arguments for every run, e.g. '--trainer.max_epochs 1'")
    g.add_argument("--run-script", type=Path, default=None,
                   help="the script to run (default: the repository's run.py; runs start in its folder)")
    g = p.add_argument_group("where to run")
    g.add_argument("--executor", choices=EXECUTORS, default="local")
    g.add_argument("--workers", type=int, default=None,
                   help="local: runs at a time (default 1); submitit/SLURM: array parallelism")
    g.add_argument("--gpus", nargs="+", default=[], metavar="ID",
                   help="local: one run per listed GPU at a time, through CUDA_VISIBLE_DEVICES (0 0 1 1: two per GPU)")
    g.add_argument("--submitit-local", action="store_true", help="submitit's LocalExecutor instead of SLURM")
    g.add_argument("--timeout-min", type=int, help="submitit: time limit per run (default 1440)")
    g.add_argument("--gpus-per-node", type=int, help="submitit: GPUs per job")
    g.add_argument("--tasks-per-node", type=int, help="submitit: tasks per job (a multi-GPU DDP run: = GPUs)")
    g.add_argument("--cpus-per-task", type=int, help="SLURM: CPUs per task")
    g.add_argument("--mem-gb", type=float, help="SLURM: memory per job")
    g.add_argument("--slurm-partition", help="SLURM partition")
    g.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="any other SLURM parameter of submitit, e.g. account=myproj, constraint=a100 (repeatable)")
    g.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    g.add_argument("--ray-gpus", type=float, default=0.0, help="Ray: GPUs per run")
    g.add_argument("--ray-cpus", type=float, default=1.0, help="Ray: CPUs per run")
    g = p.add_argument_group("other")
    g.add_argument("--report-only", action="store_true", help="only regenerate the outputs from the run folders")
    g.add_argument("--dry-run", action="store_true", help="check the sweep and list its runs; start nothing")
    g.add_argument("--rerun-changed", action="store_true",
                   help="run again the finished runs whose command changed (other --extra, configs or options); "
                        "without it such runs are an error naming them")
    return p


def _runs(args):
    if args.configs:
        if args.root is not None or args.methods or args.settings:
            raise SweepError("give either --configs or --root/--methods/--settings, not both")
        return runs_from_files(args.configs, args.seeds, args.base, args.sets, args.alpha_beta)
    if args.root is not None or args.methods or args.settings:
        if args.root is None:
            raise SweepError("--methods/--settings need --root (e.g. --root configs/cifar100)")
        return expand_grid(args.root, args.methods, args.settings, args.seeds, args.base, args.sets, args.alpha_beta)
    return None


def _submitit_params(args) -> dict:
    params = {k: v for k, v in {"timeout_min": args.timeout_min, "gpus_per_node": args.gpus_per_node,
                                "tasks_per_node": args.tasks_per_node, "cpus_per_task": args.cpus_per_task,
                                "mem_gb": args.mem_gb, "slurm_partition": args.slurm_partition}.items()
              if v is not None}
    for spec in args.slurm_param:
        key, sep, value = spec.partition("=")
        if not sep or not key.strip():
            raise SweepError(f"--slurm-param expects key=value, got {spec!r}")
        key = key.strip().replace("-", "_")
        params[key if key.startswith("slurm_") else f"slurm_{key}"] = int(value) if value.isdigit() else value
    return params


def _check_options(args) -> None:
    submitit_given = [f"--{k.replace('_', '-')}" for k in ("timeout_min", "gpus_per_node", "tasks_per_node",
                                                           *SLURM_ONLY) if getattr(args, k)] + \
                     (["--submitit-local"] if args.submitit_local else [])
    if submitit_given and args.executor != "submitit":
        raise SweepError(f"{', '.join(submitit_given)} only apply to --executor submitit")
    ray_given = [o for o, v in (("--ray-address", args.ray_address), ("--ray-gpus", args.ray_gpus),
                                ("--ray-cpus", args.ray_cpus != 1.0)) if v]
    if ray_given and args.executor != "ray":
        raise SweepError(f"{', '.join(ray_given)} only apply to --executor ray")
    if args.gpus and args.executor != "local":
        raise SweepError("--gpus is for the local executor (submitit: --gpus-per-node; ray: --ray-gpus)")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if not args.report_only and not args.seeds:
            raise SweepError("give the seeds to run, e.g. --seeds 1 2 3")
        runs = _runs(args)
        if args.report_only:
            if not args.out.is_dir():
                raise SweepError(f"--out {args.out} does not exist: nothing to report")
            rows = collect_rows(args.out, all_runs(args.out, runs))
            paths = write_outputs(rows, args.out)
            print(f"{summary_line(rows)}\noutputs: {paths['csv']}  {paths['tables']}  {paths['plot']}")
            return 0
        if runs is None:
            raise SweepError("nothing to run: give --root with --methods and --settings, or --configs "
                             "(or --report-only)")
        extra = split_extra(args.extra)
        check_extra(extra, [kv for r in runs for kv in r.overrides])
        _check_options(args)
        opts = SweepOptions(out=args.out, extra=extra, workers=args.workers, gpus=args.gpus, executor=args.executor,
                            submitit_local=args.submitit_local, submitit=_submitit_params(args),
                            ray_address=args.ray_address, ray_gpus=args.ray_gpus, ray_cpus=args.ray_cpus,
                            rerun_changed=args.rerun_changed)
        if args.run_script is not None:
            opts.run_script = args.run_script.resolve()
        if not opts.run_script.is_file():
            raise SweepError(f"--run-script {opts.run_script} not found")
        if args.dry_run:
            for run in runs:
                print(f"{run_status(args.out, run.run_id):10s}  {run.run_id}")
            print(f"{len(runs)} runs; the first: cd {opts.run_script.parent} && "
                  + " ".join(build_command(runs[0], opts)))
            return 0
        result = run_sweep(runs, opts)
    except SweepError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
