"""Files written whole or not at all: a temp file in the same folder, fsynced, renamed over the target, and the
folder fsynced so that the rename itself survives a power cut. A full disk is the user's to fix, said in one line;
whatever was there before stays intact."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mtl_cli.errors import UserError

FULL = (errno.ENOSPC, errno.EDQUOT)


def write_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Calls write(file) on a temp file beside `path`, then renames it to `path`. Temp files that killed
    writers left beside it are removed first (a run directory has one writer: see guard.RunLock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except OSError as e:
        raise write_error(e, path) from None
    except RuntimeError as e:  # torch.save reports a failed write as a RuntimeError raised while handling the OSError
        if isinstance(e.__context__, OSError):
            raise write_error(e.__context__, path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_error(e: OSError, path: Path) -> UserError:
    kept = "the previous file there is intact" if path.exists() else "nothing was written there"
    if e.errno in FULL:
        free = shutil.disk_usage(path.parent).free
        return UserError(f"the disk is full: could not write {path} ({free / 2**20:.1f} MiB free on that disk); "
                         f"{kept}. Free some space, then resume from the last checkpoint")
    return UserError(f"could not write {path}: {e.strerror or e}; {kept}. Give a writable hydra.run.dir")


def fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
