#!/usr/bin/env python
"""Download, unpack and verify the published CIFAR-100 teachers (mdistiller release ``cifar_teachers.tar``).

    python scripts/fetch_teachers.py                  # download into checkpoints/, unpack, verify
    python scripts/fetch_teachers.py --verify-only    # verify an existing checkpoints/cifar_teachers/
    python scripts/fetch_teachers.py --trusted        # allow full unpickling if a file needs it

Verification: every expected ``cifar_teachers/<name>_vanilla/ckpt_epoch_240.pth`` exists and loads strictly
into our model of that name; the sha256 of the archive and of each file and the ``accuracy`` stored in each
file are printed. Exit codes: 0 ok, 1 verification failed, 2 the archive could not be downloaded.
See checkpoints/README.md.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
URL = "https://github.com/megvii-research/mdistiller/releases/download/checkpoints/cifar_teachers.tar"
ARCHIVE_NAME = "cifar_teachers.tar"
FOLDER = "cifar_teachers"
# Published names and the top-1 accuracy (%) quoted for them (RepDistiller/mdistiller/TTM READMEs).
TEACHERS = {
    "wrn_40_2": 75.61,
    "resnet56": 72.34,
    "resnet110": 74.31,
    "resnet32x4": 79.42,
    "vgg13": 74.64,
    "ResNet50": 79.34,
}
EXIT_OK, EXIT_FAILED, EXIT_OFFLINE = 0, 1, 2
CHUNK = 1 << 20


def teacher_path(dest: Path, name: str) -> Path:
    return dest / FOLDER / f"{name}_vanilla" / "ckpt_epoch_240.pth"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def manual_instructions(url: str, dest: Path) -> str:
    return (
        "To install the teachers by hand: on a machine with internet access download\n"
        f"  {url}\n"
        f"copy it here and unpack it with `tar xf {ARCHIVE_NAME} -C {dest}` so that the files are\n"
        f"  {dest}/{FOLDER}/<name>_vanilla/ckpt_epoch_240.pth   for <name> in {', '.join(TEACHERS)}\n"
        f"then check them with: python scripts/fetch_teachers.py --verify-only --dest {dest}\n"
        "(or train your own teachers: see checkpoints/README.md)"
    )


def download(url: str, target: Path, timeout: float) -> str:
    """Stream ``url`` to ``target`` (via a .part file, so an interrupted download never looks complete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    size = 0
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            for block in iter(lambda: response.read(CHUNK), b""):
                out.write(block)
                digest.update(block)
                size += len(block)
                if total and size % (50 * CHUNK) < CHUNK:  # a progress line every ~50 MiB
                    print(f"  {size / CHUNK:.0f} / {total / CHUNK:.0f} MiB")
        if total and size != total:
            raise ConnectionError(f"incomplete download: {size} of {total} bytes")
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(target)
    print(f"saved {target} ({size / CHUNK:.1f} MiB)")
    return digest.hexdigest()


def safe_members(archive: tarfile.TarFile, dest: Path) -> list[tarfile.TarInfo]:
    """Regular files and folders that stay inside ``dest``; anything else (links, devices, absolute paths,
    ``..``) is refused, since a crafted archive could otherwise write outside the destination."""
    root = dest.resolve()
    members = []
    for member in archive.getmembers():
        target = (root / member.name).resolve()
        if member.name.startswith(("/", "\\")) or (target != root and root not in target.parents):
            raise ValueError(f"unsafe path in archive: {member.name!r}")
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"refusing archive member that is not a file or folder: {member.name!r}")
        members.append(member)
    return members


def extract(archive_path: Path, dest: Path) -> None:
    with tarfile.open(archive_path) as archive:
        members = safe_members(archive, dest)
        # The "data" filter (Python >= 3.11.4 / 3.12) repeats the checks and drops permission bits.
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(dest, members=members, **kwargs)
    print(f"unpacked {len(members)} entries into {dest}")


def verify(dest: Path, trusted: bool) -> int:
    """Check every expected teacher file; print sha256, stored and quoted accuracy. Returns an exit code."""
    missing = [name for name in TEACHERS if not teacher_path(dest, name).is_file()]
    if missing:
        for name in missing:
            print(f"MISSING {name}: {teacher_path(dest, name)}")
        print(f"{len(missing)} of {len(TEACHERS)} teacher files missing ({', '.join(missing)})")
        return EXIT_FAILED

    # Imported here so that the download path (and its offline message) does not wait for torch.
    from abkd_vision.models import CheckpointError, create_model, load_checkpoint

    failures = []
    for name, quoted in TEACHERS.items():
        path = teacher_path(dest, name)
        try:
            meta = load_checkpoint(create_model(name), path, trusted=trusted)
        except CheckpointError as err:
            if not trusted and "weights_only" in str(err):
                reason = "needs full unpickling: rerun with --trusted if you trust the source of this file"
            else:
                reason = str(err)
            print(f"FAILED  {name}: {path}\n  {reason}")
            failures.append(name)
            continue
        stored = meta.get("accuracy")
        stored_text = f"{float(stored):.2f}" if isinstance(stored, (int, float)) else repr(stored)
        print(f"ok      {name:<11} sha256 {sha256_of(path)}  accuracy stored {stored_text} (quoted {quoted:.2f})"
              f"  epoch {meta.get('epoch')}")
    if failures:
        print(f"{len(failures)} teacher file(s) failed to load: {', '.join(failures)}")
        return EXIT_FAILED
    print(f"all {len(TEACHERS)} teachers load strictly into our models "
          "(their measured accuracy is logged when a distillation run starts)")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=ROOT / "checkpoints",
                        help="folder receiving cifar_teachers/ (default: checkpoints/ of this checkout)")
    parser.add_argument("--url", default=URL, help="archive URL (default: the mdistiller release)")
    parser.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    parser.add_argument("--verify-only", action="store_true", help="do not download; verify the files in --dest")
    parser.add_argument("--trusted", action="store_true",
                        help="allow full unpickling (torch.load weights_only=False) for files that need it; "
                             "unpickling can run code, so only for files from a source you trust")
    parser.add_argument("--keep-archive", action="store_true", help="keep the .tar after unpacking")
    args = parser.parse_args(argv)
    dest: Path = args.dest

    if not args.verify_only:
        archive = dest / ARCHIVE_NAME
        try:
            digest = download(args.url, archive, args.timeout)
        except urllib.error.HTTPError as err:  # reached a server, which refused: not an offline problem
            print(f"error: {args.url} answered HTTP {err.code} {err.reason}.\n{manual_instructions(args.url, dest)}",
                  file=sys.stderr)
            return EXIT_OFFLINE
        except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
            reason = getattr(err, "reason", err)
            print(f"error: could not reach {args.url} ({reason}).\n"
                  "This machine may be offline, or a firewall/proxy blocks the address.\n"
                  f"{manual_instructions(args.url, dest)}", file=sys.stderr)
            return EXIT_OFFLINE
        print(f"sha256 {digest}  {archive.name}")
        try:
            extract(archive, dest)
        except (tarfile.TarError, ValueError) as err:
            print(f"error: cannot unpack {archive}: {err}", file=sys.stderr)
            return EXIT_FAILED
        if not args.keep_archive:
            archive.unlink()

    return verify(dest, args.trusted)


if __name__ == "__main__":
    sys.exit(main())
