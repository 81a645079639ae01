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

``RETIRED`` names the keys that were removed: a config, a saved file or a graph that names one is
refused with one line saying so and what to use instead (``retired``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

FAMILIES = ("blocksparse", "stripe")


@dataclass(frozen=True)
class SearchKind:
    """What the layers need to know of a search kind.

    window, topk: the config's defaults for this kind (keys and key blocks for "blocksparse";
    keys and spans otherwise); topk_max: topk's bound. stripe_key: "anchor" or "mean" for the
    stripe family. triton: a Triton kernel exists (else the reference runs on every device).
    nstep: has the N-step form.
    onnx: exports to standard ONNX operators. search_grad: the search's scores carry a gradient
    to the search query (combine="gated")."""

    name: str
    family: str
    contract: str
    window: int
    topk: int
    topk_max: int
    stripe_key: Optional[str] = None
    triton: bool = True
    nstep: bool = False
    onnx: bool = False
    search_grad: bool = False

    @property
    def block_sparse(self) -> bool:
        return self.family == "blocksparse"


_KINDS = (
    SearchKind("blocksparse", "blocksparse", "docs/blocksparse.md", window=256, topk=24,
               topk_max=256, onnx=True),
    SearchKind("anchor", "stripe", "docs/spec.md", window=64, topk=3, topk_max=8,
               stripe_key="anchor", nstep=True, onnx=True, search_grad=True),
    SearchKind("mean", "stripe", "docs/spec.md", window=64, topk=3, topk_max=8,
               stripe_key="mean", nstep=True, onnx=True, search_grad=True),
)
REGISTRY: Dict[str, SearchKind] = {k.name: k for k in _KINDS}
assert all(k.family in FAMILIES for k in _KINDS)


def names(**having) -> Tuple[str, ...]:
    """The search keys whose entries have the given attribute values, in registry order:
    ``names(onnx=True)``, ``names(family="stripe")``."""
    return tuple(name for name, k in REGISTRY.items()
                 if all(getattr(k, a) == v for a, v in having.items()))


# Retired search keys -> why. The block searches ("block", "block_rerank": coarse-to-fine key-block
# bounds, the second with an exact rescoring; SuperlinearConfig.for_pretrained() used the second)
# ran 4-50x slower than dense attention, while the default (blocksparse) runs 12.5x faster than SDPA
# at 128K and found 8 of 27 needles at 8K where dense finds 7 (benchmarks/RESULTS.md).
RETIRED: Dict[str, str] = dict.fromkeys(("block", "block_rerank"),
                                        "the block searches ran slower than dense attention")
# Config fields only the retired searches read (fine_block, rerank): a config saved before the
# retirement carries them (to_dict() wrote every field); SuperlinearConfig.from_dict/replace drop
# them, which changes no remaining search.
RETIRED_FIELDS = ("fine_block", "rerank")
INSTEAD = "use the default, SuperlinearConfig() (search_key='blocksparse', docs/blocksparse.md)"


def retired(search_key: str) -> Optional[str]:
    """For a retired search key, the end of its one-line refusal ("was retired (why): use ...");
    None for any other value."""
    why = RETIRED.get(search_key) if isinstance(search_key, str) else None
    return None if why is None else f"was retired ({why}): {INSTEAD}"


def kind(search_key: str) -> SearchKind:
    """The entry of a search key; a ValueError naming the known keys otherwise (saying so for a
    retired key)."""
    try:
        return REGISTRY[search_key]
    except (KeyError, TypeError):
        gone = retired(search_key)
        if gone:
            raise ValueError(f"search_key={search_key!r} {gone}") from None
        raise ValueError(f"unknown search_key {search_key!r}: expected one of "
                         f"{tuple(REGISTRY)}") from None
