"""Integer geometry of superlinear attention, shared by the reference and every kernel.

Two tables fix every rounding decision of docs/spec.md once, in float64, so that the reference and the
Triton kernels see exactly the same stripes and spans:

* ``stripe_deltas(n, p)``: delta_i = floor(i^(1/p)) - 1 for i = 1..n (stripe i's anchor sits at
  t - delta_i).
* ``span_extents(T, r, bf, ff)``: for every query position t < T, how far a span reaches before
  (ceil(bf*(t+1)^r)) and after (ceil(ff*(t+1)^r)) its anchor.

Both are built with device-side torch ops only (no host synchronisation), so they can be made
inside a CUDA graph capture. Integer-valued powers are snapped to the integer before floor/ceil so
that 1-ulp differences between pow implementations never change a table entry.

Below them, the bookkeeping every search implementation (reference, N-step, Triton prefill, decode
and N-step kernels) shares: when no query keeps a span, that case's output, and the argument checks;
and ``next_pow2``, the tile arithmetic of every kernel launch.
"""

from __future__ import annotations

import math

import torch


def _snap(x: torch.Tensor) -> torch.Tensor:
    r = torch.round(x)
    return torch.where((x - r).abs() <= 1e-9 * torch.clamp(r.abs(), min=1.0), r, x)


def num_stripes(T: int, p: float) -> int:
    """An upper bound on the number of stripes any query among T keys can use (delta_i <= T-1
    means i^(1/p) < T+1, so i < (T+1)^p). Entries past the true count are masked by delta <= t."""
    return max(1, int(math.floor((T + 1) ** p)) + 2)


def stripe_deltas(n: int, p: float, device=None) -> torch.Tensor:
    """int64 [n]: delta_i = floor(i^(1/p)) - 1 for i = 1..n; non-decreasing in i."""
    i = torch.arange(1, n + 1, device=device, dtype=torch.float64)
    return (torch.floor(_snap(i ** (1.0 / p))) - 1).to(torch.int64)


def span_extents(T: int, r: float, bf: float, ff: float, device=None):
    """int64 [T] back, fwd: back[t] = ceil(bf*(t+1)^r), fwd[t] = ceil(ff*(t+1)^r)."""
    x = _snap(torch.arange(1, T + 1, device=device, dtype=torch.float64) ** r)
    back = torch.ceil(_snap(bf * x)).to(torch.int64)
    fwd = torch.ceil(_snap(ff * x)).to(torch.int64)
    return back, fwd


def keeps_no_span(T: int, window: int, dense_below: int, Lq: int) -> bool:
    """docs/spec.md: no query keeps a span when T <= dense_below (dense attention), when the window
    covers all T keys, or when there is no query."""
    return T <= dense_below or window >= T or Lq == 0


def no_span_outputs(B: int, Hq: int, Lq: int, topk: int, device):
    """A search's output for queries that keep no span: anchors -1 (int32), scores -inf (float32)."""
    return (torch.full((B, Hq, Lq, topk), -1, dtype=torch.int32, device=device),
            torch.full((B, Hq, Lq, topk), float("-inf"), dtype=torch.float32, device=device))


def check_search_inputs(name: str, Hq: int, Hkv: int, topk: int, search_key: str, search_keys,
                        max_topk=None) -> None:
    """The argument checks every search implementation makes (ValueError naming ``name``)."""
    if search_key not in search_keys:
        allowed = " or ".join(repr(x) for x in search_keys)
        raise ValueError(f"{name}: search_key={search_key!r} is not {allowed}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{name}: query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    if max_topk is not None and not 1 <= topk <= max_topk:
        raise ValueError(f"{name}: topk={topk} must be in [1, {max_topk}]")


def next_pow2(x: int) -> int:
    """The smallest power of two >= x (1 for x <= 1). Plain Python: triton's
    ``next_power_of_2`` is a ``constexpr_function`` in triton 3.9, about 6 us a call on the host,
    which a decoded token's launches would pay many times."""
    return 1 << max(0, (int(x) - 1).bit_length())
