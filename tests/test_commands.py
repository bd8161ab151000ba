"""The one command: ``abkd``, ``python run.py`` and ``python -m abkd_vision`` are the same dispatcher, every
subcommand answers ``--help``, and every command line shown in ``README.md`` and ``docs/*.md`` parses.

Kept cheap: one subprocess runs every subcommand's ``--help`` in a loop, one each runs ``abkd --help`` and
``python run.py --help``; the documented command lines are parsed in this process (the Lightning parser is built
once, the argparse tools are stopped right after their parser ran, sweeps do a dry run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import runpy
import shlex
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path
from unittest import mock

import pytest

from abkd_vision import commands
from abkd_vision.commands import BY_NAME, COMMANDS, resolve, usage

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
SHELL_FENCES = {"bash", "sh", "shell", "console", "shell-session"}


def _console_script() -> Path:
    script = Path(sys.executable).parent / "abkd"
    if not script.is_file():
        pytest.fail(f"{script} is missing: reinstall the package (pip install -e .) to get the abkd console script")
    return script


# ------------------------------------------------------------------------------------------ the dispatcher


def test_abkd_help_lists_every_command_with_one_line():
    result = subprocess.run([str(_console_script()), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == usage("abkd")
    listed = re.findall(r"^  (\w+)  +(.+)$", result.stdout, flags=re.MULTILINE)
    assert [name for name, _ in listed] == [c.name for c in COMMANDS]
    assert {"fit", "validate", "test", "predict", "sweep", "search", "export", "study", "toy"} <= set(BY_NAME)


def test_run_py_help_lists_the_same_commands():
    result = subprocess.run([sys.executable, "run.py", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == usage("run.py")


def test_console_script_run_py_and_python_m_call_one_dispatcher(monkeypatch):
    entries = [e for e in metadata.entry_points(group="console_scripts") if e.name == "abkd"]
    assert len(entries) == 1, "no abkd console script in the installed metadata: reinstall (pip install -e .)"
    assert entries[0].value == "abkd_vision.commands:main"
    calls = []
    monkeypatch.setattr(commands, "main", lambda argv=None, prog=None: calls.append(list(sys.argv)) or 7)
    for argv, run in ((["run.py", "sweep", "--help"], lambda: runpy.run_path(str(REPO / "run.py"),
                                                                             run_name="__main__")),
                      (["__main__.py", "toy", "--help"], lambda: runpy.run_module("abkd_vision", run_name="__main__",
                                                                                  alter_sys=True))):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as stop:
            run()
        assert stop.value.code == 7  # the dispatcher's exit code is the process's
    assert [c[1:] for c in calls] == [["sweep", "--help"], ["toy", "--help"]]


def test_unknown_and_missing_command_end_with_one_message(capsys):
    assert commands.main(["fitt"], prog="abkd") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-2].startswith("unknown command 'fitt'; choose one of: fit, validate, test, predict, sweep")
    assert commands.main([], prog="abkd") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: give a command: fit, validate")
    assert resolve("abkd_vision.sweep") is BY_NAME["sweep"] and resolve("abkd_vision.viz.toy") is BY_NAME["toy"]


def test_usage_names_the_command_as_called_and_the_module_on_its_own(capsys):
    from abkd_vision.sweep.__main__ import parser

    with pytest.raises(SystemExit):
        commands.main(["sweep", "--help"], prog="run.py")
    assert capsys.readouterr().out.startswith("usage: run.py sweep [-h] --out OUT")
    assert parser().format_usage().startswith("usage: python -m abkd_vision.sweep ")  # run as its module


_HELP_LOOP = textwrap.dedent("""
    import contextlib, io, json, sys
    from importlib import metadata
    (entry,) = [e for e in metadata.entry_points(group="console_scripts") if e.name == "abkd"]
    main = entry.load()  # what the console script runs
    from abkd_vision.commands import COMMANDS
    sys.argv = ["abkd"]
    seen = {}
    for command in COMMANDS:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                code = main([command.name, "--help"], prog="abkd")
            except SystemExit as stop:
                code = stop.code
        seen[command.name] = [code, out.getvalue()]
    print(json.dumps(seen))
""")


@pytest.fixture(scope="module", autouse=True)
def help_loop():
    """The subprocess of the last test of this module, started with its first test so that its imports (torch,
    Lightning: most of its time) overlap the tests that run in this process."""
    proc = subprocess.Popen([sys.executable, "-c", _HELP_LOOP], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


# ------------------------------------------------------------------------------------------ documented commands


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, body) of each fenced shell block, also inside list items (indented fences)."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(`{3,}|~{3,})\s*([\w-]*)", lines[i])
        if not fence:
            i += 1
            continue
        indent, marker, lang = fence.groups()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(marker):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        if lang.lower() in SHELL_FENCES:
            blocks.append((start, "\n".join(body)))
    return blocks


def command_lines(body: str) -> list[tuple[int, str]]:
    """Logical command lines (continuations joined, ``$ `` prompts dropped) with their offset in the block."""
    out, current, first = [], "", 0
    for n, line in enumerate(body.splitlines()):
        stripped = line.strip()
        if not current:
            first = n
            if stripped.startswith("$ "):
                stripped = stripped[2:]
        if stripped.endswith("\\"):
            current += stripped[:-1].rstrip() + " "
            continue
        current += stripped
        if current.strip():
            out.append((first, current.strip()))
        current = ""
    if current.strip():
        out.append((first, current.strip()))
    return out


_SEPARATORS = {"|", "||", "&&", ";", "&", ">", ">>", "2>&1", "<"}


def project_invocations(line: str) -> list[list[str]]:
    """The suite's invocations in a shell line, each as the dispatcher's argv (``[command, *options]``).

    Recognised: ``abkd ...``, ``[python] [path/]run.py ...``, ``python -m abkd_vision[.<module>] ...``, also after
    ``VAR=value`` prefixes or a launcher (``srun``, ``torchrun``); everything else (make, pip, cd, other scripts)
    is not one of its commands. A ``python -m abkd_vision.<x>`` that is no command gives ``["<unknown>", x]``.
    """
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as err:
        raise AssertionError(f"not a valid shell line ({err}): {line}") from None
    segments, segment = [], []
    for token in tokens:
        if token in _SEPARATORS:
            segments.append(segment)
            segment = []
        else:
            segment.append(token)
    segments.append(segment)
    found = []
    for seg in segments:
        for i, token in enumerate(seg):
            name = Path(token).name
            if name == "abkd" or name == "run.py":
                found.append(seg[i + 1:])
                break
            if re.fullmatch(r"python(3(\.\d+)?)?", name) and seg[i + 1:i + 2] == ["-m"] and len(seg) > i + 2:
                module = seg[i + 2]
                if module == "abkd_vision":
                    found.append(seg[i + 3:])
                elif module.startswith("abkd_vision."):
                    command = resolve(module)
                    found.append([command.name, *seg[i + 3:]] if command else ["<unknown>", module])
                break
    return found


def documented_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOC_FILES:
        for start, body in shell_blocks(path.read_text()):
            for offset, line in command_lines(body):
                for argv in project_invocations(line):
                    found.append((f"{path.relative_to(REPO)}:{start + offset + 1}", argv))
    return found


def is_template(argv: list[str]) -> bool:
    """A line with placeholders (``...``, ``<method>``, ``[--opt VALUE]``) shows a form, not a runnable command."""
    return any(t == "..." or re.search(r"<[\w-]+>", t) or t.startswith("[") or t.endswith("]") for t in argv)


class _Parsed(Exception):
    def __init__(self, parser, namespace=None, extra=None, known_only=False):
        super().__init__("parsed")
        self.parser, self.namespace, self.extra, self.known_only = parser, namespace, extra, known_only


@contextlib.contextmanager
def stop_after_parsing(parse: bool = True):
    """A command's argparse parser runs (``parse``) or is only looked at, then :class:`_Parsed` stops the command
    before it does anything. The Lightning parser (jsonargparse) is not affected."""
    import jsonargparse

    real_parse, real_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    depth = [0]

    def wrap(real, known_only):
        def parse_it(self, args=None, namespace=None):
            if depth[0] or isinstance(self, jsonargparse.ArgumentParser):
                return real(self, args, namespace)
            if not parse:
                raise _Parsed(self)
            depth[0] += 1
            try:
                result = real(self, args, namespace)
            finally:
                depth[0] -= 1
            namespace, extra = result if known_only else (result, [])
            raise _Parsed(self, namespace, extra, known_only)

        return parse_it

    with mock.patch.object(argparse.ArgumentParser, "parse_args", wrap(real_parse, False)), \
            mock.patch.object(argparse.ArgumentParser, "parse_known_args", wrap(real_known, True)):
        yield


class _Built(Exception):
    def __init__(self, cli):
        super().__init__("built")
        self.cli = cli


@pytest.fixture(scope="module")
def lightning_parser():
    """The parser of ``abkd fit|validate|test|predict`` (all subcommands), built once, raising on a bad input."""
    from abkd_vision.cli import DistillationCLI, main

    def stop(self, parser, args):
        raise _Built(self)

    with mock.patch.object(sys, "argv", ["abkd"]), mock.patch.object(DistillationCLI, "parse_arguments", stop):
        with pytest.raises(_Built) as built:
            main(["fit"], exit_on_error=False)
    return built.value.cli.parser


def check_lightning(parser, argv: list[str]) -> None:
    if "--help" in argv or "-h" in argv:
        assert argv[0] in BY_NAME or argv[0].startswith("-")
        return
    argv = [a for a in argv if not a.startswith("--print_config")]
    parser.parse_args(argv)  # what --print_config does before it prints


def run_quietly(main, argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as stop:
            code = stop.code
    assert code in (0, None), f"exit code {code}: {err.getvalue().strip()[-1500:]}"
    return code or 0, out.getvalue()


def check_argparse_command(command, argv: list[str], lightning_parser) -> None:
    """Parse with the command's own parser; a sweep also does a dry run and parses its first run's command; a
    search parses what it passes to every run (its --config files and the options it does not know) as fit."""
    main = commands.entry_point(command)
    if "--help" in argv or "-h" in argv:
        run_quietly(main, argv)
        return
    if command.name == "sweep" and "--report-only" not in argv:
        _, out = run_quietly(main, [*argv, "--dry-run"])
        first = re.search(r"the first: cd \S+ && (.+)$", out, flags=re.MULTILINE)
        assert first, out[-1000:]
        run_args = shlex.split(first.group(1))
        run_args = run_args[next(i for i, t in enumerate(run_args) if t.endswith("run.py")) + 1:]
        check_lightning(lightning_parser, run_args)
        return
    with stop_after_parsing():
        try:
            run_quietly(main, argv)
        except _Parsed as parsed:
            if command.name == "search" and parsed.namespace.config:
                check_lightning(lightning_parser, ["fit", *(a for c in parsed.namespace.config
                                                            for a in ("--config", c)), *parsed.extra])
            return
    raise AssertionError("the command returned before its parser ran")


def check_template(command, argv: list[str]) -> None:
    """A form with placeholders: the command exists, and each option it spells out is one of the command's."""
    if command.lightning:
        return
    with stop_after_parsing(parse=False):
        try:
            run_quietly(commands.entry_point(command), [])
        except _Parsed as parsed:
            known = set(parsed.parser._option_string_actions)
    for token in argv:
        key = token.split("=", 1)[0]
        if key.startswith("--") and key not in known:
            # a tool that passes the options it does not know on to every run (search) takes Lightning keys
            assert command.name == "search" and "." in key, f"{key} is not an option of {command.name}"


def check(argv: list[str], lightning_parser) -> str:
    """Check one documented invocation; raises when it does not parse. Returns how it was checked."""
    if not argv or argv[0] in ("-h", "--help"):
        assert run_quietly(commands.main, argv or ["--help"])[1].startswith("usage: ")
        return "help"
    if argv[0] == "<unknown>":
        raise AssertionError(f"python -m {argv[1]} is not a command of abkd")
    command = BY_NAME.get(argv[0])
    if command is None and not argv[0].startswith("-"):
        raise AssertionError(f"unknown command {argv[0]!r}")
    if is_template(argv):
        check_template(command or BY_NAME["fit"], argv[1:])
        return "form"
    if command is None or command.lightning:
        check_lightning(lightning_parser, argv)
    else:
        check_argparse_command(command, argv[1:], lightning_parser)
    return "parsed"


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the documented paths (configs/...) are relative to the repository
    monkeypatch.setattr(sys, "argv", ["abkd"])


def test_every_documented_command_parses(lightning_parser, in_repo):
    found = documented_commands()
    failures, how = [], []
    for where, argv in found:
        try:
            how.append(check(argv, lightning_parser))
        except (Exception, SystemExit) as err:  # noqa: BLE001 -- collect every failing line, then report them all
            failures.append(f"{where}: {' '.join(argv)}\n    {type(err).__name__}: {str(err).strip()[-800:]}")
    assert not failures, f"{len(failures)} documented command(s) do not parse:\n" + "\n".join(failures)
    assert how.count("parsed") >= 20, f"only {how.count('parsed')} documented commands parsed: is the extractor broken?"
    shown = {argv[0] for _, argv in found if argv}
    assert {"fit", "test", "sweep", "search", "export", "study", "toy"} <= shown


@pytest.mark.parametrize("line, reason", [
    ("abkd fit --config configs/cifar100/base.yaml --config configs/cifar100/kd/resnet32x4-resnet8x4.yaml "
     "--model.init_args.kd_wieght 2", "kd_wieght"),
    ("abkd fit --config configs/cifar100/base.yaml --config configs/cifar100/no_such_file.yaml", "does not exist"),
    ("abkd sweep --root configs/cifar100 --methods kd --settings no-such-pair --seeds 0 --out runs/x",
     "unknown setting"),
    ("abkd sweep --root configs/cifar100 --methods kd --settings resnet32x4-resnet8x4 --seeds 0 --out runs/x "
     "--extra '--trainer.max_epochz 1'", "max_epochz"),
    ("abkd search --out runs/s --config configs/cifar100/base.yaml --config "
     "configs/cifar100/abkd/resnet32x4-resnet8x4.yaml --trainer.max_epochz 1", "max_epochz"),
    ("abkd toy --clases 3", "--clases"),
    ("abkd export --out x", "required: --ckpt"),
    ("python -m abkd_vision.sweep ... --dry-rum", "--dry-rum is not an option"),
    ("python -m abkd_vision.nope --out x", "not a command"),
    ("abkd fitt --help", "unknown command"),
], ids=lambda s: s[:40])
def test_a_drifted_command_is_caught(line, reason, lightning_parser, in_repo):
    (argv,) = project_invocations(line)
    with pytest.raises((Exception, SystemExit)) as failed:  # noqa: B017 -- the parser's own error types vary
        check(argv, lightning_parser)
    assert reason in str(failed.value)


def test_commands_page_lists_every_command():
    page = (REPO / "docs" / "commands.md").read_text()
    listed = re.findall(r"^\| `(\w+)` \|", page, flags=re.MULTILINE)
    assert listed[:len(COMMANDS)] == [c.name for c in COMMANDS]


def test_extractor_on_a_sample():
    text = ("- item\n\n  ```bash\n  abkd sweep --root configs/cifar100 \\\n      --seeds 0 --out x   # a comment\n"
            "  make test && python -m abkd_vision.viz.toy --out t.png\n  ```\n\n```yaml\nabkd: fit\n```\n")
    blocks = shell_blocks(text)
    assert len(blocks) == 1
    lines = [line for _, line in command_lines(blocks[0][1])]
    assert lines[0] == "abkd sweep --root configs/cifar100 --seeds 0 --out x   # a comment"
    assert project_invocations(lines[0]) == [["sweep", "--root", "configs/cifar100", "--seeds", "0", "--out", "x"]]
    assert project_invocations(lines[1]) == [["toy", "--out", "t.png"]]
    assert project_invocations("CUDA_VISIBLE_DEVICES=0 python run.py fit -c a.yaml") == [["fit", "-c", "a.yaml"]]
    assert project_invocations("python -m abkd_vision.nope") == [["<unknown>", "abkd_vision.nope"]]
    assert project_invocations("pip install -e . && cd x") == []
    assert is_template(["fit", "--config", "configs/<method>/x.yaml"]) and not is_template(["fit", "-c", "a.yaml"])


def test_every_command_help_through_the_console_script_entry_point(help_loop):
    out, err = help_loop.communicate(timeout=240)
    assert help_loop.returncode == 0, err[-3000:]
    seen = json.loads(out.strip().splitlines()[-1])
    assert list(seen) == [c.name for c in COMMANDS]
    for command in COMMANDS:
        code, text = seen[command.name]
        assert code in (0, None), (command.name, code)
        assert text.startswith("usage: ") and "--help" in text, (command.name, text[:300])
        if command.lightning:
            assert text.startswith(f"usage: abkd [options] {command.name} "), text[:200]
            assert "--trainer.max_epochs" in text and "--model" in text
        else:  # every command's usage shows how it was called
            assert text.startswith(f"usage: abkd {command.name} "), text[:200]
    assert "--resume" in seen["fit"][1] and "--dry-run" in seen["sweep"][1] and "--n-trials" in seen["search"][1]
