"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one, never half of one.

Every file is written to a temporary file beside its target, flushed and fsynced, given the permissions the
process's umask asks for (``mkstemp`` would leave 0600: others on a shared machine could not read the results),
renamed over the target, and the folder is fsynced so that the rename itself survives a crash. A full disk is one
:class:`DiskFullError` that names the folder, the free and the needed space, and says the previous file is intact.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["DiskFullError", "atomic_write", "atomic_write_with", "file_mode", "human_bytes"]

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    try:  # Linux: readable without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask (0644 under umask 022)."""
    return 0o666 & ~_umask()


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class DiskFullError(OSError):
    """No space left while writing ``path``; the previous file at ``path`` (if any) is untouched."""

    def __init__(self, path: str | os.PathLike, needed: int | None = None):
        path = Path(path)
        try:
            free = shutil.disk_usage(path.parent).free
        except OSError:
            free = None
        previous = (f"the previous {path.name} is intact" if path.exists()
                    else f"nothing was written to {path.name}")
        needs = f", {human_bytes(needed)} needed" if needed is not None else ""
        message = (f"no space left on device writing {path}: {path.parent} has {human_bytes(free)} free{needs}; "
                   f"{previous}. Free some space (or write the run elsewhere, e.g. "
                   "--trainer.logger.init_args.save_dir) and continue with the same command and --resume auto")
        super().__init__(errno.ENOSPC, message, str(path))
        self.message, self.path, self.needed, self.free = message, path, needed, free

    def __str__(self) -> str:
        return self.message


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not POSIX, or not allowed: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_with(path: str | os.PathLike, write: Callable[[str], None], needed: int | None = None) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is removed if ``write`` fails, and ``path`` keeps its previous content. ``write`` should
    flush and fsync what it wrote; ``needed`` (bytes) only goes into the message of a full disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            write(tmp)
            os.chmod(tmp, file_mode())
            os.replace(tmp, path)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT) and not isinstance(err, DiskFullError):
                if os.path.exists(tmp):
                    os.remove(tmp)  # frees what the partial file held, so the message's free space is true
                raise DiskFullError(path, needed) from err
            raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_folder(path.parent)
    return path


def atomic_write(path: str | os.PathLike, data: str | bytes | memoryview) -> Path:
    """Write text or bytes to ``path`` atomically (temporary file, fsync, rename)."""
    binary = not isinstance(data, str)
    payload = data if binary else data.encode("utf-8")

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write_with(path, write, needed=len(payload))
