"""`slcompile.explain`: what the rewrite would do to a model, as data."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from slcompile.kernels.config import SuperlinearConfig


def explain(model, *example_inputs, config: Optional[SuperlinearConfig] = None,
            kwargs: Optional[Dict[str, Any]] = None):
    """Trace `model` on the example inputs with TorchDynamo and report every attention site.

    The model runs once under ``torch.no_grad()`` (through the analysed, unmodified graphs). Graph
    breaks give several graphs; the report merges them. Nothing is compiled and the model is not
    changed.

    Args:
        model: an ``nn.Module`` or callable.
        *example_inputs: positional inputs.
        config: the `SuperlinearConfig` the rewrite would use (defaults if None).
        kwargs: keyword inputs (e.g. ``{"input_ids": ..., "attention_mask": ...}``).

    Returns:
        `slcompile.passes.RewriteReport`.
    """
    from slcompile.passes import RewriteReport, rewrite_graph

    if config is None:
        config = SuperlinearConfig()
    if not isinstance(config, SuperlinearConfig):
        raise TypeError(f"explain: config must be a SuperlinearConfig, got {type(config).__name__}")
    reports: List[RewriteReport] = []

    def backend(gm, inputs):
        reports.append(rewrite_graph(gm, config, dry_run=True))
        return gm.forward

    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            compiled(*example_inputs, **(kwargs or {}))
    finally:
        torch._dynamo.reset()
    out = RewriteReport(sites=[], graphs=0)
    for r in reports:
        out = out.merge(r)
    for s in out.sites:
        if s.reason == "dry run":
            s.rewritten, s.reason = True, ""
    return out
