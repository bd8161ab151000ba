"""``python -m abkd_vision.sweep``: run a grid of configs x seeds x overrides, resumably, and print the tables.

    # CIFAR-100: 2 methods x 2 pairs x 3 seeds
    python -m abkd_vision.sweep --root configs/cifar100 --methods kd abkd \\
        --settings resnet32x4-resnet8x4 vgg13-vgg8 --seeds 0 1 2 --out runs/sweeps/cifar
    # base-to-new: 5 methods x 11 datasets x 3 seeds, a lambda grid for ABKD
    python -m abkd_vision.sweep --root configs/base_to_new --methods abkd --settings EuroSAT DTD \\
        --seeds 1 2 3 --set model.init_args.kd_weight=100,200,500 --out runs/sweeps/b2n
    # tables again from the run folders, without running anything
    python -m abkd_vision.sweep --out runs/sweeps/b2n --report-only
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from abkd_vision.sweep.grid import SweepError, expand_grid, runs_from_files
from abkd_vision.sweep.runner import EXECUTORS, SweepOptions, load_manifest, run_sweep
from abkd_vision.sweep.tables import collect_rows, write_outputs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m abkd_vision.sweep", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--out", type=Path, required=True, help="sweep folder (runs/, logs/, results.csv, tables.md)")
    p.add_argument("--root", type=Path, help="config root holding <method>/<setting>.yaml and base.yaml")
    p.add_argument("--methods", nargs="+", default=[], help="method folders under --root")
    p.add_argument("--settings", nargs="+", default=[], help="setting files (stems) under each method")
    p.add_argument("--configs", nargs="+", default=[], help="explicit run files instead of --root/--methods")
    p.add_argument("--base", type=Path, help="shared base config (default: <root>/base.yaml)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                   help="an override grid, e.g. model.init_args.kd_weight=100,200 (repeatable: cartesian product)")
    p.add_argument("--alpha-beta", nargs="+", default=[], metavar="A,B", help="an (alpha, beta) grid for AB heads")
    p.add_argument("--extra", default="", help="extra run.py arguments for every run, e.g. '--trainer.max_epochs 1'")
    p.add_argument("--workers", type=int, default=1, help="parallel runs (local executor)")
    p.add_argument("--executor", choices=EXECUTORS, default="local")
    p.add_argument("--submitit-local", action="store_true", help="submitit's local executor (no SLURM)")
    p.add_argument("--slurm-partition")
    p.add_argument("--gpus-per-node", type=int)
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--timeout-min", type=int)
    p.add_argument("--ray-address", help="Ray cluster address (default: auto)")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per run on Ray")
    p.add_argument("--run-script", type=Path, default=None, help=argparse.SUPPRESS)  # tests: a stand-in run.py
    p.add_argument("--report-only", action="store_true", help="only regenerate the outputs from the run folders")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.report_only:
            rows = collect_rows(load_manifest(args.out), args.out)
            paths = write_outputs(rows, args.out)
            print(f"{len(rows)} runs; outputs: {paths['csv']}, {paths['tables']}, {paths['plot']}")
            return 0
        if args.configs:
            runs = runs_from_files(args.configs, args.seeds, args.base, args.sets, args.alpha_beta)
        elif args.root is not None:
            runs = expand_grid(args.root, args.methods, args.settings, args.seeds, args.base, args.sets,
                               args.alpha_beta)
        else:
            raise SweepError("give --root with --methods and --settings, or --configs, or --report-only")
    except (SweepError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    slurm = {k: v for k, v in {"slurm_partition": args.slurm_partition, "gpus_per_node": args.gpus_per_node,
                               "cpus_per_task": args.cpus_per_task, "timeout_min": args.timeout_min}.items()
             if v is not None}
    opts = SweepOptions(out=args.out, extra=shlex.split(args.extra), workers=args.workers, executor=args.executor,
                        submitit_local=args.submitit_local, slurm=slurm, ray_address=args.ray_address,
                        ray_gpus=args.ray_gpus)
    if args.run_script is not None:
        opts.run_script = args.run_script.resolve()
    _, failed = run_sweep(runs, opts)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
