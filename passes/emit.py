"""Emission: a proven site becomes calls of the superlinear ops (through kernels/lowering.py),
with its runtime padding mask and query positions."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx

from slcompile.kernels import lowering
from slcompile.kernels.config import SuperlinearConfig

from .canon import tensor_meta
from .maskproof import CausalProof, static_int, sym, sym_eq
from .graph import Skip, _Emitter, _one, _size, aten
from .sites import Site


def _emit_padding(em: _Emitter, atom, q, k) -> fx.Node:
    _, node, _sup, mode = atom
    t = tensor_meta(node)
    x = node
    n = t.dim()
    while n < 4:
        x = em.call(aten.unsqueeze.default, (x, 0))
        n += 1
    x = em.call(aten.select.int, (x, 1, 0))
    x = em.call(aten.select.int, (x, 1, 0))  # [B or 1, T or 1]
    B, T = _size(em, q, 0), _size(em, k, 2)
    ts = [sym(s) for s in t.shape]
    # a factor may be wider than the logits it broadcasts onto only if it was sliced from the
    # front (start 0, the only slice the prover lets through unchanged): cut it to size
    if t.dim() == 4 and not _one(ts[0]) and not sym_eq(ts[0], sym(tensor_meta(q).shape[0])):
        x = em.call(aten.slice.Tensor, (x, 0, 0, B))
    if not _one(ts[-1]) and not sym_eq(ts[-1], sym(tensor_meta(k).shape[2])):
        x = em.call(aten.slice.Tensor, (x, 1, 0, T))
    if mode == "truthy":
        x = em.call(aten.ne.Scalar, (x, 0)) if t.dtype != torch.bool else x
    elif mode == "not":
        x = em.call(aten.eq.Scalar, (x, 0)) if t.dtype != torch.bool else em.call(aten.logical_not.default, (x,))
    else:
        x = em.call(aten.eq.Scalar if mode[0] == "eq" else aten.ne.Scalar, (x, mode[1]))
    return em.call(aten.expand.default, (x, [B, T]))



def _emit(graph: fx.Graph, site: Site, proof: CausalProof, qpos_offset: Optional[int],
          config: SuperlinearConfig, meta_key: Optional[str]) -> fx.Node:
    em = _Emitter(graph, site.out, meta_key)
    if site.pre_emit is not None:
        site.pre_emit(em)
    for name, p in site.perm.items():  # operands read permuted (einsum / pre-permuted keys)
        src = getattr(site, name)
        n = em.call(aten.permute.default, (src, list(p)))
        if "val" not in n.meta and "example_value" not in n.meta and tensor_meta(src) is not None:
            try:  # dynamo graphs: later size reads of this node need an example value
                n.meta["example_value"] = tensor_meta(src).permute(*p)
            except Exception:  # noqa: BLE001
                pass
        setattr(site, name, n)
    if site.three_d:
        site.q, site.k, site.v = (em.call(aten.unsqueeze.default, (x, 0)) for x in (site.q, site.k, site.v))
    q = site.q
    qt = site.q_meta if site.q_meta is not None else tensor_meta(q)
    D = qt.shape[-1]
    scale = site.scale
    runtime = list(site.runtime)
    if scale is None:
        Di = static_int(sym(D))
        if Di is None:  # symbolic head dim: scale q by D ** -0.5 at run time
            import operator
            d = em.call(aten.sym_size.int, (site.q, 3))
            runtime.append((em.call(operator.pow, (d, -0.5)), "mul"))
            scale = 1.0
        else:
            scale = 1.0 / math.sqrt(Di)
    scale = scale * site.factor
    if scale < 0:
        q = em.call(aten.neg.default, (q,))
        scale = -scale
    if scale == 0:
        raise Skip("zero softmax scale")
    for s, op in runtime:
        q = em.call(aten.mul.Tensor if op == "mul" else aten.div.Tensor, (q, s))
    if site.check_kv_len:
        import operator
        same = em.call(operator.eq, (_size(em, site.k, 2), _size(em, site.v, 2)))
        em.call(aten._assert_scalar.default, (same, "superlinear: key and value lengths differ"))
    kpm = site.kpm_node
    for atom in proof.padding:
        m = _emit_padding(em, atom, site.q, site.k)
        kpm = m if kpm is None else em.call(aten.logical_and.default, (kpm, m))
    qpos = None
    if isinstance(qpos_offset, fx.Node):  # runtime positions: the mask's own query-position values
        Lq = _size(em, site.q, 2)
        B = 1 if site.three_d else _size(em, site.q, 0)
        p = em.call(aten.reshape.default, (qpos_offset, [1, Lq]))
        p = em.call(aten.to.dtype, (p, torch.int64))
        # the proof holds for any offset, but the mask is causal self-attention over these keys
        # only while every query position names one of them (0 <= pos < T): checked at run time,
        # with a clear error, before the ops (which index keys by these positions) run
        T = _size(em, site.k, 2)
        lo = em.call(aten.ge.Scalar, (p, 0))
        hi = em.call(aten.lt.Scalar, (p, T))
        ok = em.call(aten.all.default, (em.call(aten.logical_and.default, (lo, hi)),))
        em.call(aten._assert_async.msg, (ok, "superlinear: a query position read from the graph "
                                             "lies outside the keys (the mask would see keys after "
                                             "the query or none): not causal self-attention"))
        qpos = em.call(aten.expand.default, (p, [B, Lq]))
    elif qpos_offset is not None:
        import operator
        Lq = static_int(sym(qt.shape[2]))
        if Lq is None:  # symbolic query length: offset + Lq <= T is checked at run time
            Lq = _size(em, site.q, 2)
            fits = em.call(operator.le, (em.call(operator.add, (Lq, qpos_offset)), _size(em, site.k, 2)))
            em.call(aten._assert_scalar.default, (fits, "superlinear: queries lie past the keys"))
            end = em.call(operator.add, (Lq, qpos_offset))
        else:
            end = qpos_offset + Lq
        B = 1 if site.three_d else _size(em, site.q, 0)
        dev = qt.device
        ar = em.call(aten.arange.start, (qpos_offset, end), {"dtype": torch.int64, "device": dev})
        qpos = em.call(aten.expand.default, (ar, [B, Lq]))
    import operator

    out = lowering.attention(config, q, site.k, site.v, kpm, qpos, scale, call=em.call,
                             getitem=lambda node, i: em.call(operator.getitem, (node, i)))
    if site.post_emit is not None:
        return site.post_emit(em, out)
    if site.three_d:
        out = em.call(aten.squeeze.dim, (out, 0))
    if site.flat_out:
        out = em.call(aten.reshape.default, (out, [-1, _size(em, site.q, 2), _size(em, site.v, 3)]))
    if site.out_perm is not None:
        out = em.call(aten.permute.default, (out, list(site.out_perm)))
    ot = tensor_meta(site.out)
    if ot is not None and qt is not None and ot.dtype != qt.dtype:
        out = em.call(aten.to.dtype, (out, ot.dtype))
    return out
