"""Input and output paths: checks that fail early with one-line errors, and atomic writes.

``check_input_path`` and ``check_output_path`` run before any heavy work; ``atomic_output`` writes
to a temporary file beside the output and moves it into place only on success, so no partial file
is ever left at the output path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Sequence

from slcompile.errors import InputFormatError, InputNotFoundError, OutputPathError, first_line


def check_input_path(path: str) -> None:
    if not os.path.lexists(path):
        raise InputNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise InputFormatError(f"{path} is a directory, not a model file")
    if not os.path.exists(path):
        raise InputNotFoundError(f"{path} is a broken symbolic link")
    if not os.access(path, os.R_OK):
        raise InputNotFoundError(f"cannot read {path}: permission denied")


def _same_file(a: str, b: str) -> bool:
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output_path(output: str, inputs: Sequence[str] = (), overwrite: bool = False) -> None:
    """Fail early (before any heavy work) if ``output`` cannot be written safely.

    Refuses the input itself (whatever ``overwrite`` says), directories, missing or unwritable
    folders, and existing files unless ``overwrite``. Writability is probed by creating (and
    removing) a temporary file, which also catches read-only file systems."""
    if not output:
        raise OutputPathError("empty output path")
    for src in inputs:
        if src and _same_file(src, output):
            raise OutputPathError(f"output {output} is the input file; refusing to overwrite the input")
    if os.path.isdir(output):
        raise OutputPathError(f"output {output} is a directory; give a file name such as model.sl.pt2")
    if os.path.lexists(output) and not overwrite:
        raise OutputPathError(f"output {output} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        # name the real obstacle: a regular file where a folder should be, or the missing folder
        part = folder
        while part and not os.path.lexists(part) and os.path.dirname(part) != part:
            part = os.path.dirname(part)
        if os.path.lexists(part) and not os.path.isdir(part):
            raise OutputPathError(f"cannot write {output}: {part} is a file, not a folder")
        raise OutputPathError(f"cannot write {output}: folder {folder} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".slcompile-probe-", dir=folder)
    except OSError as e:
        raise OutputPathError(f"cannot write {output}: {e.strerror or first_line(e)}")
    os.close(fd)
    os.unlink(probe)


def _temp_path_for(output: str) -> str:
    folder = os.path.dirname(os.path.abspath(output))
    ext = os.path.splitext(output)[1] or ".pt2"
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=f".partial{ext}", dir=folder)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_output(output: str):
    """Yields a temporary path beside ``output``; on success moves it over ``output``
    (``os.replace``), on any failure (including KeyboardInterrupt) removes it."""
    tmp = _temp_path_for(output)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
