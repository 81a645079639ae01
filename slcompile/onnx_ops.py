"""ONNX translations of ``superlinear::span_search`` and ``superlinear::span_attention`` (the
stripe searches of docs/spec.md) and ``superlinear::block_sparse_attention`` (the default,
docs/blocksparse.md; see its function).

All are written with standard ONNX operators only (opset 18: Range, TopK, Gather,
GatherElements, MatMul, CumSum, Where, ...), so any ONNX runtime, TensorRT's ONNX parser included,
runs an exported model with no plugin. They are traced by ``torch.onnx.export(dynamo=True)``
through its ``custom_translation_table`` (see ``slcompile.export``).

Every shape is read from the tensors at run time (``Shape``), so the sequence axis stays dynamic;
the config fields arrive as Python scalars and become attributes/constants.

The semantics are docs/spec.md's, following ``kernels/reference.py`` decision for decision:

* stripe offsets delta_i = floor(i^(1/p)) - 1 (an exact integer power when 1/p is an integer, e.g.
  i*i - 1 for p = 1/2; otherwise float64 ``Pow`` with the same snapping to integers as
  ``kernels/geometry.py``); span reach ceil(bf*(t+1)^r), ceil(ff*(t+1)^r) in float64 with the same
  snapping (``Sqrt`` for r = 1/2);
* top-k by ``TopK`` over stripes ordered nearest anchor first: ONNX breaks ties by the lower index,
  i.e. the nearer anchor, as the reference does;
* span-attention gathers, per query, the key positions of its sinks, its window and its kept spans
  (``budget = S + W + topk * maxspan`` with ``maxspan = back(T-1) + fwd(T-1) + 1``), masks what the
  spec excludes (beyond the query, key padding, below the sinks, empty slots, and in union mode
  positions already in an earlier kept span), and merges exact softmax partials;
* ``T <= dense_below``: the effective window becomes T, which makes both steps compute exact dense
  causal attention (no stripe lies beyond the window, the window covers every key); this is
  docs/spec.md's exactness property, selected at run time without an ``If`` node.

Cost: O(Lq * budget * D) per head, i.e. O(L^1.5) for a prefill at the default powers (the gathered
K/V rows are materialised per query).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
from onnxscript import opset18 as op

from slcompile.kernels import searches

ONNX_OPSET = 18

_F32 = onnx.TensorProto.FLOAT
_F64 = onnx.TensorProto.DOUBLE
_I64 = onnx.TensorProto.INT64
_I32 = onnx.TensorProto.INT32
_BOOL = onnx.TensorProto.BOOL


class OnnxTranslationError(ValueError):
    """A superlinear op carries a setting that has no ONNX translation."""


# --------------------------------------------------------------------------------------------
# small helpers (all produce ONNX nodes through the active onnxscript tracer)
# --------------------------------------------------------------------------------------------

def _i64(v):
    """int64 constant: scalar for an int, 1-D for a list."""
    arr = np.array(v, dtype=np.int64)
    return op.Constant(value=onnx.numpy_helper.from_array(arr))


def _f32(v):
    return op.Constant(value=onnx.numpy_helper.from_array(np.array(v, dtype=np.float32)))


def _f64(v):
    return op.Constant(value=onnx.numpy_helper.from_array(np.array(v, dtype=np.float64)))


def _dim(x, i):
    """Dimension i of x as an int64 scalar."""
    return op.Squeeze(op.Shape(x, start=i, end=i + 1 if i != -1 else None), _i64([0]))


def _unsq(x, *axes):
    return op.Unsqueeze(x, _i64(list(axes)))


def _snap(x):
    """kernels/geometry.py's _snap: values within 1e-9 (relative) of an integer become it."""
    r = op.Round(x)
    tol = op.Mul(_f64(1e-9), op.Max(op.Abs(r), _f64(1.0)))
    return op.Where(op.LessOrEqual(op.Abs(op.Sub(x, r)), tol), r, x)


def _int_exponent(e: float) -> Optional[int]:
    m = round(e)
    return int(m) if abs(e - m) <= 1e-12 and 1 <= m <= 8 else None


def _deltas(i, p: float):
    """int64 stripe numbers i (>= 1) -> delta_i = floor(i^(1/p)) - 1 (kernels/geometry.py)."""
    m = _int_exponent(1.0 / p)
    if m is not None:  # exact integer power (p = 1/2: i*i)
        y = i
        for _ in range(m - 1):
            y = op.Mul(y, i)
        return op.Sub(y, _i64(1))
    x = _snap(op.Pow(op.Cast(i, to=_F64), _f64(1.0 / p)))
    return op.Sub(op.Cast(op.Floor(x), to=_I64), _i64(1))


def _power_of_count(t1, r: float):
    """snap((t+1)^r) in float64 for int64 t1 = t+1."""
    x = op.Cast(t1, to=_F64)
    if r == 0.0:
        return op.Add(op.Mul(x, _f64(0.0)), _f64(1.0))
    if r == 0.5:
        return _snap(op.Sqrt(x))
    if r == 1.0:
        return x
    return _snap(op.Pow(x, _f64(r)))


def _ceil_sqrt(x):
    """Exact ceil(sqrt(x)) for int64 x >= 0: a float estimate, then integer fix-ups (exact even
    where a runtime computes the estimate in float32, as TensorRT does with float64)."""
    s = op.Cast(op.Ceil(op.Sqrt(op.Cast(x, to=_F64))), to=_I64)
    s = op.Where(op.GreaterOrEqual(op.Mul(op.Sub(s, _i64(1)), op.Sub(s, _i64(1))), x), op.Sub(s, _i64(1)), s)
    s = op.Where(op.Less(op.Mul(s, s), x), op.Add(s, _i64(1)), s)
    return op.Max(s, _i64(0))


def _extent(t1, r: float, factor: float):
    """int64 ceil(snap(factor * snap((t+1)^r))) for int64 t1 = t+1 (kernels/geometry.span_extents).
    For r = 1/2 and an integer factor^2 (the default bf = 2: 4), the exact integer form
    ceil(sqrt(factor^2 * (t+1)))."""
    if r == 0.5:
        K = factor * factor
        if abs(K - round(K)) <= 1e-12 * max(1.0, K) and K < 2**20:
            return _ceil_sqrt(op.Mul(t1, _i64(int(round(K)))))
    x = _power_of_count(t1, r)
    return op.Cast(op.Ceil(_snap(op.Mul(_f64(factor), x))), to=_I64)


def _window(T, window: int, dense_below: int):
    """Effective window: min(window, T), or T when T <= dense_below (exact dense attention)."""
    w = op.Min(_i64(min(window, 2**62)), T)
    if dense_below > 0:
        w = op.Where(op.LessOrEqual(T, _i64(dense_below)), T, w)
    return w


def _positions(query_positions, Lq, T):
    """int64 [Bp, Lq] absolute query positions (Bp = 1 when bottom-right aligned)."""
    if query_positions is None:
        return _unsq(op.Range(op.Sub(T, Lq), T, _i64(1)), 0)
    return op.Cast(query_positions, to=_I64)


def _present(key_padding_mask, B, T):
    """(row offsets b*T [B], flattened int32 mask [B*T]) for _present_at, or None."""
    if key_padding_mask is None:
        return None
    flat = op.Reshape(op.Cast(key_padding_mask, to=_I32), _i64([-1]))
    boff = op.Mul(op.Range(_i64(0), B, _i64(1)), T)
    return boff, flat


def _present_at(kpm_info, pos, rank: int):
    """Gather presence at int64 positions pos (rank `rank`, axis 0 = batch, broadcastable)."""
    boff, flat = kpm_info
    b = op.Reshape(boff, op.Concat(_i64([-1]), _i64([1] * (rank - 1)), axis=0))
    idx = op.Add(b, pos)
    return op.Cast(op.Gather(flat, idx, axis=0), to=_BOOL)


def _clamp(x, lo, hi):
    return op.Min(op.Max(x, lo), hi)


# --------------------------------------------------------------------------------------------
# span_search
# --------------------------------------------------------------------------------------------

def span_search(search_query, key, key_padding_mask=None, query_positions=None, window=64, topk=3,
                search_power=0.5, span_power=0.5, backward_factor=2.0, forward_factor=0.0,
                search_key="anchor", dense_below=0):
    """Step 1 of docs/spec.md in ONNX: anchors int32 [B, Hq, Lq, topk], scores float32."""
    stripes = searches.names(family="stripe", onnx=True)
    if search_key not in stripes:
        raise OnnxTranslationError(
            f"span_search with search_key={search_key!r} has no ONNX translation (supported: "
            f"{', '.join(map(repr, stripes))}); convert the model with one of them to export it")
    qs = op.Cast(search_query, to=_F32)
    B, Hq, Lq, D = (_dim(search_query, i) for i in range(4))
    Hkv, T = _dim(key, 1), _dim(key, 2)
    g = op.Div(Hq, Hkv)
    W = _window(T, window, dense_below)
    pos = _positions(query_positions, Lq, T)  # [Bp, Lq]
    # stripes: n = max(floor((T+1)^p) + 2, topk), an upper bound; extra stripes are invalid
    n = op.Add(op.Cast(op.Floor(op.Pow(op.Cast(op.Add(T, _i64(1)), to=_F64), _f64(search_power))),
                       to=_I64), _i64(2))
    n = op.Max(n, _i64(topk))
    deltas = _deltas(op.Range(_i64(1), op.Add(n, _i64(1)), _i64(1)), search_power)  # [n]
    t3 = _unsq(pos, 2)  # [Bp, Lq, 1]
    a = op.Sub(t3, deltas)  # [Bp, Lq, n]
    valid = op.And(op.GreaterOrEqual(deltas, W), op.GreaterOrEqual(a, _i64(0)))
    a_c = op.Max(a, _i64(0))
    kpm = _present(key_padding_mask, B, T)
    if kpm is not None:
        valid = op.And(valid, _present_at(kpm, a_c, 3))  # -> [B, Lq, n]
    # rows of key: flat index ((b*Hkv + h)*T + a) into key [B*Hkv*T, D]
    bh = op.Reshape(op.Range(_i64(0), op.Mul(B, Hkv), _i64(1)),
                    op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _i64([1, 1]), axis=0))  # [B, Hkv, 1, 1]
    a4 = _unsq(a_c, 1)  # [Bp, 1, Lq, n]
    if searches.kind(search_key).stripe_key == "anchor":
        kflat = op.Reshape(op.Cast(key, to=_F32), op.Concat(_i64([-1]), _unsq(D, 0), axis=0))
        kg = op.Gather(kflat, op.Add(op.Mul(bh, T), a4), axis=0)  # [B, Hkv, Lq, n, D]
    else:  # "mean": mean key over the anchor's span, float64 prefix sums (reference)
        t1 = op.Add(pos, _i64(1))
        back = _unsq(_extent(t1, span_power, backward_factor), 2)  # [Bp, Lq, 1]
        fwd = _unsq(_extent(t1, span_power, forward_factor), 2)
        lo = op.Max(op.Sub(a_c, back), _i64(0))
        hi = op.Max(op.Min(op.Add(a_c, fwd), op.Sub(t3, W)), _i64(0))
        kf = op.Cast(key, to=_F64)
        ones = op.Expand(_f64([1.0]), op.Concat(_unsq(B, 0), _unsq(T, 0), axis=0))
        if key_padding_mask is not None:
            mk = op.Cast(key_padding_mask, to=_F64)
            kf = op.Mul(kf, _unsq(_unsq(mk, 1), 3))
            ones = mk
        zrow = op.Expand(_f64([0.0]), op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _i64([1]), _unsq(D, 0), axis=0))
        prefix = op.Concat(zrow, op.CumSum(kf, _i64(2)), axis=2)  # [B, Hkv, T+1, D]
        pflat = op.Reshape(prefix, op.Concat(_i64([-1]), _unsq(D, 0), axis=0))
        T1 = op.Add(T, _i64(1))
        base = op.Mul(bh, T1)
        tot = op.Sub(op.Gather(pflat, op.Add(base, op.Add(_unsq(hi, 1), _i64(1))), axis=0),
                     op.Gather(pflat, op.Add(base, _unsq(lo, 1)), axis=0))  # [B, Hkv, Lq, n, D]
        cnt = op.Concat(op.Expand(_f64([0.0]), op.Concat(_unsq(B, 0), _i64([1]), axis=0)),
                        op.CumSum(ones, _i64(1)), axis=1)  # [B, T+1]
        cflat = op.Reshape(cnt, _i64([-1]))
        boff = op.Reshape(op.Mul(op.Range(_i64(0), B, _i64(1)), T1), _i64([-1, 1, 1]))
        c_ = op.Sub(op.Gather(cflat, op.Add(boff, op.Add(hi, _i64(1))), axis=0),
                    op.Gather(cflat, op.Add(boff, lo), axis=0))  # [B, Lq, n]
        c_ = op.Max(c_, _f64(1.0))
        kg = op.Cast(op.Div(tot, _unsq(_unsq(c_, 1), 4)), to=_F32)
    # scores: q [B, Hkv, g, Lq, D] -> [B, Hkv, Lq, g, D] @ kg^T [B, Hkv, Lq, D, n]
    q5 = op.Reshape(qs, op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(g, 0), _unsq(Lq, 0), _unsq(D, 0), axis=0))
    q5 = op.Transpose(q5, perm=[0, 1, 3, 2, 4])
    sc = op.MatMul(q5, op.Transpose(kg, perm=[0, 1, 2, 4, 3]))  # [B, Hkv, Lq, g, n]
    sc = op.Transpose(sc, perm=[0, 1, 3, 2, 4])
    sc = op.Reshape(sc, op.Concat(_unsq(B, 0), _unsq(Hq, 0), _unsq(Lq, 0), _unsq(n, 0), axis=0))
    ninf = _f32(float("-inf"))
    sc = op.Where(_unsq(valid, 1), sc, ninf)
    # TopK: ties go to the lower index = the nearer anchor (stripes are ordered nearest first)
    top_s, top_i = op.TopK(sc, _i64([topk]), axis=-1, largest=1, sorted=1)
    a_full = op.Expand(a4, op.Shape(sc))  # [B, Hq, Lq, n]
    top_a = op.GatherElements(a_full, top_i, axis=-1)
    empty = op.Equal(top_s, ninf)
    anchors = op.Cast(op.Where(empty, _i64(-1), top_a), to=_I32)
    return anchors, top_s


# --------------------------------------------------------------------------------------------
# span_attention
# --------------------------------------------------------------------------------------------

def _partial(logits, valid, vals):
    """Softmax partial over the last axis: m (max, -inf if none), l (sum of exp), o (unnormalised
    output). logits/valid [..., n]; vals [..., n, Dv]."""
    ninf = _f32(float("-inf"))
    lm = op.Where(valid, logits, ninf)
    m = op.ReduceMax(lm, _i64([-1]), keepdims=0)
    m_safe = op.Where(op.IsInf(m), _f32(0.0), m)
    e = op.Exp(op.Sub(lm, _unsq(m_safe, -1)))
    l_ = op.ReduceSum(e, _i64([-1]), keepdims=0)
    o = op.Squeeze(op.MatMul(_unsq(e, -2), vals), _i64([-2]))
    return m, l_, o


def _merge(parts):
    """Exact merge of softmax partials over disjoint key sets; zeros where nothing is valid."""
    m = parts[0][0]
    for pm, _, _ in parts[1:]:
        m = op.Max(m, pm)
    m_safe = op.Where(op.IsInf(m), _f32(0.0), m)
    l_tot, o_tot = None, None
    for pm, pl, po in parts:
        w = op.Exp(op.Sub(pm, m_safe))
        lt, ot = op.Mul(pl, w), op.Mul(po, _unsq(w, -1))
        l_tot = lt if l_tot is None else op.Add(l_tot, lt)
        o_tot = ot if o_tot is None else op.Add(o_tot, ot)
    den = op.Where(op.Greater(l_tot, _f32(0.0)), l_tot, _f32(1.0))
    return op.Div(o_tot, _unsq(den, -1))


def span_attention(query, key, value, anchors, scores, key_padding_mask=None, query_positions=None,
                   window=64, sinks=4, span_power=0.5, backward_factor=2.0, forward_factor=0.0,
                   combine="union", scale=1.0, dense_below=0):
    """Step 2 of docs/spec.md in ONNX: [B, Hq, Lq, Dv] in query's dtype."""
    if combine not in ("union", "gated"):
        raise OnnxTranslationError(f"span_attention with combine={combine!r} has no ONNX translation")
    q = op.Cast(query, to=_F32)
    B, Hq, Lq, D = (_dim(query, i) for i in range(4))
    Hkv, T, Dv = _dim(key, 1), _dim(key, 2), _dim(value, 3)
    g = op.Div(Hq, Hkv)
    kk = _dim(anchors, 3)
    W = _window(T, window, dense_below)
    S = op.Min(_i64(sinks), T)
    pos = _positions(query_positions, Lq, T)  # [Bp, Lq]
    t = _unsq(pos, 1, 3)  # [Bp, 1, Lq, 1]
    kpm = _present(key_padding_mask, B, T)
    zero = _i64(0)
    Tm1 = op.Sub(T, _i64(1))

    # --- base segment: sinks [0, min(S, t+1)) and window [max(S, t-W+1), t] ----------------------
    base_idx, base_ok = [], []
    if sinks > 0:
        j = _unsq(op.Range(zero, S, _i64(1)), 0, 1, 2)  # [1, 1, 1, S]
        base_idx.append(op.Add(op.Mul(t, zero), j))  # [Bp, 1, Lq, S]
        base_ok.append(op.LessOrEqual(j, t))
    if window > 0:
        w = _unsq(op.Range(zero, W, _i64(1)), 0, 1, 2)
        p = op.Add(op.Sub(op.Add(t, _i64(1)), W), w)  # t - W + 1 + w
        base_idx.append(p)
        base_ok.append(op.GreaterOrEqual(p, S))
    if not base_idx:  # no sinks, no window: one always-invalid column
        base_idx.append(op.Mul(t, zero))
        base_ok.append(op.Less(t, zero))
    bidx = op.Concat(*base_idx, axis=-1) if len(base_idx) > 1 else base_idx[0]
    bok = op.Concat(*base_ok, axis=-1) if len(base_ok) > 1 else base_ok[0]
    bidx = _clamp(bidx, zero, Tm1)  # [Bp, 1, Lq, nb]

    # --- spans: [max(S, a - back[t]), min(a + fwd[t], t - W)] ---------------------------------
    t1 = op.Add(pos, _i64(1))
    back = _unsq(_extent(t1, span_power, backward_factor), 1, 3)  # [Bp, 1, Lq, 1]
    fwd = _unsq(_extent(t1, span_power, forward_factor), 1, 3)
    Tv = _unsq(T, 0)
    maxspan = op.Add(op.Add(_extent(Tv, span_power, backward_factor),
                            _extent(Tv, span_power, forward_factor)), _i64(1))  # [1]
    maxspan = op.Where(op.GreaterOrEqual(W, T), _i64([1]), maxspan)  # no span reaches past a full window
    a = op.Cast(anchors, to=_I64)  # [B, Hq, Lq, kk]
    aval = op.GreaterOrEqual(a, zero)
    a_c = op.Max(a, zero)
    lo = op.Max(op.Sub(a_c, back), S)
    hi = op.Min(op.Add(a_c, fwd), op.Sub(t, W))
    hi = op.Where(aval, hi, op.Sub(lo, _i64(1)))  # empty slot: empty span
    u = op.Range(zero, op.Squeeze(maxspan, _i64([0])), _i64(1))  # [M]
    sidx = op.Add(_unsq(lo, -1), u)  # [B, Hq, Lq, kk, M]
    sok = op.LessOrEqual(sidx, _unsq(hi, -1))
    if combine == "union":  # drop positions inside an earlier kept span (a position counts once)
        r = op.Range(zero, kk, _i64(1))
        earlier = op.Less(_unsq(r, 0), _unsq(r, 1))  # [kk(j), kk(jj)]: jj < j
        lo_e, hi_e = _unsq(lo, 3, 4), _unsq(hi, 3, 4)  # [B, Hq, Lq, 1, 1, kk]
        s6 = _unsq(sidx, -1)  # [B, Hq, Lq, kk, M, 1]
        inside = op.And(op.GreaterOrEqual(s6, lo_e), op.LessOrEqual(s6, hi_e))
        inside = op.And(inside, _unsq(earlier, 1))  # earlier [kk, 1, kk]
        dup = op.Cast(op.ReduceMax(op.Cast(inside, to=_I32), _i64([-1]), keepdims=0), to=_BOOL)
        sok = op.And(sok, op.Not(dup))
    sidx = _clamp(sidx, zero, Tm1)

    # --- gather K/V rows for every (query, position) -----------------------------------------------
    hq = op.Range(zero, Hq, _i64(1))
    bh = op.Add(_unsq(op.Mul(op.Range(zero, B, _i64(1)), Hkv), 1), _unsq(op.Div(hq, g), 0))  # [B, Hq]
    base_row = op.Mul(_unsq(bh, 2, 3), T)  # [B, Hq, 1, 1]
    sflat = op.Reshape(sidx, op.Concat(_unsq(B, 0), _unsq(Hq, 0), _unsq(Lq, 0), _i64([-1]), axis=0))
    nb = _dim(bidx, 3)
    allidx = op.Concat(op.Expand(bidx, op.Concat(_unsq(B, 0), _unsq(Hq, 0), _unsq(Lq, 0), _unsq(nb, 0), axis=0)),
                       sflat, axis=-1)  # [B, Hq, Lq, nb + kk*M]
    rows = op.Add(base_row, allidx)
    kflat = op.Reshape(op.Cast(key, to=_F32), op.Concat(_i64([-1]), _unsq(D, 0), axis=0))
    vflat = op.Reshape(op.Cast(value, to=_F32), op.Concat(_i64([-1]), _unsq(Dv, 0), axis=0))
    kg = op.Gather(kflat, rows, axis=0)  # [B, Hq, Lq, n, D]
    vg = op.Gather(vflat, rows, axis=0)  # [B, Hq, Lq, n, Dv]
    logits = op.Squeeze(op.MatMul(_unsq(q, 3), op.Transpose(kg, perm=[0, 1, 2, 4, 3])), _i64([3]))
    logits = op.Mul(logits, _f32(float(scale)))  # [B, Hq, Lq, n]

    nb1 = _unsq(nb, 0)
    big = _i64([2**62])
    lb = op.Slice(logits, _i64([0]), nb1, _i64([-1]))
    vb = op.Slice(vg, _i64([0]), nb1, _i64([3]))
    span_shape = op.Concat(_unsq(B, 0), _unsq(Hq, 0), _unsq(Lq, 0), _unsq(kk, 0), maxspan, axis=0)
    ls = op.Reshape(op.Slice(logits, nb1, big, _i64([-1])), span_shape)  # [B, Hq, Lq, kk, M]
    vs = op.Reshape(op.Slice(vg, nb1, big, _i64([3])),
                    op.Concat(span_shape, _unsq(Dv, 0), axis=0))  # [B, Hq, Lq, kk, M, Dv]
    if kpm is not None:
        bok = op.And(bok, _present_at(kpm, bidx, 4))
        sok = op.And(sok, _present_at(kpm, sidx, 5))
    bok = op.Expand(bok, op.Shape(lb))
    base_part = _partial(lb, bok, vb)  # [B, Hq, Lq], [B, Hq, Lq], [B, Hq, Lq, Dv]
    sm, sl, so = _partial(ls, sok, vs)  # [B, Hq, Lq, kk], ..., [B, Hq, Lq, kk, Dv]

    if combine == "union":
        # the kk span partials merged first (max over kk), then with the base part
        ms = op.ReduceMax(sm, _i64([-1]), keepdims=0)
        ms_safe = op.Where(op.IsInf(ms), _f32(0.0), ms)
        w = op.Exp(op.Sub(sm, _unsq(ms_safe, -1)))
        span_part = (ms, op.ReduceSum(op.Mul(sl, w), _i64([-1]), keepdims=0),
                     op.ReduceSum(op.Mul(so, _unsq(w, -1)), _i64([-2]), keepdims=0))
        out = _merge([base_part, span_part])
    else:
        bm, bl, bo = base_part
        oj = _merge([(_unsq(bm, -1), _unsq(bl, -1), _unsq(bo, -2)), (sm, sl, so)])  # [B, Hq, Lq, kk, Dv]
        sc = op.Where(aval, op.Cast(scores, to=_F32), _f32(float("-inf")))
        gm = op.ReduceMax(sc, _i64([-1]), keepdims=1)
        gm = op.Where(op.IsInf(gm), _f32(0.0), gm)
        ge = op.Exp(op.Sub(sc, gm))
        gs = op.ReduceSum(ge, _i64([-1]), keepdims=1)
        gate = op.Div(ge, op.Where(op.Greater(gs, _f32(0.0)), gs, _f32(1.0)))
        mixed = op.ReduceSum(op.Mul(oj, _unsq(gate, -1)), _i64([-2]), keepdims=0)
        anyv = op.Cast(op.ReduceMax(op.Cast(aval, to=_I32), _i64([-1]), keepdims=1), to=_BOOL)
        out = op.Where(anyv, mixed, _merge([base_part]))
    return op.CastLike(out, query)


# --------------------------------------------------------------------------------------------
# block_sparse_attention (docs/blocksparse.md, the default)
# --------------------------------------------------------------------------------------------

def _reversed_last(x):
    """x reversed along its last axis."""
    return op.Slice(x, _i64([-1]), _i64([-(2**62)]), _i64([-1]), _i64([-1]))


def _rep_rows(qb, front, Lq, nQ, rows: int, QB: int, Hkv, G, D, spread: bool):
    """The representative rows of every query block (`blocksparse.representatives`): qb
    [B, Hq, nQ, QB, D] -> [B, Hkv, nQ, G*rows, D] (head-major within the group)."""
    n = op.Range(_i64(0), nQ, _i64(1))
    last = op.Min(op.Sub(op.Sub(op.Add(front, Lq), _i64(1)), op.Mul(n, _i64(QB))), _i64(QB - 1))
    first = op.Max(op.Sub(front, op.Mul(n, _i64(QB))), _i64(0))
    step = QB // rows if spread else 1
    r = _i64([i * step for i in range(rows)])
    ri = op.Sub(_unsq(last, 1), _unsq(r, 0))  # [nQ, rows]
    ri = op.Where(op.GreaterOrEqual(ri, _unsq(first, 1)), ri, _unsq(last, 1))
    B, Hq = _dim(qb, 0), _dim(qb, 1)
    idx = op.Expand(_unsq(ri, 0, 1, 4), op.Concat(_unsq(B, 0), _unsq(Hq, 0), _unsq(nQ, 0),
                                                   _i64([rows]), _unsq(D, 0), axis=0))
    rep = op.GatherElements(qb, idx, axis=3)  # [B, Hq, nQ, rows, D]
    rep = op.Reshape(rep, op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(G, 0), _unsq(nQ, 0),
                                    _i64([rows]), _unsq(D, 0), axis=0))
    rep = op.Transpose(rep, perm=[0, 1, 3, 2, 4, 5])  # [B, Hkv, nQ, G, rows, D]
    return op.Reshape(rep, op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(nQ, 0), _i64([-1]),
                                     _unsq(D, 0), axis=0))


def block_sparse_attention(query, key, value, key_padding_mask=None, query_positions=None,
                           window=256, sinks=4, topk=24, scale=1.0, dense_below=0, q_block=64,
                           k_block=32, block_rows=8, block_pool=8, block_summary=None,
                           exact_rows=0, block_group=1, spread_rows=False):
    """docs/blocksparse.md in ONNX, following `kernels/blocksparse.py` decision for decision:
    [B, Hq, Lq, Dv] in query's dtype. T <= dense_below widens the window to every key (exact
    dense attention, as the op computes it), selected at run time without an ``If`` node. Cost:
    stage 1 (L/QB)(L/(KB F)) bounds, the rest linear in L."""
    from slcompile.kernels.blocksparse import stage1_group

    if key_padding_mask is not None:
        raise OnnxTranslationError(
            "block_sparse_attention with a key-padding mask has no ONNX translation: export the "
            "model without a padding mask (one sequence per row, unpadded)")
    if block_summary is not None:
        raise OnnxTranslationError("block_sparse_attention with kept block summaries (decoding) "
                                   "has no ONNX translation")
    QB, KB = int(q_block), int(k_block)
    F = stage1_group(int(window), KB, int(block_group))
    R, R2 = int(block_rows), int(exact_rows) or int(block_rows)
    per_q = QB // KB
    MG = -(-int(block_pool) * int(topk) // F)  # groups stage 1 keeps
    zero, one = _i64(0), _i64(1)
    ninf = _f32(float("-inf"))
    q = op.Cast(query, to=_F32)
    kf = op.Cast(key, to=_F32)
    vf = op.Cast(value, to=_F32)
    B, Hq, Lq, D = (_dim(query, i) for i in range(4))
    Hkv, T, Dv = _dim(key, 1), _dim(key, 2), _dim(value, 3)
    G = op.Div(Hq, Hkv)
    if query_positions is None:
        p0 = op.Sub(T, Lq)
    else:  # the op requires p0..p0+Lq-1, the same for every row
        p0 = op.Squeeze(op.Slice(op.Reshape(op.Cast(query_positions, to=_I64), _i64([-1])),
                                 _i64([0]), _i64([1])), _i64([0]))
    W = _window(T, window, dense_below)  # T when T <= dense_below: the window is the whole past
    nK = op.Div(op.Add(T, _i64(KB - 1)), _i64(KB))
    sb = op.Min(_i64(-(-int(sinks) // KB)), nK)
    wb = op.Div(op.Add(op.Min(W, T), _i64(KB - 1)), _i64(KB))
    j0 = op.Div(p0, _i64(QB))
    front = op.Sub(p0, op.Mul(j0, _i64(QB)))
    nQ = op.Div(op.Add(op.Add(front, Lq), _i64(QB - 1)), _i64(QB))
    tail = op.Sub(op.Sub(op.Mul(nQ, _i64(QB)), front), Lq)
    pads = op.Concat(_i64([0, 0]), _unsq(front, 0), _i64([0, 0, 0]), _unsq(tail, 0), _i64([0]),
                     axis=0)
    qb = op.Reshape(op.Pad(q, pads), op.Concat(_unsq(B, 0), _unsq(Hq, 0), _unsq(nQ, 0),
                                               _i64([QB]), _unsq(D, 0), axis=0))
    n = op.Range(zero, nQ, one)
    before = op.Mul(op.Add(j0, n), _i64(per_q))  # key blocks wholly before each query block
    lim = op.Sub(before, wb)  # candidates: sb <= i < lim

    # --- stage 1: bounds of groups of F key blocks ----------------------------------------------
    gspan = F * KB
    nG = op.Div(op.Add(T, _i64(gspan - 1)), _i64(gspan))
    gpad = op.Concat(_i64([0, 0, 0, 0, 0, 0]), _unsq(op.Sub(op.Mul(nG, _i64(gspan)), T), 0),
                     _i64([0]), axis=0)
    gshape = op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(nG, 0), _i64([gspan]), _unsq(D, 0),
                       axis=0)
    kmax = op.ReduceMax(op.Reshape(op.Pad(kf, gpad, ninf), gshape), _i64([3]), keepdims=0)
    kmin = op.ReduceMin(op.Reshape(op.Pad(kf, gpad, _f32(float("inf"))), gshape), _i64([3]),
                        keepdims=0)
    kk = op.Concat(kmax, kmin, axis=-1)  # [B, Hkv, nG, 2D]
    spread = bool(spread_rows)
    rep = _rep_rows(qb, front, Lq, nQ, R, QB, Hkv, G, D, spread)  # [B, Hkv, nQ, G*R, D]
    qq = op.Concat(op.Relu(rep), op.Min(rep, _f32(0.0)), axis=-1)
    bound = op.ReduceMax(op.MatMul(qq, _unsq(op.Transpose(kk, perm=[0, 1, 3, 2]), 2)), _i64([3]),
                         keepdims=0)  # [B, Hkv, nQ, nG]
    g = op.Range(zero, nG, one)
    gcand = op.And(op.GreaterOrEqual(op.Add(op.Mul(g, _i64(F)), _i64(F - 1)), sb),
                   op.Less(_unsq(op.Mul(g, _i64(F)), 0), _unsq(lim, 1)))  # [nQ, nG]
    bound = op.Where(gcand, bound, ninf)
    # ties go to the later group: TopK prefers the lower index, so rank the groups reversed
    kg = op.Min(_i64([MG]), _unsq(nG, 0))
    gs, gi = op.TopK(_reversed_last(bound), kg, axis=-1, largest=1, sorted=1)
    grp = op.Sub(op.Sub(nG, one), gi)  # [B, Hkv, nQ, MGe]
    gok = op.Not(op.Equal(gs, ninf))

    # --- stage 2: exact largest logit of the candidate blocks of the kept groups ----------------
    blk = op.Add(_unsq(op.Mul(grp, _i64(F)), -1), _i64(list(range(F))))  # [B, Hkv, nQ, MGe, F]
    live = op.And(_unsq(gok, -1), op.And(op.GreaterOrEqual(blk, sb),
                                         op.Less(blk, _unsq(lim, 1, 2))))
    live = op.And(live, op.Less(blk, nK))
    mshape = op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(nQ, 0), _i64([-1]), axis=0)
    blk = op.Reshape(op.Where(live, blk, _i64(-1)), mshape)  # [B, Hkv, nQ, M]
    M = _dim(blk, 3)
    # candidates ordered by block, latest first: TopK's lower-index preference then keeps ties
    # for the later block, as the contract says
    blk, _ = op.TopK(blk, _unsq(M, 0), axis=-1, largest=1, sorted=1)
    live = op.GreaterOrEqual(blk, zero)
    kpad = op.Concat(_i64([0, 0, 0, 0, 0, 0]), _unsq(op.Sub(op.Mul(nK, _i64(KB)), T), 0),
                     _i64([0]), axis=0)
    kblocks = op.Reshape(op.Pad(kf, kpad), op.Concat(_i64([-1, KB]), _unsq(D, 0), axis=0))
    bh = op.Reshape(op.Range(zero, op.Mul(B, Hkv), one),
                    op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _i64([1, 1]), axis=0))  # [B, Hkv, 1, 1]
    gk = op.Gather(kblocks, op.Add(op.Mul(bh, nK), op.Max(blk, zero)), axis=0)
    gk = op.Reshape(gk, op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(nQ, 0), _i64([-1]),
                                  _unsq(D, 0), axis=0))  # [B, Hkv, nQ, M*KB, D]
    rep2 = rep if R2 == R else _rep_rows(qb, front, Lq, nQ, R2, QB, Hkv, G, D, spread)
    lg = op.ReduceMax(op.MatMul(rep2, op.Transpose(gk, perm=[0, 1, 2, 4, 3])), _i64([3]),
                      keepdims=0)  # [B, Hkv, nQ, M*KB]
    kpos = op.Add(_unsq(op.Mul(op.Max(blk, zero), _i64(KB)), -1), _i64(list(range(KB))))
    lg = op.Where(op.Less(kpos, T), op.Reshape(lg, op.Shape(kpos)), ninf)
    exact = op.Where(live, op.ReduceMax(lg, _i64([-1]), keepdims=0), ninf)  # [B, Hkv, nQ, M]
    es, ei = op.TopK(exact, op.Min(_i64([int(topk)]), _unsq(M, 0)), axis=-1, largest=1, sorted=1)
    kept = op.Where(op.Equal(es, ninf), _i64(-1), op.GatherElements(blk, ei, axis=-1))

    # --- attention: sinks, window, kept and diagonal blocks, one softmax -------------------------
    before3 = _unsq(before, 1)  # [nQ, 1]
    sink = op.Range(zero, sb, one)
    sink = op.Where(op.Less(_unsq(sink, 0), before3), _unsq(sink, 0), _i64(-1))  # [nQ, sb]
    win = op.Add(op.Sub(before3, wb), _unsq(op.Range(zero, wb, one), 0))
    win = op.Where(op.And(op.GreaterOrEqual(win, sb), op.GreaterOrEqual(win, zero)), win, _i64(-1))
    diag = op.Add(before3, _i64([list(range(per_q))]))
    diag = op.Where(op.Less(diag, nK), diag, _i64(-1))
    fixed = op.Concat(sink, win, diag, axis=1)  # [nQ, sb + wb + per_q]
    fixed = op.Expand(_unsq(fixed, 0, 1), op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(nQ, 0),
                                                   _i64([1]), axis=0))
    lists = op.Concat(fixed, kept, axis=-1)  # [B, Hkv, nQ, nL]
    pos = op.Add(_unsq(op.Mul(op.Max(lists, zero), _i64(KB)), -1), _i64(list(range(KB))))
    ok = op.And(_unsq(op.GreaterOrEqual(lists, zero), -1), op.Less(pos, T))
    pos = op.Reshape(op.Min(pos, op.Sub(T, one)), mshape)  # [B, Hkv, nQ, nL*KB]
    ok = op.Reshape(ok, mshape)
    rows = op.Add(op.Mul(bh, T), pos)
    kg2 = op.Gather(op.Reshape(kf, op.Concat(_i64([-1]), _unsq(D, 0), axis=0)), rows, axis=0)
    vg2 = op.Gather(op.Reshape(vf, op.Concat(_i64([-1]), _unsq(Dv, 0), axis=0)), rows, axis=0)
    q6 = op.Reshape(qb, op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(G, 0), _unsq(nQ, 0),
                                  _i64([QB]), _unsq(D, 0), axis=0))
    q6 = op.Transpose(q6, perm=[0, 1, 3, 2, 4, 5])  # [B, Hkv, nQ, G, QB, D]
    qr = op.Reshape(q6, op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(nQ, 0), _i64([-1]),
                                  _unsq(D, 0), axis=0))  # [B, Hkv, nQ, G*QB, D]
    logits = op.Mul(op.MatMul(qr, op.Transpose(kg2, perm=[0, 1, 2, 4, 3])), _f32(float(scale)))
    qpos = op.Add(_unsq(op.Mul(op.Add(j0, n), _i64(QB)), 1), _i64([list(range(QB))]))  # [nQ, QB]
    qpos = op.Reshape(op.Tile(_unsq(qpos, 1), op.Concat(_i64([1]), _unsq(G, 0), _i64([1]),
                                                         axis=0)), op.Concat(_unsq(nQ, 0),
                                                                             _i64([-1]), axis=0))
    allowed = op.And(_unsq(ok, 3), op.LessOrEqual(_unsq(pos, 3), _unsq(qpos, 0, 1, 4)))
    lm = op.Where(allowed, logits, ninf)
    m = op.ReduceMax(lm, _i64([-1]), keepdims=1)
    e = op.Exp(op.Sub(lm, op.Where(op.IsInf(m), _f32(0.0), m)))
    den = op.ReduceSum(e, _i64([-1]), keepdims=1)
    o = op.MatMul(op.Div(e, op.Where(op.Greater(den, _f32(0.0)), den, _f32(1.0))), vg2)
    o = op.Reshape(o, op.Concat(_unsq(B, 0), _unsq(Hkv, 0), _unsq(nQ, 0), _unsq(G, 0),
                                _i64([QB]), _unsq(Dv, 0), axis=0))
    o = op.Reshape(op.Transpose(o, perm=[0, 1, 3, 2, 4, 5]),
                   op.Concat(_unsq(B, 0), _unsq(Hq, 0), _i64([-1]), _unsq(Dv, 0), axis=0))
    o = op.Slice(o, _unsq(front, 0), _unsq(op.Add(front, Lq), 0), _i64([2]))
    return op.CastLike(o, query)


def translation_table():
    """``custom_translation_table`` for ``torch.onnx.export``."""
    import torch
    import slcompile.kernels.ops  # noqa: F401  (registers torch.ops.superlinear)

    return {
        torch.ops.superlinear.span_search.default: span_search,
        torch.ops.superlinear.span_attention.default: span_attention,
        torch.ops.superlinear.block_sparse_attention.default: block_sparse_attention,
    }
