"""Reports of the rewrite: plain dataclasses, printed by the CLI and returned by `slcompile.explain`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass
class SiteReport:
    """One attention site the pass found.

    name: the FX node of the site (the SDPA call or the probs @ V matmul).
    module_path: dotted path of the module it came from (nn_module_stack), or "".
    source: "file:line" of the user code, or "".
    form: "sdpa", "sdpa+mask", "matmul-softmax", "einsum-softmax", "mha".
    q_shape, kv_shape: shapes as strings (symbolic sizes print as s0, s1, ...).
    kv_groups: query heads per (un-repeated) key/value head.
    causal_proven: the mask was proven causal.
    padding: a runtime key-padding mask was carried into the ops.
    rewritten: the site now runs superlinear attention.
    reason: why it was left alone ("" when rewritten).
    """

    name: str
    module_path: str = ""
    source: str = ""
    form: str = ""
    q_shape: Tuple[str, ...] = ()
    kv_shape: Tuple[str, ...] = ()
    kv_groups: int = 1
    causal_proven: bool = False
    padding: bool = False
    rewritten: bool = False
    reason: str = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RewriteReport:
    """All sites of one or more graphs. `found`, `rewritten`, `skipped` are counts."""

    sites: List[SiteReport] = field(default_factory=list)
    graphs: int = 1
    seconds: float = 0.0

    @property
    def found(self) -> int:
        return len(self.sites)

    @property
    def rewritten(self) -> int:
        return sum(1 for s in self.sites if s.rewritten)

    @property
    def skipped(self) -> int:
        return sum(1 for s in self.sites if not s.rewritten)

    @property
    def rewritten_sites(self) -> List[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    @property
    def skipped_sites(self) -> List[SiteReport]:
        return [s for s in self.sites if not s.rewritten]

    def merge(self, other: "RewriteReport") -> "RewriteReport":
        return RewriteReport(self.sites + other.sites, self.graphs + other.graphs,
                             self.seconds + other.seconds)

    def summary(self) -> str:
        reasons = {}
        for s in self.skipped_sites:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
        tail = "".join(f"; {n}x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
        return (f"{self.found} attention site(s) found, {self.rewritten} rewritten, "
                f"{self.skipped} skipped{tail}")

    def to_dict(self) -> dict:
        return {"found": self.found, "rewritten": self.rewritten, "skipped": self.skipped,
                "graphs": self.graphs, "seconds": self.seconds,
                "sites": [s.to_dict() for s in self.sites]}

    def __str__(self) -> str:
        return self.summary()
