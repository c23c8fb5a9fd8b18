"""Writing outputs so that a reader never sees half a file: temp file, fsync, rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import LabellessError

__all__ = [
    "atomic_path", "atomic_write_bytes", "atomic_write_text", "atomic_write_json", "check_output_dir",
    "check_input_file", "is_writable_folder",
]


def check_output_dir(path: str | Path) -> Path:
    """The folder an output file goes into; a clear error if it is missing or read-only, or if
    ``path`` itself is a folder."""
    target = Path(path)
    folder = target.resolve().parent
    if target.is_dir():
        raise LabellessError(f"output {str(target)!r} is a folder: give the name of a file to write")
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise LabellessError(f"output folder {str(folder)!r} {what}: create it first")
    if not is_writable_folder(folder):
        raise LabellessError(f"output folder {str(folder)!r} is not writable: choose another -o")
    return folder


def is_writable_folder(folder: str | Path) -> bool:
    """Writable by this process (its effective user, as when it creates a file there)."""
    if os.access in os.supports_effective_ids:
        return os.access(folder, os.W_OK | os.X_OK, effective_ids=True)
    return os.access(folder, os.W_OK | os.X_OK)


def check_input_file(path: str | Path, what: str = "input file", error: type[LabellessError] = LabellessError) -> Path:
    """``path`` as a readable regular file, or ``error`` with one line saying what is wrong.

    Example:
        >>> check_input_file("plan.yaml", "plan file", PlanError)
        PosixPath('plan.yaml')
    """
    path = Path(path)
    try:
        if not path.exists():
            raise error(f"{what} {str(path)!r} does not exist: check the path")
        if path.is_dir():
            raise error(f"{what} {str(path)!r} is a folder, not a file: give the path of a file")
        if not path.is_file():
            raise error(f"{what} {str(path)!r} is not a regular file: give the path of a file")
        with open(path, "rb"):
            pass
    except PermissionError:
        raise error(f"cannot read {what} {str(path)!r}: permission denied; make it readable (chmod +r) "
                    f"or copy it somewhere you can read") from None
    except OSError as exc:
        raise error(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}; check the file and its disk") from None
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` at once.

    A reader sees the old file or the new one, never half of one. An error removes the
    temporary file; a process killed while writing can leave ``.NAME.XXXXXXXX.tmp`` behind,
    which nothing reads and which may be deleted.
    """
    folder = check_output_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes it private, and some writers (safetensors) recreate it private: outputs
        # are ordinary files, so set the mode after writing.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
