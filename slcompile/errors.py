"""Every user-facing failure of slcompile, and the exit status the CLI gives it.

Each ``SlcompileError`` subclass carries a one-line message, an ``exit_code`` and a ``kind``; the
CLI prints the message and exits with that code. ``EXIT_CODES`` is the table ``slcompile --help``
prints; ``first_line`` shortens any exception's message to the one line these errors quote.
"""

from __future__ import annotations

from typing import List, Tuple


class SlcompileError(Exception):
    """A user-facing failure: one line of text plus the exit status the CLI uses."""

    exit_code = 70
    kind = "error"

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class CheckFailedError(SlcompileError):
    exit_code = 1
    kind = "check failed"


class UsageError(SlcompileError):
    exit_code = 2
    kind = "usage"


class InputNotFoundError(SlcompileError):
    exit_code = 3
    kind = "input not found"


class InputFormatError(SlcompileError):
    exit_code = 4
    kind = "bad input file"


class PickleRefusedError(SlcompileError):
    exit_code = 5
    kind = "pickle refused"


class OutputPathError(SlcompileError):
    exit_code = 6
    kind = "bad output path"


class ConfigError(SlcompileError):
    exit_code = 7
    kind = "bad config"


class ModelError(SlcompileError):
    """Exporting, rewriting or running the model failed."""

    exit_code = 8
    kind = "model failed"


class NotAvailableError(SlcompileError):
    exit_code = 9
    kind = "not available"


class NothingRewrittenError(SlcompileError):
    exit_code = 10
    kind = "nothing rewritten"


EXIT_CODES: List[Tuple[int, str]] = [
    (0, "success"),
    (1, "check: the rewritten model is not exact under the exact config"),
    (2, "usage error (bad or missing option or argument)"),
    (3, "input file not found or unreadable"),
    (4, "input file corrupt or of the wrong format"),
    (5, "pickled model refused: pass --trust-pickle if you trust the file"),
    (6, "output path unusable (unwritable, exists, or is the input)"),
    (7, "invalid SuperlinearConfig value"),
    (8, "the model could not be exported, rewritten or run"),
    (9, "feature not available (optional dependency or module missing)"),
    (10, "no attention site could be rewritten (nothing to convert, check or benchmark)"),
    (70, "internal error (a bug: rerun with --debug and report it)"),
    (130, "interrupted"),
]


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first meaningful line of an exception's message, shortened."""
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line:
        line = type(exc).__name__
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    return line
