"""``SuperlinearConfig`` values from user input: field overrides (the CLI's config options) and
JSON config files (``build_config``), and the exact counterpart of a config (``exact_config``).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from slcompile.errors import ConfigError, InputFormatError, InputNotFoundError, first_line


CONFIG_FIELDS = ("window", "sinks", "topk", "search_power", "span_power", "backward_factor",
                 "forward_factor", "combine", "search_key", "dense_below", "scale", "steps",
                 "q_block", "k_block", "block_rows", "block_pool", "exact_rows", "block_group",
                 "spread_rows")


def build_config(overrides: Optional[Dict[str, Any]] = None, config_file: Optional[str] = None,
                 base: Optional[Any] = None):
    """A ``SuperlinearConfig`` from a JSON file and/or field overrides (None values ignored).
    Invalid values raise ``ConfigError`` carrying the config's own message."""
    from slcompile.kernels.config import SuperlinearConfig

    fields: Dict[str, Any] = {}
    if config_file is not None:
        if not os.path.isfile(config_file):
            raise InputNotFoundError(f"config file not found: {config_file}")
        try:
            with open(config_file) as f:
                loaded = json.load(f)
        except (OSError, ValueError) as e:
            raise InputFormatError(f"config file {config_file} is not valid JSON: {first_line(e)}")
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file} must hold a JSON object of "
                              f"SuperlinearConfig fields, got {type(loaded).__name__}")
        fields.update(loaded)
    fields.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return (base if base is not None else SuperlinearConfig()).replace(**fields)
    except (ValueError, TypeError) as e:
        raise ConfigError(first_line(e))


def exact_config(config):
    """The exact counterpart of ``config`` (same mode, window covering everything, dense_below=0)."""
    from slcompile.kernels.config import SuperlinearConfig

    keep = {k: v for k, v in config.to_dict().items() if k not in ("window", "dense_below")}
    return SuperlinearConfig.exact(**keep)
