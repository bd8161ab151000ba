"""Up-front checks of a dataset's image files, so that bad files are found (and named) before training.

Levels (``check_images`` of the data modules):

* ``"off"``: nothing is checked;
* ``"header"`` (default): per file, a size > 0, a readable header (PIL identifies the format and size without
  decoding) and an intact end: a JPEG must end with the EOI marker ``FF D9`` (trailing zero bytes allowed), a
  PNG with the 12-byte IEND chunk. A file whose end fails this test is then decoded once: only if decoding fails
  too is it bad (data appended after the end marker, which some cameras write, is harmless). Other formats: the
  header only;
* ``"full"``: the header checks plus a full decode of every image.

The files are checked by a thread pool (the work is I/O bound). The result, the list of bad files, is cached in
``<cache root>/image-checks/<key>.json`` (cache root: ``$ABKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/abkd-vision``,
else ``~/.cache/abkd-vision``), keyed by a SHA-256 of the sorted (absolute path, size, mtime_ns, ctime_ns) of the
checked files and the level: a second check of unchanged files only ``stat``s them (ctime_ns: a ``chmod`` that
fixes an unreadable file also invalidates the result). An unwritable cache folder disables the cache.

A bad file is either an error (``on_bad_image="raise"``: one ValueError naming the files, their problems and the
fix) or left out (``"skip"``: the data module drops it and lists it in ``bad_images`` and the run folder's
``bad_images.json``). A file that fails to decode later anyway raises :class:`ImageDecodeError` naming the file,
the split and the sample index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from abkd_vision.io import atomic_write

__all__ = [
    "CHECK_LEVELS",
    "ON_BAD_IMAGE",
    "ImageDecodeError",
    "bad_image_error",
    "cache_root",
    "check_image_file",
    "check_options",
    "decode_error",
    "empty_classes_error",
    "find_bad_images",
    "screen_images",
    "write_bad_images",
]

log = logging.getLogger(__name__)

CHECK_LEVELS = ("off", "header", "full")
ON_BAD_IMAGE = ("raise", "skip")

JPEG_EOI = b"\xff\xd9"
PNG_IEND = bytes.fromhex("0000000049454e44ae426082")
_TAIL_BLOCK = 4096
_CHUNK = 256  # files per thread-pool task
_CACHE_VERSION = 1

SKIP_HINT = ("re-download or delete these files, or set data.init_args.on_bad_image: skip to train without them "
             "(they are listed in the run's records: datamodule.bad_images and bad_images.json in the run folder)")
DECODE_HINT = ("the file changed after the up-front check, or the check is off or only reads headers; re-download or "
               "replace it, or set data.init_args.check_images: full (decodes every image once; cached) with "
               "data.init_args.on_bad_image: skip to train without such files")


class ImageDecodeError(RuntimeError):
    """An image that could not be loaded while reading a sample (the message names the file, split and index)."""


def check_options(check_images: str, on_bad_image: str) -> None:
    """ValueError listing the choices for an unknown ``check_images`` or ``on_bad_image``."""
    if check_images not in CHECK_LEVELS:
        raise ValueError(f"check_images must be one of {', '.join(map(repr, CHECK_LEVELS))}, got {check_images!r}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(map(repr, ON_BAD_IMAGE))}, got {on_bad_image!r}")


def cache_root() -> Path:
    """``$ABKD_CACHE_DIR``, else ``$XDG_CACHE_HOME/abkd-vision``, else ``~/.cache/abkd-vision``."""
    env = os.environ.get("ABKD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "abkd-vision"


def _workers() -> int:
    return min(32, 4 * (os.cpu_count() or 1))


# -- one file ------------------------------------------------------------------------------------------------------


def _jpeg_end_ok(f, size: int) -> bool:
    """True if the file ends with ``FF D9``, possibly followed by zero bytes."""
    end, tail = size, b""
    while end > 0:
        start = max(0, end - _TAIL_BLOCK)
        f.seek(start)
        tail = f.read(end - start) + tail
        stripped = tail.rstrip(b"\x00")
        if len(stripped) >= 2 or start == 0:
            return stripped.endswith(JPEG_EOI)
        tail, end = stripped, start  # only zeros (and maybe one byte) so far: read further back
    return False


def _png_end_ok(f, size: int) -> bool:
    if size < len(PNG_IEND):
        return False
    f.seek(size - len(PNG_IEND))
    return f.read(len(PNG_IEND)) == PNG_IEND


def _truncated(f, size: int) -> str | None:
    """For a file whose header does not parse: the truncation problem if it starts like a JPEG or PNG but lacks
    that format's end, else None."""
    f.seek(0)
    magic = f.read(8)
    if magic.startswith(b"\xff\xd8\xff") and not _jpeg_end_ok(f, size):
        return "truncated (no JPEG end marker)"
    if magic == b"\x89PNG\r\n\x1a\n" and not _png_end_ok(f, size):
        return "truncated (no PNG IEND chunk)"
    return None


def _io_error(err: OSError) -> bool:
    """An operating-system error (errno set), as opposed to PIL's format errors (plain OSError)."""
    return err.errno is not None


def check_image_file(path: str | os.PathLike, level: str = "header", size: int | None = None) -> str | None:
    """What is wrong with one image file, or None if it passes ``level`` ("header" or "full").

    ``size``: the file's size if already known (saves a ``stat``). Problems: ``"empty file"``, ``"cannot read:
    permission denied"`` (or another OS error), ``"cannot identify image file ..."``, ``"unreadable header: ..."``,
    ``"truncated (no JPEG end marker)"``, ``"truncated (no PNG IEND chunk)"``, ``"cannot decode: ..."``.
    """
    try:
        if size is None:
            size = os.stat(path).st_size
        if size == 0:
            return "empty file"
        with open(path, "rb") as f:
            try:
                img = Image.open(f)
            except UnidentifiedImageError:
                return _truncated(f, size) or "cannot identify image file (not an image, or a format PIL cannot read)"
            except OSError as err:
                if _io_error(err):
                    raise
                return _truncated(f, size) or f"unreadable header: {err}"
            except Exception as err:  # PIL's plug-ins raise SyntaxError, ValueError, struct.error, ...
                return _truncated(f, size) or f"unreadable header: {type(err).__name__}: {err}"
            with img:
                end_problem = None
                if img.format in ("JPEG", "MPO") and not _jpeg_end_ok(f, size):
                    end_problem = "truncated (no JPEG end marker)"
                elif img.format == "PNG" and not _png_end_ok(f, size):
                    end_problem = "truncated (no PNG IEND chunk)"
                if level == "full" or end_problem is not None:
                    try:
                        img.load()
                    except OSError as err:
                        if _io_error(err):
                            raise
                        return end_problem or f"cannot decode: {err}"
                    except Exception as err:
                        return end_problem or f"cannot decode: {type(err).__name__}: {err}"
    except PermissionError:
        return "cannot read: permission denied"
    except FileNotFoundError:
        return "cannot read: file not found"
    except OSError as err:
        return f"cannot read: {err.strerror or err}"
    return None


def _describe(path: str, problem: str) -> str:
    """One line of a report: ``cannot read <path>: <why>`` or ``<path>: <problem>``."""
    if problem.startswith("cannot read: "):
        return f"cannot read {path}: {problem[len('cannot read: '):]}"
    return f"{path}: {problem}"


# -- many files ----------------------------------------------------------------------------------------------------


def _stat_chunk(paths: Sequence[str]) -> list[tuple[int, int, int] | str]:
    """``(size, mtime_ns, ctime_ns)`` of each file, or its problem if it cannot be ``stat``-ed."""
    out: list[tuple[int, int, int] | str] = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        except PermissionError:
            out.append("cannot read: permission denied")
        except OSError as err:
            out.append(f"cannot read: {err.strerror or err}")
    return out


def _check_chunk(paths: Sequence[str], sizes: Sequence[int], level: str) -> list[str | None]:
    return [check_image_file(p, level, s) for p, s in zip(paths, sizes)]


def _chunks(seq: Sequence, n: int = _CHUNK):
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def _key(abspaths: Sequence[str], stats: Sequence, level: str) -> str:
    digest = hashlib.sha256(f"image-check v{_CACHE_VERSION}\nlevel={level}\n".encode())
    order = sorted(range(len(abspaths)), key=abspaths.__getitem__)
    for block in _chunks(order, 4096):
        rows = []
        for i in block:
            st = stats[i]
            size, mtime, ctime = st if isinstance(st, tuple) else (-1, -1, -1)
            rows.append(f"{abspaths[i]}\t{size}\t{mtime}\t{ctime}\n")
        digest.update("".join(rows).encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _read_cache(path: Path, level: str, n: int) -> list[tuple[str, str]] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != _CACHE_VERSION or data.get("level") != level or data.get("num_files") != n:
            return None
        return [(str(p), str(problem)) for p, problem in data["bad"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, level: str, n: int, bad: list[tuple[str, str]]) -> None:
    payload = {"version": _CACHE_VERSION, "level": level, "num_files": n, "bad": [list(b) for b in bad]}
    try:
        atomic_write(path, json.dumps(payload) + "\n")
    except OSError as err:  # a read-only or full cache folder: check again next time
        log.debug("image check not cached (%s: %s)", path, err)


def find_bad_images(paths: Sequence[str], level: str = "header", cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, workers: int | None = None) -> list[tuple[str, str]]:
    """``(path, problem)`` of every bad file among ``paths``, in input order (paths as given).

    ``cache_dir``: folder of the result cache (default ``cache_root() / "image-checks"``); ``use_cache`` False
    neither reads nor writes it. ``workers``: threads (default min(32, 4 x CPU count)).
    """
    check_options(level, "raise")
    paths = [os.fspath(p) for p in paths]
    if level == "off" or not paths:
        return []
    started = time.perf_counter()
    abspaths = [os.path.abspath(p) for p in paths]
    workers = workers or _workers()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="image-check") as pool:
        stats = [s for block in pool.map(_stat_chunk, _chunks(abspaths)) for s in block]
        cache_file = None
        if use_cache:
            cache_file = Path(cache_dir if cache_dir is not None else cache_root() / "image-checks")
            cache_file = cache_file / f"{_key(abspaths, stats, level)}.json"
            cached = _read_cache(cache_file, level, len(paths))
            if cached is not None:
                log.debug("image check of %d files: cached in %s", len(paths), cache_file)
                bad_abs = dict(cached)
                return [(p, bad_abs[a]) for p, a in zip(paths, abspaths) if a in bad_abs]
        if len(paths) >= 10000:
            log.info("checking %d image files (level %s, %d threads; the result is cached)", len(paths), level,
                     workers)
        problems: list[str | None] = [s if isinstance(s, str) else None for s in stats]
        todo = [i for i, s in enumerate(stats) if not isinstance(s, str)]
        blocks = _chunks(todo)
        results = pool.map(_check_chunk, [[abspaths[i] for i in b] for b in blocks],
                           [[stats[i][0] for i in b] for b in blocks], [level] * len(blocks))
        for block, found in zip(blocks, results):
            for i, problem in zip(block, found):
                problems[i] = problem
    bad = [(paths[i], p) for i, p in enumerate(problems) if p is not None]
    if cache_file is not None:
        bad_abs = [(abspaths[i], p) for i, p in enumerate(problems) if p is not None]
        _write_cache(cache_file, level, len(paths), bad_abs)
    log.info("checked %d image files (level %s) in %.1f s: %d bad", len(paths), level,
             time.perf_counter() - started, len(bad))
    return bad


# -- data-module side ----------------------------------------------------------------------------------------------


def bad_image_error(bad: Sequence[dict], where: str) -> ValueError:
    """The ValueError of ``on_bad_image="raise"``: the first 10 files and their problems, the count, the fix."""
    lines = "\n".join(f"  {_describe(b['path'], b['problem'])}" for b in bad[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    return ValueError(f"{len(bad)} bad image file(s) in {where}:\n{lines}{more}\n{SKIP_HINT}")


def empty_classes_error(names: Sequence[str], where: str, skipped: int) -> ValueError:
    return ValueError(f"class(es) {', '.join(map(repr, names))} of {where} have no image left after skipping "
                      f"{skipped} bad image file(s); re-download or replace their files (see datamodule.bad_images)")


def decode_error(path: str, index: int, where: str, err: BaseException) -> ImageDecodeError:
    """The error of a sample whose image fails to load: file, sample index, split/dataset, original error, fix."""
    return ImageDecodeError(f"cannot decode image {path} (sample {index} of {where}): {type(err).__name__}: {err}; "
                            f"{DECODE_HINT}")


def screen_images(paths: Sequence[str], *, split: str, where: str, level: str, on_bad: str,
                  trainer=None) -> list[dict]:
    """Check the files of one split; ``[{"path", "problem", "split"}, ...]`` of the bad ones (input order).

    ``on_bad="raise"`` raises :func:`bad_image_error` instead when there is one; ``"skip"`` logs a warning (the
    caller drops the files). ``where`` names the split in messages. Under DDP (``trainer.world_size > 1``) rank 0
    checks first and the other ranks then read its cached result.
    """
    if level == "off":
        return []
    distributed = trainer is not None and getattr(trainer, "world_size", 1) > 1
    if distributed and not trainer.is_global_zero:
        trainer.strategy.barrier("image-check")
    try:
        found = find_bad_images(paths, level)
    finally:
        if distributed and trainer.is_global_zero:
            trainer.strategy.barrier("image-check")
    bad = [{"path": p, "problem": problem, "split": split} for p, problem in found]
    if bad and on_bad == "raise":
        raise bad_image_error(bad, where)
    if bad:
        shown = "; ".join(_describe(b["path"], b["problem"]) for b in bad[:3]) + ("; ..." if len(bad) > 3 else "")
        log.warning("skipping %d bad image file(s) of %s (on_bad_image: skip; listed in datamodule.bad_images and "
                    "the run folder's bad_images.json): %s", len(bad), where, shown)
    return bad


def write_bad_images(trainer, bad_images: Sequence[dict]) -> Path | None:
    """Write ``bad_images`` to ``<trainer.log_dir>/bad_images.json`` (rank 0, only with a logger and bad files).

    ``trainer.log_dir`` is a collective under DDP: call this on every rank.
    """
    if trainer is None or trainer.logger is None:
        return None
    log_dir = trainer.log_dir  # every rank asks
    if log_dir is None or not trainer.is_global_zero or not bad_images:
        return None
    return atomic_write(Path(log_dir) / "bad_images.json", json.dumps(list(bad_images), indent=2) + "\n")
