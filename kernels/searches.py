"""The search kinds: one entry per `SuperlinearConfig.search_key`, read by every layer that
dispatches on it (config validation, the ops, the Triton dispatch, export, sequence parallelism,
calibration, the benchmarks). Adding a search kind is one contract section, one reference
function, one kernel and one entry here.

Each kind names its contract and family:

* ``"blocksparse"`` (docs/blocksparse.md): query blocks choose key blocks; one op,
  ``superlinear::block_sparse_attention``, searches and attends.
* ``"stripe"`` (docs/spec.md): a query scores one key per stripe (``stripe_key``: the anchor's
  own key, or the mean key of its span) and attends spans around the best anchors; the ops
  ``span_search`` and ``span_attention`` (and ``nstep_search`` with steps >= 3, docs/nstep.md).
* ``"block"`` (docs/routing.md): the same span ops, the anchors found coarse to fine through
  key-block bounds (``pool``: the best candidates rescored by their exact largest logit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

FAMILIES = ("blocksparse", "stripe", "block")


@dataclass(frozen=True)
class SearchKind:
    """What the layers need to know of a search kind.

    window, topk: the config's defaults for this kind (keys and key blocks for "blocksparse";
    keys and spans otherwise); topk_max: topk's bound. stripe_key: "anchor" or "mean" for the
    stripe family. pool: a block search that rescores its best candidates exactly. triton: a
    Triton kernel exists (else the reference runs on every device). nstep: has the N-step form.
    onnx: exports to standard ONNX operators. search_grad: the search's scores carry a gradient
    to the search query (combine="gated")."""

    name: str
    family: str
    contract: str
    window: int
    topk: int
    topk_max: int
    stripe_key: Optional[str] = None
    pool: bool = False
    triton: bool = True
    nstep: bool = False
    onnx: bool = False
    search_grad: bool = False

    @property
    def block_sparse(self) -> bool:
        return self.family == "blocksparse"

    @property
    def block_bounds(self) -> bool:
        """Anchors found through key-block bounds (docs/routing.md)."""
        return self.family == "block"


_KINDS = (
    SearchKind("blocksparse", "blocksparse", "docs/blocksparse.md", window=256, topk=24,
               topk_max=256, onnx=True),
    SearchKind("anchor", "stripe", "docs/spec.md", window=64, topk=3, topk_max=8,
               stripe_key="anchor", nstep=True, onnx=True, search_grad=True),
    SearchKind("mean", "stripe", "docs/spec.md", window=64, topk=3, topk_max=8,
               stripe_key="mean", nstep=True, onnx=True, search_grad=True),
    SearchKind("block", "block", "docs/routing.md", window=64, topk=3, topk_max=8),
    SearchKind("block_rerank", "block", "docs/routing.md", window=64, topk=3, topk_max=8,
               pool=True),
)
REGISTRY: Dict[str, SearchKind] = {k.name: k for k in _KINDS}
assert all(k.family in FAMILIES for k in _KINDS)


def names(**having) -> Tuple[str, ...]:
    """The search keys whose entries have the given attribute values, in registry order:
    ``names(onnx=True)``, ``names(family="block")``."""
    return tuple(name for name, k in REGISTRY.items()
                 if all(getattr(k, a) == v for a, v in having.items()))


def kind(search_key: str) -> SearchKind:
    """The entry of a search key; a ValueError naming the known keys otherwise."""
    try:
        return REGISTRY[search_key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown search_key {search_key!r}: expected one of "
                         f"{tuple(REGISTRY)}") from None
