"""What the config generators share: compare or write a set of generated files, and spot stale ones.

A generator builds ``{relative path: text}`` from its tables; ``main(files, owned_dirs, ...)`` then either writes
them (removing YAML files in the owned folders that it no longer generates) or, with ``--check``, exits 1 listing
every missing, differing or stale file. The output depends only on the tables, so tests can run ``--check``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def num(x: float) -> str:
    """Shortest exact float literal (repr), so files are stable and readable: 0.1, -0.2, 45.0."""
    return repr(float(x))


def stale_files(root: Path, files: dict[Path, str], owned_dirs: list[Path]) -> list[Path]:
    """YAML files in the generated folders that the generator would not write (e.g. a renamed entry)."""
    found = {p.relative_to(root) for d in owned_dirs for p in (root / d).glob("*.yaml")}
    return sorted(found - set(files))


def check(root: Path, files: dict[Path, str], owned_dirs: list[Path], script: str) -> int:
    problems = []
    for rel, text in files.items():
        path = root / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"differs: {rel}")
    problems += [f"not generated (stale): {rel}" for rel in stale_files(root, files, owned_dirs)]
    if problems:
        print("\n".join(problems))
        print(f"{len(problems)} file(s) out of date; run: python {script}")
        return 1
    print(f"all {len(files)} generated configs are up to date")
    return 0


def write(root: Path, files: dict[Path, str], owned_dirs: list[Path]) -> int:
    for rel in stale_files(root, files, owned_dirs):  # the folders hold only generated files
        (root / rel).unlink()
        print(f"removed stale {rel}")
    changed = 0
    for rel, text in files.items():
        path = root / rel
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        changed += 1
    print(f"wrote {changed} of {len(files)} configs")
    return 0


def main(expected_files: Callable[[], dict[Path, str]], owned_dirs: Callable[[], list[Path]], script: str,
         default_root: Path, description: str, argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if any file differs")
    parser.add_argument("--root", type=Path, default=default_root, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    files, dirs = expected_files(), owned_dirs()
    return check(args.root, files, dirs, script) if args.check else write(args.root, files, dirs)
