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
    changed; what the user has already compiled is left in place (no ``torch._dynamo.reset()``).

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

    def backend(gm, inputs):  # a new function per call: dynamo's backend guard traces afresh
        reports.append(rewrite_graph(gm, config, dry_run=True))
        return gm.forward

    # No torch._dynamo.reset(): that would drop what the user has compiled (their next call would
    # recompile). Dynamo's cache entries are guarded by their backend, so this trace neither reuses
    # nor replaces the user's entries; the recompile limits are lifted for it, so a model already
    # compiled several times (or explained before) is still traced rather than run eagerly.
    big = 1 << 20
    # Static shapes (the example inputs' own), whatever shapes earlier compiles of the same code saw.
    with torch._dynamo.config.patch(recompile_limit=big, accumulated_recompile_limit=big,
                                    error_on_recompile=False, automatic_dynamic_shapes=False):
        compiled = torch.compile(model, backend=backend)
        with torch.no_grad():
            compiled(*example_inputs, **(kwargs or {}))
    out = RewriteReport(sites=[], graphs=0)
    for r in reports:
        out = out.merge(r)
    for s in out.sites:
        if s.reason == "dry run":
            s.rewritten, s.reason = True, ""
    return out
