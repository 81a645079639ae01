"""Find dense attention sites in an FX graph, prove them causal, rewrite them.

Works on dynamo graphs (torch-level) and on ATen graphs (torch.export, AOTAutograd) alike: it reads
nodes through `canon`. A site is

* an SDPA call (``F.scaled_dot_product_attention`` / ``aten.scaled_dot_product_attention`` and the
  fused ATen variants), or
* a softmax whose input is ``q @ k^T`` (matmul or einsum), optionally scaled (either side, by
  constants or runtime scalars), masked (masked_fill / where / added bias, any number of times) and
  cast, and whose output, after optional casts and inactive dropout, only feeds ``probs @ v``.

K/V are read un-repeated through ``repeat_kv`` (unsqueeze + expand + reshape), ``repeat_interleave``
on the head dim, or SDPA's ``enable_gqa``. A site is rewritten only when `maskproof` proves it
causal; the runtime padding part of a mask becomes ``key_padding_mask``.
"""
from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from slcompile.kernels.config import SuperlinearConfig

from .canon import canon, meta_val, remove_canon_cache, tensor_meta
from .maskproof import (Aff, CausalProof, MaskEvaluator, constraints_of, prove_causal,
                        runtime_symbols, static_int, sym, sym_eq)
from .report import RewriteReport, SiteReport
from .emit import _emit
from .graph import Skip, _module_path, _module_types, _shape_str, _source, _strip_trivial, aten
from .sites import (Site, _check_fill_reaches_softmax, _check_mulkeep, _check_space,
                    _parse_encoder_layer, _parse_mha, _parse_sdpa, _parse_softmax, _removal_value)


# --------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------

def _buffer_constants(gm: fx.GraphModule, extra: Optional[Dict[str, torch.Tensor]]):
    from torch._subclasses.fake_tensor import FakeTensor
    consts: Dict[fx.Node, torch.Tensor] = {}
    extra = extra or {}
    for n in gm.graph.nodes:
        t = None
        if n.op == "get_attr":
            try:
                obj = gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                t = obj if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter) else None
            except AttributeError:
                t = None
        elif n.op == "placeholder":
            if n.name in extra:
                t = extra[n.name]
            elif str(n.target) in extra:
                t = extra[str(n.target)]
            else:
                ga = n.meta.get("grapharg")
                src = getattr(ga, "source", None)
                is_buf = False
                while src is not None:
                    if getattr(src, "member", None) == "_buffers":
                        is_buf = True
                        break
                    src = getattr(src, "base", None)
                if is_buf:
                    try:
                        t = ga.example
                    except Exception:  # noqa: BLE001
                        t = None
        if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type != "meta":
            consts[n] = t
    return consts


def _is_aten_graph(graph: fx.Graph) -> bool:
    for n in graph.nodes:
        if n.op == "call_method":
            return False
        if n.op == "call_function" and not isinstance(n.target, torch._ops.OpOverload) \
                and n.target.__module__ != "_operator":
            return False
    return True


def rewrite_graph(gm: fx.GraphModule, config: Optional[SuperlinearConfig] = None, *,
                  constants: Optional[Dict[str, torch.Tensor]] = None,
                  dry_run: bool = False) -> RewriteReport:
    """Rewrite every provably causal dense attention of `gm` in place.

    Args:
        gm: a dynamo graph (torch-level) or an ATen graph (torch.export's ``graph_module``,
            AOTAutograd). Nodes must carry example values (``meta['val']`` or
            ``meta['example_value']``), as graphs from those tracers do.
        config: the `SuperlinearConfig` whose fields are baked into the emitted ops.
        constants: real values of buffer placeholders (by node name or target), for graphs
            whose buffers are lifted inputs (torch.export); their contents are read to prove
            masks such as GPT-2's ``tril`` buffer causal.
        dry_run: analyse and report, change nothing.

    Returns:
        `RewriteReport` with one `SiteReport` per attention site found.
    """
    if config is None:
        config = SuperlinearConfig()
    if not isinstance(config, SuperlinearConfig):
        raise TypeError(f"rewrite_graph: config must be a SuperlinearConfig, got {type(config).__name__}")
    t0 = time.perf_counter()
    graph = gm.graph
    meta_key = "val" if _is_aten_graph(graph) else None
    ev = MaskEvaluator(_buffer_constants(gm, constants))
    return _rewrite(gm, graph, config, ev, meta_key, dry_run, t0)


def _rewrite(gm, graph, config, ev, meta_key, dry_run, t0) -> RewriteReport:
    report = RewriteReport()
    changed = False
    for node in list(graph.nodes):
        if node.op not in ("call_function", "call_method"):
            continue
        c = canon(node)
        if c is None or c.op not in ("sdpa", "sdpa_fused", "softmax", "mha", "encoder_layer"):
            continue
        rep = SiteReport(name=node.name)
        rep.module_path, mtype = _module_path(node)
        rep.source = _source(node)
        try:
            if c.op == "softmax":
                try:
                    site = _parse_softmax(node, c, ev)
                except Skip:
                    rep.form = "matmul-softmax"
                    raise
                if site is None:
                    continue
            elif c.op == "mha":
                rep.form = "mha"
                site = _parse_mha(node, c, ev)
            elif c.op == "encoder_layer":
                rep.form = "encoder-layer"
                site = _parse_encoder_layer(node, c)
            else:
                site = _parse_sdpa(node, c)
            rep.name = site.out.name if c.op not in ("sdpa_fused", "mha", "encoder_layer") else node.name
            rep.form = site.form
            if any("MultiheadAttention" in t for t in _module_types(node)) and c.op != "encoder_layer":
                rep.form = "mha"
            if site.pre_emit is None:
                qt, kt, vt = (_operand_meta(site, n) for n in ("q", "k", "v"))
                if "q" in site.perm:
                    site.q_meta = qt
                rep.q_shape, rep.kv_shape = _shape_str(qt), _shape_str(kt)
                qt, kt, vt = _check_layout(site, qt, kt, vt)
                Lq, T = sym(qt.shape[2]), sym(kt.shape[2])
            else:
                xt, H, Dh = site.mha_shapes
                bd, ld = (0, 1) if site.batch_first else (1, 0)
                rep.q_shape = rep.kv_shape = (str(xt.shape[bd]), str(H), str(xt.shape[ld]), str(Dh))
                Lq = T = sym(xt.shape[ld])
            rep.kv_groups = site.group
            if site.causal_flag:
                proof = CausalProof(True, "", sympy.Integer(0), ())
            else:
                if not site.terms:
                    if not _decode_over_own_cache(site, Lq):
                        raise Skip("no causal mask (bidirectional attention)")
                    site.terms = []  # one query over its own cache: causal at bottom-right
                atoms = set()
                if not site.terms:
                    atoms.add(("lin", ((-1, 1),), sympy.expand(-(T - Lq))))  # j <= T - 1
                removals, mulkeeps = [], []
                for mnode, kind, post in site.terms:
                    val = ev.eval(mnode)
                    if kind == "mulkeep":  # zeroes logits: checked below against the removals
                        cons, err = constraints_of(val, "keep")
                        if cons is None:
                            raise Skip(f"logits multiplied by a mask: {err}")
                        mulkeeps.append((cons, post))
                        continue
                    cons, err = constraints_of(val, kind)
                    if cons is None:
                        nf = ev.not_followed(mnode) if isinstance(mnode, fx.Node) else ""
                        raise Skip(f"{err}; not followed: {nf}" if nf else err)
                    if post is not None and cons:
                        _check_fill_reaches_softmax(post, _removal_value(val, kind, post), ev)
                    if post is not None and post.space is not None:
                        _check_space(site, post.space, cons)
                    atoms |= set(cons)
                    removals.append((cons, post, _removal_value(val, kind, post) if post is not None else None))
                for cons, post in mulkeeps:
                    _check_mulkeep(site, cons, post, removals)
                proof = prove_causal(atoms, Lq, T, 3 if site.three_d else (
                    site.logits_ndim or (tensor_meta(site.out).dim() if site.pre_emit is not None else 4)))
                if not proof.ok:
                    raise Skip(proof.reason)
            rep.causal_proven = True
            rep.padding = bool(proof.padding)
            qpos_offset = _positions(proof.offset, Lq, T, ev)
            if not dry_run:
                new = _emit(graph, site, proof, qpos_offset, config, meta_key)
                for key in ("val", "example_value"):  # a later site may read its example value
                    if key in site.out.meta and "val" not in new.meta and "example_value" not in new.meta:
                        new.meta[key] = site.out.meta[key]
                site.out.replace_all_uses_with(new)
                if c.op == "mha":  # the original call and its [0] are dead now
                    for u in list(node.users):
                        if not u.users:
                            graph.erase_node(u)
                    if not node.users:
                        graph.erase_node(node)
                changed = True
            rep.rewritten = not dry_run
            rep.reason = "" if not dry_run else "dry run"
        except Skip as e:
            rep.reason = str(e)
        report.sites.append(rep)
    if changed:
        graph.eliminate_dead_code(is_impure_node=_impure)
        graph.lint()
        gm.recompile()
    remove_canon_cache(graph)
    report.seconds = time.perf_counter() - t0
    return report


def _impure(node: fx.Node) -> bool:
    if node.op in ("placeholder", "output"):
        return True
    t = node.target
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags \
            and t.overloadpacket.__name__ in ("scaled_dot_product_attention", "dropout", "native_dropout",
                                              "_scaled_dot_product_flash_attention_for_cpu",
                                              "_scaled_dot_product_flash_attention",
                                              "_scaled_dot_product_efficient_attention",
                                              "_scaled_dot_product_cudnn_attention"):
        return False  # seeded only through dropout; a dead attention node can go
    if _in_place(node):  # e.g. a static cache's keys.index_copy_(...): fx counts methods as pure
        return True
    try:
        return node.is_impure()
    except Exception:  # noqa: BLE001
        return True


def exported_constants(ep) -> Dict[str, torch.Tensor]:
    """The real tensors of an ExportedProgram's lifted buffers and constants, keyed by placeholder
    name, for `rewrite_graph(ep.graph_module, config, constants=exported_constants(ep))`."""
    sig = ep.graph_signature
    out: Dict[str, torch.Tensor] = {}
    for spec in sig.input_specs:
        tgt = getattr(spec, "target", None)
        if tgt is None or spec.kind.name not in ("BUFFER", "CONSTANT_TENSOR"):
            continue
        t = ep.state_dict.get(tgt) if tgt in ep.state_dict else ep.constants.get(tgt)
        if isinstance(t, torch.Tensor):
            out[spec.arg.name] = t
    return out


def _operand_meta(site: Site, name: str):
    """The example value of q/k/v as the rewrite reads it (permuted where `site.perm` says)."""
    t = tensor_meta(getattr(site, name))
    p = site.perm.get(name)
    if p is None or t is None:
        return t
    import types
    shape = tuple(t.shape[i] for i in p)
    return types.SimpleNamespace(shape=shape, dtype=t.dtype, device=t.device, dim=lambda: len(shape))


def _check_layout(site: Site, qt, kt, vt):
    if qt is None or kt is None or vt is None:
        raise Skip("q/k/v without example values")
    if qt.dim() == kt.dim() == vt.dim() == 3 and site.group == 1:
        site.three_d = True  # [B*H, L, D] (bmm attention): run as one batch of B*H heads
        import types
        qt, kt, vt = (types.SimpleNamespace(shape=(1,) + tuple(t.shape), dtype=t.dtype, device=t.device)
                      for t in (qt, kt, vt))
        site.q_meta = qt
        _check_layout_4d(site, qt, kt, vt)
        return qt, kt, vt
    _check_layout_4d(site, qt, kt, vt)
    return qt, kt, vt


def _check_layout_4d(site: Site, qt, kt, vt):
    if len(qt.shape) != 4 or len(kt.shape) != 4 or len(vt.shape) != 4:
        raise Skip(f"q/k/v are not 4-D [B, H, L, D] (q {tuple(qt.shape)})")
    if not (qt.dtype == kt.dtype == vt.dtype):
        raise Skip(f"q/k/v dtypes differ ({qt.dtype}, {kt.dtype}, {vt.dtype})")
    if not qt.dtype.is_floating_point:
        raise Skip("non-floating q/k/v")
    Hq, Hk, Hv = (sym(t.shape[1]) for t in (qt, kt, vt))
    if not sym_eq(Hk, Hv):
        raise Skip(f"k and v head counts differ ({Hk}, {Hv})")
    hq, hk = static_int(Hq), static_int(Hk)
    if hq is not None and hk is not None:
        if hk == 0 or hq % hk != 0:
            raise Skip(f"query heads {hq} not a multiple of key/value heads {hk}")
        site.group = hq // hk
    elif not sym_eq(Hq, Hk * site.group):
        raise Skip(f"head counts not provably compatible (q {Hq}, k {Hk})")
    if not sym_eq(sym(qt.shape[0]), sym(kt.shape[0])) or not sym_eq(sym(kt.shape[0]), sym(vt.shape[0])):
        raise Skip("batch sizes of q/k/v differ or are broadcast")
    if not sym_eq(sym(qt.shape[3]), sym(kt.shape[3])):
        raise Skip("q and k head dims differ")
    if not sym_eq(sym(kt.shape[2]), sym(vt.shape[2])):
        if static_int(sym(kt.shape[2])) is not None and static_int(sym(vt.shape[2])) is not None:
            raise Skip("k and v lengths differ")
        site.check_kv_len = True  # symbolic: asserted at run time


def _positions(offset, Lq, T, ev: MaskEvaluator):
    """None: bottom-right (the ops' default); an int: queries sit at offset..offset+Lq-1; a node:
    the graph's own tensor of query positions (offset holds runtime values, e.g. a static cache's
    fill level), read where the mask read it."""
    if Lq is None or T is None:
        raise Skip("unknown sequence lengths")
    if sym_eq(offset, T - Lq):
        return None
    if runtime_symbols(offset):
        return _runtime_positions(ev, offset, Lq)
    o, lq, t = static_int(offset), static_int(Lq), static_int(T)
    if o is not None and lq is not None and t is not None:
        if 0 <= o and o + lq <= t:
            return o
        raise Skip(f"causal offset {o} puts queries outside the {t} keys")
    if o is not None:  # a constant offset, symbolic lengths: decided as for static ones
        slack = sympy.expand(T - Lq - o)  # >= 0 iff the last query still has its key
        if o < 0 or slack.is_negative or (static_int(slack) is not None and static_int(slack) < 0):
            raise Skip(f"causal offset {o} puts queries outside the {T} keys")
        return o  # not provable either way: checked at run time
    raise Skip("cannot prove the query/key alignment for symbolic lengths")


_VIEWS = ("to", "view", "expand", "slice", "getitem", "unsqueeze", "squeeze", "transpose", "permute",
          "select", "contiguous")


def _runtime_positions(ev: MaskEvaluator, offset, Lq) -> fx.Node:
    """The node, among those the mask was built from, that holds query i's position offset + i
    (a [.., Lq, ..] integer tensor, or any one-element tensor when Lq is 1). It must be computed
    (not a view of an input, which a cache update may later change in place) and never written in
    place, so that reading it at the attention gives the positions the mask used."""
    lq = static_int(Lq)
    for node, v in ev.memo.items():
        if not isinstance(v, Aff) or not sym_eq(v.const, offset) or node.op not in ("call_function", "call_method"):
            continue
        t = tensor_meta(node)
        if t is None or t.dtype.is_floating_point or t.dtype == torch.bool:
            continue
        c = canon(node)
        if c is None or c.op in _VIEWS or any(_in_place(u) and u.args and u.args[0] is node for u in node.users):
            continue
        n = t.dim()
        dims = [d for d in range(n) if not (sym(t.shape[d]) is not None and sym(t.shape[d]) == 1)]
        if v.coef == () and lq == 1 and not dims:
            return node
        if len(v.coef) == 1 and v.coef[0][1] == 1 and len(dims) == 1 and dims[0] - n == v.coef[0][0] \
                and sym_eq(sym(t.shape[dims[0]]), Lq):
            return node
    raise Skip("query positions depend on runtime values that the graph holds in no tensor of positions")


def _in_place(node: fx.Node) -> bool:
    """A call that writes into its first argument (x.add_(...), x.index_copy_(...), x[i] = y)."""
    t = node.target
    if node.op == "call_method":
        return (t.endswith("_") and not t.startswith("__")) or t in ("__setitem__", "__iadd__", "__isub__",
                                                                      "__imul__", "__itruediv__", "__ior__",
                                                                      "__iand__")
    if node.op == "call_function":
        import operator
        if t in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                 operator.ior, operator.iand):
            return True
        if isinstance(t, torch._ops.OpOverload):
            return t._schema.is_mutable
        name = getattr(t, "__name__", "")
        return name.endswith("_") and not name.startswith("_")
    return False


def _cat_parts(node) -> Optional[Tuple[list, int]]:
    """(tensors, dim) of a torch.cat / aten.cat node, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target not in (torch.cat, torch.concat, aten.cat.default):
        return None
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(parts, (list, tuple)) or not isinstance(dim, int):
        return None
    return list(parts), dim


def _ancestors(node, depth=24) -> set:
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for a in n.all_input_nodes:
                if a not in seen:
                    seen.add(a)
                    nxt.append(a)
        frontier = nxt
    return {n for n in seen if n.op in ("call_function", "call_method", "call_module")
            or (n.op == "placeholder" and not _is_state(n))}


def _is_state(node: fx.Node) -> bool:
    """A placeholder that holds a parameter or buffer (dynamo's lifted module state, torch.export's
    p_/b_/c_ inputs), not data."""
    if isinstance(meta_val(node), torch.nn.Parameter) or str(node.name).startswith(("p_", "b_", "c_")):
        return True
    src = getattr(node.meta.get("grapharg"), "source", None)
    while src is not None:
        if getattr(src, "member", None) in ("_parameters", "_buffers"):
            return True
        src = getattr(src, "base", None)
    return False


def _decode_over_own_cache(site: Site, Lq) -> bool:
    """One query attending, without a mask, keys and values that are ``cat([past, new], dim=-2)``
    whose last row ``new`` is computed from the query's own input (a DynamicCache decode step,
    which transformers runs without a mask): the keys are exactly the query's causal past, with the
    query at the bottom-right."""
    if static_int(Lq) != 1 or site.pre_emit is not None or site.three_d:
        return False
    news = []
    for x in (site.k, site.v):
        c = _cat_parts(_strip_trivial(x))
        if c is None:
            return False
        parts, dim = c
        t = tensor_meta(parts[-1]) if isinstance(parts[-1], fx.Node) else None
        if t is None or t.dim() != 4 or dim not in (2, -2) or static_int(sym(t.shape[2])) != 1:
            return False
        news.append(parts[-1])
    qa = _ancestors(site.q) | {site.q}
    return all(qa & (_ancestors(n) | {n}) for n in news)
