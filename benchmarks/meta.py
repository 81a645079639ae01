"""What a benchmark records about the code it measured."""

from __future__ import annotations

import os
import subprocess


def commit() -> str:
    """The commit measured: ``$SLCOMPILE_COMMIT`` where the caller states it (a copy of the tree
    without its current git history, as a remote GPU machine receives, would otherwise report a
    stale commit or none), else ``git describe --always --dirty`` of this checkout, else ''."""
    stated = os.environ.get("SLCOMPILE_COMMIT", "").strip()
    if stated:
        return stated
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
