"""The suite's one command: ``abkd <command> ...`` (also ``python run.py <command> ...`` and
``python -m abkd_vision <command> ...``; the three are the same code).

``fit``, ``validate``, ``test`` and ``predict`` are the LightningCLI of :mod:`abkd_vision.cli`; every other
command is the ``main(argv)`` of its own module, which still runs on its own as ``python -m <module>``.
``abkd --help`` lists the commands without importing any of them (it is instant); ``abkd <command> --help``
shows that command's options.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, a one-line summary, and the module whose ``main(argv)`` runs it."""

    name: str
    summary: str
    module: str
    lightning: bool = False  # a LightningCLI subcommand (run by abkd_vision.cli.run with the name kept in argv)


COMMANDS: tuple[Command, ...] = (
    Command("fit", "train a model from YAML configs (LightningCLI; --print_config shows the merged config)",
            "abkd_vision.cli", lightning=True),
    Command("validate", "evaluate a model on the validation data (LightningCLI)", "abkd_vision.cli", lightning=True),
    Command("test", "evaluate a model on the test data (LightningCLI)", "abkd_vision.cli", lightning=True),
    Command("predict", "run a model's predictions over the data (LightningCLI)", "abkd_vision.cli", lightning=True),
    Command("sweep", "run a grid of configs x seeds x overrides, resumably, and write the result tables",
            "abkd_vision.sweep.__main__"),
    Command("search", "search alpha and beta of the alpha-beta divergence with Optuna, one run per trial",
            "abkd_vision.search.__main__"),
    Command("export", "export a trained network as a state dict and ONNX, checked and timed", "abkd_vision.export"),
    Command("study", "the small real-data study: a teacher, then CE/KD/ABKD/DKD/ABDKD students over seeds",
            "abkd_vision.study"),
    Command("toy", "the paper's toy figure: a student fitted to a fixed teacher under each divergence",
            "abkd_vision.viz.toy"),
    Command("demo", "the offline demo (make demo): a teacher and three students on real digits, with the table",
            "abkd_vision.demo"),
)

BY_NAME = {c.name: c for c in COMMANDS}
# python -m <module> names the same command (docs and scripts may use either spelling)
BY_MODULE = {c.module.removesuffix(".__main__"): c for c in COMMANDS if not c.lightning}

DESCRIPTION = "Knowledge distillation for vision with the alpha-beta divergence (ABKD), on PyTorch Lightning."


def program_name() -> str:
    """How the user called us: ``abkd``, ``run.py`` or ``python -m abkd_vision``."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "abkd"
    return "python -m abkd_vision" if name in ("__main__.py", "-m", "-c", "") else name


def usage(prog: str) -> str:
    """The top-level help: one line per command."""
    width = max(len(c.name) for c in COMMANDS)
    lines = [f"usage: {prog} <command> [options]", "", DESCRIPTION, "", "commands:"]
    lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS]
    lines += ["", f"'{prog} <command> --help' shows the options of one command. The Lightning commands also take a",
              f"top-level config before the command ('{prog} --config run.yaml fit', as any LightningCLI)."]
    return "\n".join(lines)


def resolve(name: str) -> Command | None:
    """The command called ``name``, or the one whose module is ``name`` (``abkd_vision.sweep``), else None."""
    return BY_NAME.get(name) or BY_MODULE.get(name)


def entry_point(command: Command):
    """The function that runs ``command``: ``abkd_vision.cli.run`` for the Lightning ones, else ``main``."""
    module = importlib.import_module(command.module)
    return module.run if command.lightning else module.main


# the name of the command running through main() ("abkd sweep", "run.py study"); None when a module runs on its own
_RUNNING: str | None = None


def command_prog(default: str) -> str:
    """The ``prog`` of a command's argparse parser: how the user called it (``abkd sweep``, ``run.py sweep``), or
    ``default`` (``python -m abkd_vision.sweep``) when its module runs on its own."""
    return _RUNNING or default


@contextmanager
def _program(name: str):
    """``sys.argv[0]`` and :func:`command_prog` read ``name`` while a command runs (its usage lines then show how it
    was called); the real values are back afterwards."""
    global _RUNNING
    saved_running, _RUNNING = _RUNNING, name
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = name
    else:
        sys.argv.append(name)
    try:
        yield
    finally:
        _RUNNING = saved_running
        if saved is None:
            sys.argv.pop(0)
        else:
            sys.argv[0] = saved


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run ``<command> [options]`` and return its exit code."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or program_name()
    first = argv[0] if argv else None
    if first in ("-h", "--help"):
        print(usage(prog))
        return 0
    if first is None:
        print(f"{usage(prog)}\n\nerror: give a command: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    command = BY_NAME.get(first)
    if command is None and not first.startswith("-"):
        print(f"error: invalid arguments\nunknown command {first!r}; choose one of: {', '.join(BY_NAME)}\n"
              f"({prog} --help lists them)", file=sys.stderr)
        return 2
    if command is None or command.lightning:  # options before the command (--config, --print_config) are Lightning's
        from abkd_vision.cli import run

        # None: LightningCLI reads the command line itself (given args beside a real command line, it warns)
        return run(None if from_command_line else argv, prog=prog)
    run = entry_point(command)
    # (the Lightning commands above keep the real sys.argv[0]: a multi-process launcher re-runs it)
    with _program(f"{prog} {command.name}"):
        code = run(argv[1:])
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
