"""Atomic writes: every file snapens writes (snapshots, checkpoints, caches, reports, plots) goes through here.

The bytes go to a temporary file beside the target, are fsynced, and the temporary file is renamed over the target
(the way timm's checkpoint saver does it), so a reader, or a run killed at any moment, sees either the old file or
the new one, never half of one.
"""

import hashlib
import io
import logging
import os
import re
import socket
import tempfile
from pathlib import Path

from snapens.errors import SnapensError


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` all or nothing, even on a crash; a failure leaves the earlier file intact."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{WRITER}.", suffix=".tmp")
    except OSError as e:
        raise SnapensError(f"cannot write {path}: {e.strerror or e}; make the folder writable") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; these are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, a read-only or vanished folder: the file under `path` is untouched
        Path(tmp).unlink(missing_ok=True)
        raise SnapensError(f"cannot write {path}: {e.strerror or e}; the earlier file under that name is intact "
                           "(free some space, or fix the folder's permissions, and run the command again)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def partial_name(path: Path, suffix: str) -> Path:
    """Where a writer that cannot take write_atomic's bytes (torch.export.save wants a path ending in `suffix`) puts
    its file before renaming it: hidden, beside `path`, named after its writer (WRITER) for `sweep_leftovers`."""
    return path.with_name(f".{path.stem}.{WRITER}.partial{suffix}")


# Who writes a temporary file, in its name: this machine and process, so that a later snapens process on the same
# machine can tell a killed writer's leftovers from a running one's (on a shared filesystem, another machine's
# files are never touched).
HOST = re.sub(r"\W", "_", socket.gethostname()) or "host"
WRITER = f"snapens-{HOST}-{os.getpid()}"
LEFTOVER = re.compile(r"^\..+\.snapens-(\w+)-(\d+)\.(?:\w+\.tmp|partial\.pt2)$")


def sweep_leftovers(folder: Path) -> list[Path]:
    """Remove the temporary files in `folder` that a killed snapens process of this machine left (no process of
    the id in their names runs any more): a tool sweeps its output folder at its next start. Files of running
    processes or of other machines, and every other file, are left alone. Returns what was removed."""
    removed = []
    for path in Path(folder).glob(".*") if Path(folder).is_dir() else ():
        match = LEFTOVER.match(path.name)
        if match and match.group(1) == HOST and not _running(int(match.group(2))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def check_writable(target: Path, fix: str) -> None:
    """`target` (a folder, or a file to write) can be made or replaced: the folder it is in, or the nearest one that
    exists, is writable. Else SnapensError, before any work is done, saying `fix` (the key to change)."""
    target = Path(target).absolute()
    existing = next(p for p in (target, *target.parents) if p.exists())
    if existing != target and not existing.is_dir():
        raise SnapensError(f"cannot write {target}: {existing} is a file, not a folder; pass another {fix}")
    folder = existing if existing.is_dir() else existing.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SnapensError(f"cannot write {target}: {folder} is not writable; pass a writable {fix}")


def save_figure(figure, path: Path, dpi: int = 120) -> None:
    """A matplotlib figure laid out tightly, written atomically as a PNG (a full disk never leaves a 0-byte plot
    behind), then closed."""
    import matplotlib.pyplot as plt  # only the callers that plot need matplotlib

    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # a missing display font is no news
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    write_atomic(path, buffer.getvalue())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def refuse_to_replace(path: Path, overwrite: bool) -> None:
    """A tool's output is never replaced silently: SnapensError when `path` exists and `overwrite` is False."""
    if path.exists() and not overwrite:
        raise SnapensError(f"{path} exists, written by an earlier call; pass out=DIR (a new place), or "
                           "overwrite=true to replace it")
