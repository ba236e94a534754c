"""Writing files so that nothing half-written is ever left: a temporary sibling named after this process, then a
rename. A later run can tell (and remove) the temporary of a process that was killed mid-write; a full disk is one
line naming the path. No torch here: the experiment's parent process writes through these and never imports it.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hybridprune.core.errors import HybridPruneError

logger = logging.getLogger(__name__)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(dest: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID-*` folders of `dest` left by a process that no longer runs (killed mid-save)."""
    removed = []
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        pid = tmp.name[len(f".{dest.name}.tmp-"):].split("-", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    if removed:
        logger.info(f"removed {len(removed)} unfinished temporary folder(s) of {dest} left by an interrupted run")
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_dir(dest: str | Path, overwrite: bool = False):
    """Yield a temporary folder next to `dest`; it becomes `dest` only if the block finishes.

    The temporary is named after this process, so a later run can tell (and remove) one left by a killed run;
    the result gets the permissions of a folder made with the user's umask, not mkdtemp's private 0700.
    """
    dest = check_out_path(dest)
    if dest.exists() and not overwrite:
        raise HybridPruneError(f"output folder {dest} exists; pass --overwrite or choose another --out")
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            dest.rename(old)
            tmp.rename(dest)
            remove_path(old)
        else:
            tmp.rename(dest)
    except Exception as e:
        if disk_full(e):
            raise HybridPruneError(f"no space left on the device while writing {dest}; free some space or choose "
                                   "another --out (nothing was written)") from None
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def check_out_path(dest: str | Path) -> Path:
    """An output path must name something of its own (not `.`, `..` or a folder holding the current one), must not
    be a dangling symbolic link, and must lie where this process can write: checked before any work."""
    dest = Path(dest)
    if dest.is_symlink() and not dest.exists():
        raise HybridPruneError(f"--out {dest} is a symbolic link to {os.readlink(dest)}, which does not exist; "
                               "remove the link or choose another --out")
    if dest.name in ("", ".", "..") or Path.cwd() == dest.resolve() or dest.resolve() in Path.cwd().parents:
        raise HybridPruneError(f"--out {str(dest)!r} is the current folder or one above it; name a new folder, "
                               "e.g. --out out/pruned")
    check_writable(dest)
    return dest


def check_writable(dest: str | Path) -> None:
    """The nearest existing folder above `dest` must be a folder this process can write (a read-only filesystem,
    a file in the way); one line naming it."""
    dest = Path(dest)
    for parent in dest.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise HybridPruneError(f"cannot write {dest}: {parent} is a file, not a folder; choose another "
                                       "--out")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise HybridPruneError(f"cannot write {dest}: {parent} is read-only; choose another --out")
            return


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def disk_full(e: BaseException) -> bool:
    """An OSError with ENOSPC, or a library's error that wraps one (safetensors: 'No space left on device')."""
    return getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e) or \
        "StorageFull" in str(e)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file through a temporary sibling and a rename: readers never see half a file, and a failed write
    (a full disk) leaves nothing behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if disk_full(e):
            raise HybridPruneError(f"no space left on the device while writing {path}; free some space or write "
                                   "elsewhere (nothing was written)") from None
        raise
