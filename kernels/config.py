"""`SuperlinearConfig`: every parameter of docs/spec.md, validated on construction.

Lives in the kernel layer because kernels and the reference take its fields as plain scalars;
`slcompile.SuperlinearConfig` re-exports it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from . import searches

COMBINE_MODES = ("union", "gated")
SEARCH_KEYS = searches.names()  # kernels/searches.py: what each search kind is and supports
# The default (SuperlinearConfig(), block_sparse()): docs/blocksparse.md with the geometry that did
# best in the 8K sweep (SmolLM2-135M). Stage 1 bounds groups of 8 key blocks (block_group):
# perplexity as without groups, stage 1 8x cheaper; 16 stage-2 rows (exact_rows): +1.0% against
# dense, 8 of 27 needles (dense 7) at 13.7% of keys; 12.5x SDPA at 128K on an H100. Rows spread
# over the block (spread_rows) gave +0.6% but 5 needles: off by default. benchmarks/RESULTS.md.
# Its window (256) and topk (24) are the search kind's defaults (kernels/searches.py): what window
# and topk mean depends on the kind (keys and key blocks for blocksparse; keys and spans for
# docs/spec.md's stripe searches), and a field left None takes its kind's default.
BLOCK_SPARSE = dict(search_key="blocksparse", window=searches.kind("blocksparse").window, sinks=4,
                    topk=searches.kind("blocksparse").topk, q_block=64, k_block=32, block_rows=8,
                    block_pool=8, exact_rows=16, block_group=8, spread_rows=False,
                    combine="union")


def _short_repr(value: Any, limit: int = 60) -> str:
    """repr() kept to one short line (an int of 5000 digits has no repr in Python 3.11)."""
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"SuperlinearConfig.{name}={_short_repr(value)} is invalid: expected {allowed}")


# The ops take these fields as the schema's `int`, a C++ int64: a larger Python int would pass
# here and fail inside the op call ("Expected a value of type 'int' ... found type 'int'").
INT64_MAX = 2**63 - 1


def _check_int(name: str, value: Any, lo: int, hi: int = INT64_MAX) -> None:
    expected = f"an int in [{lo}, {hi}]" + (" (the ops take int64)" if hi == INT64_MAX else "")
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, expected)
    if value < lo or value > hi:
        _fail(name, value, expected)


def _finite_number(value: Any) -> bool:
    """A real number (not a bool) that converts to a finite float (10**400 does not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _check_float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    if not _finite_number(value):
        _fail(name, value, f"a finite number in {'(' if lo_open else '['}{lo}, {hi}]")
    if value < lo or value > hi or (lo_open and value == lo):
        _fail(name, value, f"a number in {'(' if lo_open else '['}{lo}, {hi}]")


@dataclass(frozen=True)
class SuperlinearConfig:
    """Parameters of superlinear attention.

    The default (every field left out) is block-sparse superlinear attention
    (docs/blocksparse.md: 64-query x 32-key blocks, 4 sinks, a 256-key window, the 24 best key
    blocks per query block and kv head). ``search_key="anchor"`` (or "mean") selects
    docs/spec.md's stripe search, whose window and topk default to 64 and 3. window and topk left
    out (None) take the defaults of the search kind; ``replace`` keeps the fields that were
    given, so a changed search_key brings its own defaults.

    Args:
        window: local window W; keys [t-W+1, t] are always attended.
        sinks: keys [0, S) are always attended.
        topk: spans kept per query (1..8); with "blocksparse", key blocks kept per query block
            and kv head (1..256).
        search_power: p; the query at t scores about (t+1)^p stripes. (0, 1].
        span_power: r; spans reach about (t+1)^r. [0, 1].
        backward_factor: bf; span reach before its anchor, in units of (t+1)^r.
        forward_factor: ff; span reach after its anchor (never into the window).
        combine: "union" (one softmax over spans, window and sinks) or "gated" (per-span
            softmax, mixed by a softmax over the spans' search scores).
        search_key: "blocksparse" (the default unless steps >= 3), or a stripe search of
            docs/spec.md: "anchor" (the anchor's key) or "mean" (mean key over the anchor's
            span). "block" and "block_rerank" were retired (kernels/searches.py RETIRED): they
            are refused with a one-line error naming the default instead.
        dense_below: if the number of keys T <= dense_below, exact dense causal attention.
        scale: softmax scale; None means 1/sqrt(head_dim) (or the scale of the matched graph).
        q_block, k_block, block_rows, block_pool: search_key="blocksparse" only
            (docs/blocksparse.md): queries per query block (the granularity of choice), keys per
            key block, representative rows per query block, and the stage-1 pool (block_pool *
            topk candidates rescored exactly). Powers of two, q_block a multiple of k_block.
        exact_rows: search_key="blocksparse" only: representative rows of the exact rescoring
            (stage 2; 0: block_rows). All q_block rows rescore best (docs/blocksparse.md).
        block_group: search_key="blocksparse" only: key blocks per stage-1 group (a power of two,
            1..64; at most the largest power of two <= window/k_block + 1). Stage 1 bounds groups
            and keeps ceil(block_pool * topk / block_group) of them; stage 2 rescores their blocks.
            8 costs stage 1 an eighth of 1 and chose as well on SmolLM2 (docs/blocksparse.md).
        spread_rows: search_key="blocksparse" only: each stage's representative rows spread over
            the query block (q_block // rows apart, ending at its last row) instead of its last
            rows: better perplexity, fewer needles found on SmolLM2 (docs/blocksparse.md).
        steps: N, the number of search-and-attend steps (2..8). 2 is docs/spec.md's stripe search;
            N >= 3 is the hierarchical search of docs/nstep.md (cells of about t^(1/N) keys, a
            beam search over N-1 levels, O(L^(1+1/N)) per prefill). With N >= 3,
            search_power/span_power keep their defaults (the powers are 1/N) and search_key is
            "anchor" or "mean".
    """

    window: Optional[int] = None
    sinks: int = 4
    topk: Optional[int] = None
    search_power: float = 0.5
    span_power: float = 0.5
    backward_factor: float = 2.0
    forward_factor: float = 0.0
    combine: str = "union"
    search_key: Optional[str] = None
    dense_below: int = 12288
    scale: Optional[float] = None
    steps: int = 2
    q_block: int = 64
    k_block: int = 32
    block_rows: int = 8
    block_pool: int = 8
    exact_rows: int = 16
    block_group: int = 8
    spread_rows: bool = False

    def __post_init__(self) -> None:
        # the fields given (not None) at construction: replace() starts from these, so that a
        # change of search_key gives the new kind's defaults for window and topk
        object.__setattr__(self, "_given", tuple(
            f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None))
        if self.search_key is None:  # the default: block-sparse; the N-step search is a stripe one
            object.__setattr__(self, "search_key", "blocksparse" if self.steps == 2 else "anchor")
        if not isinstance(self.search_key, str) or self.search_key not in searches.REGISTRY:
            gone = searches.retired(self.search_key)
            if gone:
                raise ValueError(f"SuperlinearConfig.search_key={self.search_key!r} {gone}")
            _fail("search_key", self.search_key, f"one of {searches.names()}")
        kind = searches.kind(self.search_key)
        for name in ("window", "topk"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(kind, name))
        _check_int("window", self.window, 0)
        _check_int("sinks", self.sinks, 0)
        # blocksparse keeps topk key blocks; the span searches keep topk spans
        _check_int("topk", self.topk, 1, kind.topk_max)
        _check_float("search_power", self.search_power, 0.0, 1.0, lo_open=True)
        _check_float("span_power", self.span_power, 0.0, 1.0)
        _check_float("backward_factor", self.backward_factor, 0.0, 1e6)
        _check_float("forward_factor", self.forward_factor, 0.0, 1e6)
        if not isinstance(self.combine, str) or self.combine not in COMBINE_MODES:
            _fail("combine", self.combine, f"one of {COMBINE_MODES}")
        if kind.block_sparse and self.combine != "union":
            raise ValueError("SuperlinearConfig.combine='gated' is invalid with search_key="
                             "'blocksparse': block-sparse attention is one softmax over the "
                             "attended blocks (docs/blocksparse.md); use combine='union'")
        _check_int("dense_below", self.dense_below, 0)
        for name, lo, hi in (("q_block", 16, 1024), ("k_block", 16, 1024)):
            v = getattr(self, name)
            _check_int(name, v, lo, hi)
            if v & (v - 1):
                _fail(name, v, f"a power of two in [{lo}, {hi}]")
        if self.q_block % self.k_block:
            raise ValueError(f"SuperlinearConfig.q_block={self.q_block} is invalid: expected a "
                             f"multiple of k_block={self.k_block} (docs/blocksparse.md)")
        _check_int("block_rows", self.block_rows, 1, self.q_block)
        _check_int("block_pool", self.block_pool, 1, 64)
        _check_int("exact_rows", self.exact_rows, 0, self.q_block)
        _check_int("block_group", self.block_group, 1, 64)
        if self.block_group & (self.block_group - 1):
            _fail("block_group", self.block_group, "a power of two in [1, 64]")
        if not isinstance(self.spread_rows, bool):
            _fail("spread_rows", self.spread_rows, "True or False")
        if self.scale is not None:
            if not _finite_number(self.scale) or self.scale <= 0:
                _fail("scale", self.scale, "None or a finite number > 0")
        _check_int("steps", self.steps, 2, 8)
        if self.steps != 2:
            if not kind.nstep:
                _fail("search_key", self.search_key,
                      f"one of {searches.names(nstep=True)} with steps={self.steps} "
                      "(docs/nstep.md)")
            for name in ("search_power", "span_power"):
                if getattr(self, name) != 0.5:
                    raise ValueError(
                        f"SuperlinearConfig.{name}={getattr(self, name)!r} is invalid with "
                        f"steps={self.steps}: it sets the steps=2 stripe geometry; steps=N uses "
                        f"the power 1/N (docs/nstep.md), so leave {name} at its default 0.5")

    def is_given(self, name: str) -> bool:
        """Whether field ``name`` was given at construction (or kept by `replace`), rather than
        left to its default; a caller may fill in defaults of its own for the fields left out."""
        return name in self._given

    @property
    def kind(self) -> "searches.SearchKind":
        """The search kind's registry entry (kernels/searches.py)."""
        return searches.kind(self.search_key)

    @property
    def attention_span_power(self) -> float:
        """The span power span-attention runs with: span_power for steps=2, 1/steps otherwise."""
        return self.span_power if self.steps == 2 else 1.0 / self.steps

    def replace(self, **changes: Any) -> "SuperlinearConfig":
        """A copy with some fields changed (validated again). Fields of retired searches
        (kernels/searches.py RETIRED_FIELDS), which configs saved before their retirement carry,
        are dropped: no remaining search read them."""
        changes = {k: v for k, v in changes.items() if k not in searches.RETIRED_FIELDS}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown SuperlinearConfig field(s): {sorted(unknown)}; "
                             f"known: {[f.name for f in dataclasses.fields(self)]}")
        given = {name: getattr(self, name) for name in self._given}
        return type(self)(**{**given, **changes})

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SuperlinearConfig":
        d = dict(d or {})
        return cls().replace(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def for_pretrained(cls, **overrides: Any) -> "SuperlinearConfig":
        """Retired: this preset (search_key="block_rerank") ran slower than dense attention.
        Raises a ValueError naming the default, ``SuperlinearConfig()``, instead."""
        raise ValueError("SuperlinearConfig.for_pretrained() (search_key='block_rerank') "
                         + searches.retired("block_rerank"))

    @classmethod
    def block_sparse(cls, **overrides: Any) -> "SuperlinearConfig":
        """Block-granular search and block-sparse attention (docs/blocksparse.md): 64-query x
        32-key blocks, 4 sinks, a 256-key window and the 24 best key blocks per query block and kv
        head (8 representative rows, a pool of 8 x 24 rescored exactly): the default, spelled out
        (``SuperlinearConfig()`` equals it), every field given. Figures in benchmarks/RESULTS.md,
        first section; ``dense_below`` keeps its default, so short inputs stay exact."""
        return cls(**{**BLOCK_SPARSE, **overrides})

    @classmethod
    def exact(cls, **overrides: Any) -> "SuperlinearConfig":
        """A config under which superlinear attention equals dense causal attention for
        any length: the superlinear path is still taken (dense_below=0) but the window
        covers every key. Used to prove a rewrite's wiring."""
        return cls(**{"window": 2**62, "dense_below": 0, **overrides})
