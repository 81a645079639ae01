"""Autograd of the superlinear custom ops: training through span-search and span-attention.

What gets a gradient (``torch.ops.superlinear.*``, hence ``slcompile.superlinear_attention`` and
every graph the pass rewrites):

``span_attention(query, key, value, anchors, scores, ...)``
    * ``query``, ``key``, ``value``: the exact gradient of the output docs/spec.md defines for the
      chosen ``combine`` (sinks, window and kept spans; GQA: a kv head sums the gradients of its
      query heads; padded keys get zero). Dense case (T <= dense_below) likewise.
    * ``scores``, ``combine="gated"``: the gradient through the gate g = softmax(scores of the
      kept spans): d out / d s_j = g_j * (O_j - out). Empty slots (anchor -1) get zero.
    * ``scores``, ``combine="union"``: none (the output does not depend on score values).
    * ``anchors``: none (integers; the selection is discrete).

``span_search(search_query, key, ...) -> (anchors, scores)``
    * ``anchors``: none; the top-k choice is piecewise constant, so no gradient flows through
      *which* spans were kept, only through the kept spans' score values.
    * ``scores`` -> ``search_query`` and ``key``: s_j = q_s . key(a_j) in float32, so
      d q_s = sum_j ds_j key(a_j) and key(a_j) receives ds_j q_s; for ``search_key="anchor"``
      key(a_j) = k[a_j], for ``"mean"`` the mean of the present keys of the anchor's search span
      [max(0, a - back), min(a + fwd, t - W)], so each of those keys receives ds_j q_s / count.

So in ``gated`` mode the search query (a learned projection in a trained model, the attention
query after a training-free rewrite) learns where to look through the gate, end to end; in
``union`` mode only query, key and value learn.

The backward passes are custom ops themselves (``superlinear::span_attention_backward``,
``superlinear::span_search_backward``) so that AOTAutograd traces them as opaque nodes of the
joint graph (torch.compile in training). CPU: an explicit backward over each query's gathered
keys (any float dtype, float64 included, so that gradcheck can hold it to float64). CUDA (or
``SLCOMPILE_FORCE_TRITON``): the Triton kernels of ``triton_backward.py``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import dispatch
from .searches import kind
from .geometry import keeps_no_span, span_extents
from .reference import default_positions

# elements of the largest gathered tensor per chunk of rows ([rows, slots, D])
_CHUNK_ELEMS = 1 << 22


def _compute_dtype(*ts) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


# --------------------------------------------------------------------------------------------
# span_attention: forward and explicit backward over gathered keys (the CPU path and the oracle)
# --------------------------------------------------------------------------------------------

def _row_slots(t, a, kpm_b, T, W, S, back, fwd, union, M):
    """Key positions and validity of one chunk of rows. t [R], a [R, kk] (int64, -1 empty).

    Returns pos_f [R, S+W], ok_f (sinks then window), pos_s [R, kk, M], ok_s (span j's
    positions lo_j + m; union: minus positions of earlier kept spans). The segments are the
    reference's: sinks [0, min(S, t+1)), window [max(S, t-W+1), t], span j
    [max(a_j - back, S), min(a_j + fwd, t - W)]."""
    dev = t.device
    sk = torch.arange(S, device=dev)
    pos_sk = sk[None, :].expand(t.shape[0], S)
    ok_sk = pos_sk <= t[:, None]
    wo = torch.arange(W, device=dev)
    pos_w = t[:, None] - W + 1 + wo[None, :]
    ok_w = pos_w >= S
    pos_f = torch.cat([pos_sk, pos_w], 1)
    ok_f = torch.cat([ok_sk, ok_w], 1) & (pos_f >= 0)
    aval = a >= 0
    ac = a.clamp(min=0)
    lo = torch.clamp(ac - back[t][:, None], min=S)
    hi = torch.minimum(ac + fwd[t][:, None], t[:, None] - W)
    hi = torch.where(aval, hi, lo - 1)
    pos_s = lo[..., None] + torch.arange(M, device=dev)  # [R, kk, M]
    ok_s = pos_s <= hi[..., None]
    if union:
        kk = a.shape[1]
        for j in range(1, kk):
            for jj in range(j):
                inside = (pos_s[:, j] >= lo[:, jj, None]) & (pos_s[:, j] <= hi[:, jj, None])
                ok_s[:, j] &= ~inside
    if kpm_b is not None:
        ok_f = ok_f & kpm_b[pos_f.clamp(0, T - 1)]
        ok_s = ok_s & kpm_b[pos_s.clamp(0, T - 1)]
    return pos_f.clamp(0, T - 1), ok_f, pos_s.clamp(0, T - 1), ok_s


def _softmax_masked(logits, ok, dim=-1):
    logits = logits.masked_fill(~ok, float("-inf"))
    m = logits.amax(dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(logits - m) * ok
    z = e.sum(dim, keepdim=True)
    return e / torch.where(z > 0, z, torch.ones_like(z))


def gathered_attention(q, k, v, anchors, scores, key_padding_mask, query_positions, window, sinks,
                       span_power, backward_factor, forward_factor, combine, scale, dense_below,
                       grad_out: Optional[Tensor] = None):
    """docs/spec.md's span-attention over each query's gathered keys, in float64 for float64 inputs
    (float32 otherwise), with its explicit backward when ``grad_out`` is given.

    Returns ``out`` (compute dtype) and, with ``grad_out``, also (dq, dk, dv, dscores) in the
    compute dtype (dscores zero in union mode)."""
    B, Hq, Lq, D = q.shape
    Hkv, T, Dv = k.shape[1], k.shape[2], v.shape[3]
    cd = _compute_dtype(q, k, v)
    dev = q.device
    g = Hq // Hkv
    kk = anchors.shape[-1]
    pos = default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    if T <= dense_below:  # exact dense attention: a window over every key, no spans
        W, S = T, 0
        anchors = torch.full_like(anchors, -1)
    else:
        W, S = min(window, T), min(sinks, T)
    back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
    union = combine == "union"
    out = torch.zeros(B, Hq, Lq, Dv, dtype=cd, device=dev)
    want = grad_out is not None
    if want:
        dq = torch.zeros(B, Hq, Lq, D, dtype=cd, device=dev)
        dk = torch.zeros(B, Hkv * T, D, dtype=cd, device=dev)
        dv = torch.zeros(B, Hkv * T, Dv, dtype=cd, device=dev)
        dsc = torch.zeros(B, Hq, Lq, kk, dtype=cd, device=dev)
    a_all = anchors.long()
    aval_all = a_all >= 0
    ac = a_all.clamp(min=0)
    tt = pos[:, None, :, None].expand(B, Hq, Lq, kk)
    span_len = torch.minimum(ac + fwd[tt], tt - W) - torch.clamp(ac - back[tt], min=S) + 1
    M = max(1, int(torch.where(aval_all, span_len, 0).max().item())) if a_all.numel() else 1
    nslot = S + W + kk * M
    rows_per = max(1, _CHUNK_ELEMS // (nslot * max(D, Dv)))
    for b in range(B):
        kb = k[b].to(cd).reshape(Hkv * T, D)
        vb = v[b].to(cd).reshape(Hkv * T, Dv)
        kpm_b = key_padding_mask[b] if key_padding_mask is not None else None
        # rows are (h, i) pairs, flattened h-major
        nrow = Hq * Lq
        for r0 in range(0, nrow, rows_per):
            r = torch.arange(r0, min(nrow, r0 + rows_per), device=dev)
            h, i = r // Lq, r % Lq
            t = pos[b, i]
            a = a_all[b, h, i]
            pos_f, ok_f, pos_s, ok_s = _row_slots(t, a, kpm_b, T, W, S, back, fwd, union, M)
            base = ((h // g) * T)
            idx_f = base[:, None] + pos_f
            idx_s = base[:, None, None] + pos_s
            qr = q[b, h, i].to(cd)  # [R, D]
            kf, vf = kb[idx_f], vb[idx_f]  # [R, F, D]
            ks_, vs_ = kb[idx_s], vb[idx_s]  # [R, kk, M, D]
            lf = torch.einsum("rd,rfd->rf", qr, kf) * scale
            ls = torch.einsum("rd,rjmd->rjm", qr, ks_) * scale
            aval = a >= 0
            R = r.shape[0]
            # gated rows: at least one kept span; the rest (and every union row) is one softmax
            gated_rows = aval.any(-1) if not union else torch.zeros_like(aval[:, 0])
            ok_sp = ok_s if union else torch.zeros_like(ok_s)
            l_all = torch.cat([lf, ls.reshape(R, -1)], 1)
            ok_all = torch.cat([ok_f, ok_sp.reshape(R, -1)], 1)
            p_u = _softmax_masked(l_all, ok_all)
            pf_u, ps_u = p_u[:, :lf.shape[1]], p_u[:, lf.shape[1]:].reshape(R, kk, M)
            o_u = torch.einsum("rf,rfd->rd", pf_u, vf) + torch.einsum("rjm,rjmd->rd", ps_u, vs_)
            if union:
                o = o_u
            else:
                # per kept span j: softmax over window, sinks and span j, mixed by the gate
                lj = torch.cat([lf[:, None].expand(R, kk, -1), ls], 2)  # [R, kk, F+M]
                okj = torch.cat([ok_f[:, None].expand(R, kk, -1), ok_s], 2) & aval[..., None]
                pj = _softmax_masked(lj, okj)
                pfj, psj = pj[..., :lf.shape[1]], pj[..., lf.shape[1]:]
                oj = torch.einsum("rjf,rfd->rjd", pfj, vf) + torch.einsum("rjm,rjmd->rjd", psj, vs_)
                sc = scores[b, h, i].to(cd).masked_fill(~aval, float("-inf"))
                gate = torch.softmax(sc, -1).nan_to_num(0.0)  # [R, kk]
                o_g = (gate[..., None] * oj).sum(1)
                o = torch.where(gated_rows[:, None], o_g, o_u)
            out[b, h, i] = o
            if not want:
                continue
            do = grad_out[b, h, i].to(cd)  # [R, Dv]
            dpf = torch.einsum("rd,rfd->rf", do, vf)
            dps = torch.einsum("rd,rjmd->rjm", do, vs_)
            delta = (do * o).sum(-1)  # [R]
            if union:
                dlf = pf_u * (dpf - delta[:, None])
                dls = ps_u * (dps - delta[:, None, None])
                gf, gs = pf_u, ps_u
            else:
                dj = (do[:, None] * oj).sum(-1)  # [R, kk]: dO . O_j
                # rows with a kept span: key weights g_j * P_j, logit grads g_j P_j (dP - dO.O_j)
                dlf_g = (gate[..., None] * pfj * (dpf[:, None] - dj[..., None])).sum(1)
                dls_g = gate[..., None] * psj * (dps - dj[..., None])
                gf_g = (gate[..., None] * pfj).sum(1)
                gs_g = gate[..., None] * psj
                dlf_u = pf_u * (dpf - delta[:, None])
                dls_u = ps_u * (dps - delta[:, None, None])
                sel = gated_rows[:, None]
                dlf = torch.where(sel, dlf_g, dlf_u)
                dls = torch.where(sel[..., None], dls_g, dls_u)
                gf = torch.where(sel, gf_g, pf_u)
                gs = torch.where(sel[..., None], gs_g, ps_u)
                dsc[b, h, i] = torch.where(gated_rows[:, None] & aval,
                                           gate * (dj - delta[:, None]), 0.0).to(dsc.dtype)
            dq[b, h, i] = (torch.einsum("rf,rfd->rd", dlf, kf)
                           + torch.einsum("rjm,rjmd->rd", dls, ks_)) * scale
            dk[b].index_add_(0, idx_f.reshape(-1), (dlf[..., None] * qr[:, None] * scale).reshape(-1, D))
            dk[b].index_add_(0, idx_s.reshape(-1),
                             (dls[..., None] * qr[:, None, None] * scale).reshape(-1, D))
            dv[b].index_add_(0, idx_f.reshape(-1), (gf[..., None] * do[:, None]).reshape(-1, Dv))
            dv[b].index_add_(0, idx_s.reshape(-1), (gs[..., None] * do[:, None, None]).reshape(-1, Dv))
    if not want:
        return out
    return out, dq, dk.view(B, Hkv, T, D), dv.view(B, Hkv, T, Dv), dsc


# --------------------------------------------------------------------------------------------
# span_search: gradient of the kept scores into the search query and the keys
# --------------------------------------------------------------------------------------------

def search_backward(grad_scores, search_query, key, key_padding_mask, query_positions, anchors,
                    window, span_power, backward_factor, forward_factor, search_key, dense_below):
    """(d search_query, d key) of s_j = q_s . key(a_j) (see the module docstring), in the
    inputs' dtypes. A search kind without ``search_grad``, the dense case and empty slots contribute
    nothing."""
    B, Hq, Lq, D = search_query.shape
    Hkv, T = key.shape[1], key.shape[2]
    dev = search_query.device
    cd = _compute_dtype(search_query, key, grad_scores)
    dqs = torch.zeros(B, Hq, Lq, D, dtype=cd, device=dev)
    dk = torch.zeros(B * Hkv * T, D, dtype=cd, device=dev)
    if not kind(search_key).search_grad or keeps_no_span(T, window, dense_below, Lq):
        return dqs.to(search_query.dtype), dk.view(B, Hkv, T, D).to(key.dtype)
    W = min(window, T)
    g = Hq // Hkv
    a = anchors.long()
    valid = a >= 0
    ac = a.clamp(min=0)
    gs = torch.where(valid, grad_scores.to(cd), torch.zeros((), dtype=cd, device=dev))
    qs = search_query.to(cd)
    kvrow = (torch.arange(B, device=dev)[:, None] * Hkv
             + torch.arange(Hq, device=dev)[None, :] // g) * T  # [B, Hq]
    kf = key.to(cd).reshape(B * Hkv * T, D)
    if kind(search_key).stripe_key == "anchor":
        flat = kvrow[:, :, None, None] + ac  # [B, Hq, Lq, kk]
        keys = kf.index_select(0, flat.reshape(-1)).view(*flat.shape, D)
        dqs = (gs[..., None] * keys).sum(-2)
        dk.index_add_(0, flat.reshape(-1), (gs[..., None] * qs[..., None, :]).reshape(-1, D))
        return dqs.to(search_query.dtype), dk.view(B, Hkv, T, D).to(key.dtype)
    # "mean": the mean of the present keys of [lo, hi] (prefix sums, as the reference)
    pos = default_positions(B, Lq, T, dev) if query_positions is None else query_positions.long()
    back, fwd = span_extents(T, span_power, backward_factor, forward_factor, dev)
    t = pos[:, None, :, None]
    lo = (ac - back[t]).clamp(min=0)
    hi = torch.minimum(ac + fwd[t], t - W).clamp(min=0)
    present = (torch.ones(B, T, dtype=cd, device=dev) if key_padding_mask is None
               else key_padding_mask.to(cd))
    kp = kf.view(B, Hkv, T, D) * present[:, None, :, None]
    pre = torch.cat([torch.zeros(B, Hkv, 1, D, dtype=cd, device=dev), kp.cumsum(2)], 2)
    cpre = torch.cat([torch.zeros(B, 1, dtype=cd, device=dev), present.cumsum(1)], 1)
    bidx = torch.arange(B, device=dev)[:, None, None, None]
    cnt = (cpre[bidx, hi + 1] - cpre[bidx, lo]).clamp(min=1.0)  # [B, Hq, Lq, kk]
    pre_f = pre.reshape(B * Hkv * (T + 1), D)
    prow = (kvrow // T * (T + 1))[:, :, None, None]
    mean = (pre_f[(prow + hi + 1).reshape(-1)] - pre_f[(prow + lo).reshape(-1)]).view(*lo.shape, D)
    mean = mean / cnt[..., None]
    dqs = (gs[..., None] * mean).sum(-2)
    # each present key of [lo, hi] receives ds_j q_s / cnt: a difference array over positions
    c = (gs / cnt)[..., None] * qs[..., None, :]  # [B, Hq, Lq, kk, D]
    diff = torch.zeros(B * Hkv * (T + 1), D, dtype=cd, device=dev)
    diff.index_add_(0, (prow + lo).reshape(-1), c.reshape(-1, D))
    diff.index_add_(0, (prow + hi + 1).reshape(-1), -c.reshape(-1, D))
    dk = diff.view(B, Hkv, T + 1, D).cumsum(2)[:, :, :T] * present[:, None, :, None]
    return dqs.to(search_query.dtype), dk.to(key.dtype)


# --------------------------------------------------------------------------------------------
# the backward ops and the registration
# --------------------------------------------------------------------------------------------

def _use_triton_backward(*tensors) -> bool:
    if not dispatch.use_triton(tensors[0].device):
        return False
    return (len({t.dtype for t in tensors}) == 1
            and tensors[0].dtype in (torch.float32, torch.bfloat16, torch.float16)
            and max(t.shape[-1] for t in tensors) <= 256)


@torch.library.custom_op("superlinear::span_attention_backward", mutates_args=())
def span_attention_backward(
    grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, anchors: Tensor, scores: Tensor,
    key_padding_mask: Optional[Tensor], query_positions: Optional[Tensor], window: int,
    sinks: int, span_power: float, backward_factor: float, forward_factor: float, combine: str,
    scale: float, dense_below: int, out: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d query, d key, d value, d scores) of span_attention; d scores is zero in union mode.
    ``out``: the forward's output, if kept (the Triton union backward takes delta = dO . out
    from it instead of recomputing the forward)."""
    args = (query, key, value, anchors, scores, key_padding_mask, query_positions, window, sinks,
            span_power, backward_factor, forward_factor, combine, scale, dense_below)
    if _use_triton_backward(query, key, value):
        from . import triton_backward

        dq, dk, dv, ds = triton_backward.span_attention_backward(grad_out, *args, out=out)
    else:
        _, dq, dk, dv, ds = gathered_attention(*args, grad_out=grad_out)
    return tuple(x.to(like.dtype).contiguous()
                 for x, like in ((dq, query), (dk, key), (dv, value), (ds, scores)))


@span_attention_backward.register_fake
def _(grad_out, query, key, value, anchors, scores, *rest):
    # contiguous, as the real outputs (empty_like would copy a transposed input's strides)
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            scores.new_empty(scores.shape))


@torch.library.custom_op("superlinear::span_search_backward", mutates_args=())
def span_search_backward(
    grad_scores: Tensor, search_query: Tensor, key: Tensor, key_padding_mask: Optional[Tensor],
    query_positions: Optional[Tensor], anchors: Tensor, window: int, span_power: float,
    backward_factor: float, forward_factor: float, search_key: str, dense_below: int,
) -> Tuple[Tensor, Tensor]:
    """(d search_query, d key) of span_search's scores."""
    dqs, dk = search_backward(grad_scores, search_query, key, key_padding_mask, query_positions,
                              anchors, window, span_power, backward_factor, forward_factor,
                              search_key, dense_below)
    return dqs.contiguous(), dk.contiguous()


@span_search_backward.register_fake
def _(grad_scores, search_query, key, *rest):
    return search_query.new_empty(search_query.shape), key.new_empty(key.shape)


def _setup_search(ctx, inputs, output):
    (qs, k, kpm, pos, window, topk, sp, rp, bf, ff, search_key, dense_below) = inputs
    ctx.save_for_backward(qs, k, kpm, pos, output[0])
    ctx.params = (window, rp, bf, ff, search_key, dense_below)
    # an unused scores output (union mode) then arrives as None, not as zeros to scatter
    ctx.set_materialize_grads(False)


def _backward_search(ctx, grad_anchors, grad_scores):
    qs, k, kpm, pos, anchors = ctx.saved_tensors
    window, rp, bf, ff, search_key, dense_below = ctx.params
    if not kind(search_key).search_grad or grad_scores is None:
        dqs = dk = None
    else:
        dqs, dk = torch.ops.superlinear.span_search_backward(
            grad_scores, qs, k, kpm, pos, anchors, window, rp, bf, ff, search_key, dense_below)
    return (dqs, dk) + (None,) * 10


def _setup_attention(ctx, inputs, output):
    (q, k, v, anchors, scores, kpm, pos, *params) = inputs
    # the output too: the union backward takes delta = dO . out from it (no forward recompute)
    ctx.save_for_backward(q, k, v, anchors, scores, kpm, pos, output)
    ctx.params = tuple(params)


def _backward_attention(ctx, grad_out):
    q, k, v, anchors, scores, kpm, pos, out = ctx.saved_tensors
    combine = ctx.params[5]
    dq, dk, dv, ds = torch.ops.superlinear.span_attention_backward(
        grad_out.contiguous(), q, k, v, anchors, scores, kpm, pos, *ctx.params, out)
    return (dq, dk, dv, None, ds if combine == "gated" else None) + (None,) * 10


# --------------------------------------------------------------------------------------------
# the N-step search (docs/nstep.md): gradients of its scores
# --------------------------------------------------------------------------------------------

@torch.library.custom_op("superlinear::nstep_search_backward", mutates_args=())
def nstep_search_backward(
    grad_scores: Tensor, search_query: Tensor, key: Tensor, key_padding_mask: Optional[Tensor],
    query_positions: Optional[Tensor], anchors: Tensor, window: int, steps: int,
    backward_factor: float, forward_factor: float, search_key: str, dense_below: int,
) -> Tuple[Tensor, Tensor]:
    """(d search_query, d key) of nstep_search's scores (``nstep.nstep_search_backward``)."""
    from . import nstep

    dqs, dk = nstep.nstep_search_backward(grad_scores, search_query, key, key_padding_mask,
                                          query_positions, anchors, window, steps, backward_factor,
                                          forward_factor, search_key, dense_below)
    return dqs.contiguous(), dk.contiguous()


@nstep_search_backward.register_fake
def _(grad_scores, search_query, key, *rest):
    return search_query.new_empty(search_query.shape), key.new_empty(key.shape)


def _nstep_setup(ctx, inputs, output):
    qs, k, kpm, pos, window, topk, steps, bf, ff, search_key, dense_below = inputs
    ctx.save_for_backward(qs, k, kpm, pos, output[0])
    ctx.params = (window, steps, bf, ff, search_key, dense_below)


def _nstep_backward(ctx, grad_anchors, grad_scores):
    qs, k, kpm, pos, anchors = ctx.saved_tensors
    if grad_scores is None:
        return (None,) * 11
    dqs, dk = torch.ops.superlinear.nstep_search_backward(grad_scores, qs, k, kpm, pos, anchors,
                                                          *ctx.params)
    return (dqs, dk) + (None,) * 9


def register(span_search_op, span_attention_op, nstep_search_op) -> None:
    """Attach the backward passes to the forward ops (called once by ``ops.py``)."""
    span_search_op.register_autograd(_backward_search, setup_context=_setup_search)
    span_attention_op.register_autograd(_backward_attention, setup_context=_setup_attention)
    nstep_search_op.register_autograd(_nstep_backward, setup_context=_nstep_setup)
