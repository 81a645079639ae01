"""slcompile.passes: FX analysis and rewriting of attention sites.

`rewrite_graph(gm, config)` finds dense attention (SDPA calls and softmax(q @ k^T) @ v spellings) in
a dynamo or ATen FX graph, proves each mask causal from the graph (`maskproof`), and replaces proven
sites with ``superlinear::span_search`` feeding ``superlinear::span_attention``. It returns a
`RewriteReport`; sites it leaves alone carry the reason.
"""

from .report import RewriteReport, SiteReport
from .rewrite import exported_constants, rewrite_graph

__all__ = ["rewrite_graph", "exported_constants", "RewriteReport", "SiteReport"]
