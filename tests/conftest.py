import os
import sys

# Tests import with --import-mode=importlib (test files in different folders may share a basename);
# make the shared test helpers importable: tests/oracle.py, tests/triton_env.py,
# tests/blocksparse_lists.py, tests/slcompile/cli/cli_helpers.py.
_here = os.path.dirname(os.path.abspath(__file__))
for _p in (_here, os.path.join(_here, "slcompile", "cli")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import triton_env  # noqa: E402,F401  (sets TRITON_INTERPRET before anything imports Triton)
