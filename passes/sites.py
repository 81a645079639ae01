"""Attention sites of an FX graph: `Site` (what a rewrite needs to know about one attention) and
the parsers that recognise each form (SDPA, softmax of q @ k^T with masks and scales,
nn.MultiheadAttention, TransformerEncoderLayer), with the checks that a mask's fill values reach
the softmax as removals."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx


from .canon import canon, meta_val, tensor_meta
from .maskproof import MaskEvaluator, sym, sym_eq, VERY_NEGATIVE
from .graph import (Skip, _Emitter, _is_last_two_transpose, _is_scalar_operand, _one, _size,
                    _strip_scalars, _strip_trivial, _unrepeat, _very_neg_value, aten)


# --------------------------------------------------------------------------------------------
# site description
# --------------------------------------------------------------------------------------------

class Site:
    def __init__(self, out: fx.Node, form: str):
        self.out = out  # the node whose value the rewrite replaces
        self.form = form
        self.q = self.k = self.v = None
        self.group = 1
        self.scale: Optional[float] = None  # None: 1/sqrt(D)
        self.factor = 1.0
        self.runtime: List[Tuple[Any, str]] = []
        self.terms: List[Tuple[Any, str, Any]] = []  # (mask node, kind, _Post or None: as is)
        self.causal_flag = False  # SDPA is_causal=True (top-left alignment)
        self.kpm_node = None  # an emitted bool [B, T] key-padding mask (True = key present)
        self.check_kv_len = False
        self.three_d = False
        self.q_meta = None  # stands in for q's example value when q is built by the rewrite
        self.pre_emit = None  # callable(emitter): builds q/k/v nodes (nn.MultiheadAttention)
        self.post_emit = None  # callable(emitter, out): maps the attention output back
        self.flat_out = False  # the site's output is [B*H, L, D]: the 4-D result is viewed so
        self.perm: Dict[str, tuple] = {}  # "q"/"k"/"v": read as node.permute(perm) (emitted)
        self.out_perm: Optional[list] = None  # the [B, H, L, D] result permuted to the site's layout
        self.batch_first = False  # mha_shapes' input is [B, L, E] (else [L, B, E])
        self.logits_ndim: Optional[int] = None  # the rank of the logits its masks index (None: from out)


def _parse_sdpa(node: fx.Node, c) -> Site:
    q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = c.args
    out = node
    if c.op == "sdpa_fused":
        users = list(node.users)
        outs = [u for u in users if u.op == "call_function" and canon(u) is not None
                and canon(u).op == "getitem" and canon(u).args[1] == 0]
        others = [u for u in users if u not in outs]
        if len(outs) != 1 or any(len(o.users) for o in others):
            raise Skip("fused SDPA with auxiliary outputs in use")
        out = outs[0]
    s = Site(out, "sdpa+mask" if mask is not None else "sdpa")
    if not (isinstance(dropout_p, (int, float)) and dropout_p == 0):
        raise Skip("attention dropout p > 0")
    s.q = q
    s.k, gk = (k, 1) if enable_gqa else _unrepeat(k)
    s.v, gv = (v, 1) if enable_gqa else _unrepeat(v)
    if gk != gv:
        s.k, s.v, gk = k, v, 1
    s.group = gk
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        s.scale = float(scale)
    elif scale is not None:
        if not _is_scalar_operand(scale):
            raise Skip("unsupported scale argument")
        s.scale = 1.0
        s.runtime.append((scale, "mul"))
    if is_causal is True:
        if mask is not None:
            raise Skip("SDPA with both attn_mask and is_causal")
        s.causal_flag = True
    elif is_causal is not False:
        raise Skip("is_causal is not a constant")
    if mask is not None:
        mt = tensor_meta(mask)
        kind = "keep" if mt is not None and mt.dtype == torch.bool else "add"
        s.terms.append((mask, kind, None))
    return s


def _parse_qk(node) -> Tuple[Any, Any, float, list]:
    """node is `q @ k^T` (possibly scaled on either side): (q, k, factor, runtime scalars)."""
    c = canon(node)
    runtime: list = []
    if c.op in ("matmul", "baddbmm"):
        f = 1.0
        if c.op == "baddbmm":  # beta * input + alpha * (a @ b): beta = 0 ignores input
            _, a, b, beta, alpha = c.args
            if not (isinstance(beta, (int, float)) and beta == 0):
                raise Skip("baddbmm with beta != 0 (logits plus a tensor)")
            if isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
                f = float(alpha)
            elif _is_scalar_operand(alpha):
                runtime.append((alpha, "mul"))
            else:
                raise Skip("baddbmm alpha not understood")
        else:
            a, b = c.args
        q, f = _strip_scalars(a, f, runtime)
        bt, f = _strip_scalars(b, f, runtime)
        bt = _peel_same_dtype_casts(bt)
        inner = _lead_view_input(bt)  # GPT-2's key.transpose(-1, -2).reshape(-1, dk, T)
        if inner is not None:
            bt = _peel_same_dtype_casts(inner)
        cb = canon(bt) if isinstance(bt, fx.Node) else None
        kperm = _key_permutation(cb) if inner is None else None
        if kperm is not None:  # keys laid out [B, T, H, D] and permuted to [B, H, D, T] (OpenAI-GPT)
            k, f = _strip_scalars(cb.args[0], f, runtime)
            return q, _Perm.of(k, kperm), f, runtime
        if cb is None or cb.op not in ("transpose", "permute") or not _is_last_two_transpose(cb, cb.args[0]):
            raise Skip("matmul operand is not k transposed (not attention logits)")
        k, f = _strip_scalars(cb.args[0], f, runtime)
        if inner is not None:  # k was merged after the transpose: the 3-D keys are a view of it
            kt = tensor_meta(k)
            if kt is None or kt.dim() != 4:
                raise Skip("keys reshaped after the transpose in a way not understood")
            k = _Flat(k)
        return q, k, f, runtime
    if c.op == "einsum":
        eq, ops = c.args
        if len(ops) != 2 or not isinstance(eq, str):
            raise Skip("einsum form not understood")
        eq = eq.replace(" ", "").replace("...", "@")
        if "->" not in eq or eq.count(",") != 1:
            raise Skip("einsum form not understood")
        lhs, rhs = eq.split("->")
        s0, s1 = lhs.split(",")
        if not (len(s0) >= 2 and len(s1) >= 2 and s0[:-2] == s1[:-2] == rhs[:-2]):
            # explicit 4-D subscripts in any order ('bqhd,bkhd->bhqk'): q and k are permutations
            # of [B, H, L, D] / [B, H, T, D], read through a permute emitted at the rewrite
            if not (len(s0) == len(s1) == len(rhs) == 4 and "@" not in eq and len(set(rhs)) == 4):
                raise Skip("einsum form not understood")
            b_, h_, i, j = rhs
            ds = set(s0) - set(rhs)
            if len(ds) != 1 or set(s0) != {b_, h_, i} | ds or set(s1) != {b_, h_, j} | ds:
                raise Skip("einsum form not understood")
            d = ds.pop()
            q, f = _strip_scalars(ops[0], 1.0, runtime)
            k, f = _strip_scalars(ops[1], f, runtime)
            return (_Perm.of(q, [s0.index(x) for x in (b_, h_, i, d)]),
                    _Perm.of(k, [s1.index(x) for x in (b_, h_, j, d)]), f, runtime)
        i, d = s0[-2], s0[-1]
        if s1[-1] == d:
            j = s1[-2]
            transposed = False
        elif s1[-2] == d:
            j = s1[-1]
            transposed = True
        else:
            raise Skip("einsum form not understood")
        if rhs[-2:] != i + j or len({i, j, d}) != 3:
            raise Skip("einsum form not understood")
        q, f = _strip_scalars(ops[0], 1.0, runtime)
        k, f = _strip_scalars(ops[1], f, runtime)
        if transposed:  # keys given as [.., D, T]: read through a permute of the last two dims
            n = len(s1)
            if "@" in eq or n != 4:
                raise Skip("einsum with k already transposed")
            k = _Perm(k, [0, 1, 3, 2])
        return q, k, f, runtime
    raise Skip("not attention logits")


class _Perm:
    """An operand read as ``node.permute(perm)`` (emitted with the rewrite)."""

    def __init__(self, node, perm):
        self.node, self.perm = node, tuple(perm)

    @staticmethod
    def of(node, perm):
        return node if list(perm) == list(range(len(perm))) else _Perm(node, perm)


def _key_permutation(cb) -> Optional[List[int]]:
    """For a 4-D permute that is not a plain swap of the last two dims but still puts the head dim
    second to last ([B, T, H, D].permute(0, 2, 3, 1) = [B, H, D, T]): the permutation that gives
    the keys as [B, H, T, D] from its input."""
    if cb is None or cb.op != "permute":
        return None
    t = tensor_meta(cb.args[0])
    if t is None or t.dim() != 4:
        return None
    p = [(d + 4) % 4 for d in cb.args[1]]
    if sorted(p) != [0, 1, 2, 3] or p == [0, 1, 3, 2]:
        return None
    kp = p[:2] + [p[3], p[2]]
    return kp if kp != [0, 1, 2, 3] else None


class _Flat:
    """Keys known only as a 4-D [B, H, T, D] tensor whose [B*H, T, D] view the logits read."""

    def __init__(self, node):
        self.node = node


def _peel_same_dtype_casts(node):
    """See through casts that keep the dtype (``.float()`` of a float32 tensor)."""
    while isinstance(node, fx.Node):
        c = canon(node)
        if c is None or c.op != "to":
            return node
        ti, to = tensor_meta(c.args[0]), tensor_meta(node)
        if ti is None or to is None or ti.dtype != to.dtype or list(ti.shape) != list(to.shape):
            return node
        node = c.args[0]
    return node


def _parse_mha(node: fx.Node, c, ev: MaskEvaluator) -> Site:
    """F.multi_head_attention_forward (what nn.MultiheadAttention calls), self-attention only."""
    a = c.args[0]
    users = list(node.users)
    outs = [u for u in users if canon(u) is not None and canon(u).op == "getitem" and canon(u).args[1] == 0]
    weights = [u for u in users if u not in outs]
    if len(outs) != 1:
        raise Skip("MultiheadAttention output not used through [0]")
    if any(len(w.users) for w in weights):
        raise Skip("attention probabilities used elsewhere (MultiheadAttention weights)")
    x = a["query"]
    if not (a["key"] is x and a["value"] is x):
        raise Skip("MultiheadAttention with distinct query/key/value (cross-attention)")
    if a["bias_k"] is not None or a["bias_v"] is not None or a["add_zero_attn"]:
        raise Skip("MultiheadAttention with bias_k/bias_v/add_zero_attn")
    if a["static_k"] is not None or a["static_v"] is not None:
        raise Skip("MultiheadAttention with static_k/static_v")
    if a["dropout_p"] not in (0, 0.0) and a["training"] is not False:
        raise Skip("attention dropout p > 0 in training mode")
    xt = tensor_meta(x)
    E, H = a["embed_dim_to_check"], a["num_heads"]
    if xt is None or xt.dim() != 3 or not isinstance(E, int) or not isinstance(H, int) or E % H:
        raise Skip("MultiheadAttention input not [L, B, E]")
    Dh = E // H
    s = Site(outs[0], "mha")
    s.scale = 1.0 / math.sqrt(Dh)
    kpm = a["key_padding_mask"]
    mask = a["attn_mask"]
    if a["is_causal"] is True and kpm is None and not a["need_weights"]:
        s.causal_flag = True  # torch itself then ignores attn_mask and runs causal SDPA
    elif mask is not None:
        mt = tensor_meta(mask)
        if mt is None or mt.dim() != 2:
            raise Skip("MultiheadAttention attn_mask is not 2-D [L, S]")
        s.terms.append((mask, "drop" if mt.dtype == torch.bool else "add", None))
    kpm_atom = None
    if kpm is not None:
        kt = tensor_meta(kpm)
        if kt is None or kt.dim() != 2:
            raise Skip("MultiheadAttention key_padding_mask is not a [B, S] tensor")
        if kt.dtype != torch.bool:
            # nn.MultiheadAttention hands it on as a float mask (F._canonical_mask: 0 / -inf):
            # followed back to the runtime [B, S] factor it was built from
            from .maskproof import constraints_of as _cons
            cons, err = _cons(ev.eval(kpm), "add")
            ats = list(cons or ())
            at = ats[0] if len(ats) == 1 else None
            at_t = tensor_meta(at[1]) if at is not None and at[0] == "opq" else None
            if at_t is None or at_t.dim() != 2 or not all(sym_eq(sym(a), sym(b)) for a, b in zip(at_t.shape, kt.shape)) \
                    or at[3] == "unknown":
                raise Skip("MultiheadAttention float key_padding_mask is not a 0/-inf mask of a runtime "
                           f"[B, S] factor ({err or 'not followed'})")
            kpm_atom = at

    def pre(em):
        L, B = _size(em, x, 0), _size(em, x, 1)
        if a["use_separate_proj_weight"]:
            ws = (a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"])
            b = a["in_proj_bias"]
            parts = []
            for i, w in enumerate(ws):
                bi = None if b is None else em.call(aten.slice.Tensor, (b, 0, i * E, (i + 1) * E))
                parts.append(em.call(aten.linear.default, (x, w, bi)))
        else:
            qkv = em.call(aten.linear.default, (x, a["in_proj_weight"], a["in_proj_bias"]))
            parts = [em.call(aten.slice.Tensor, (qkv, 2, i * E, (i + 1) * E)) for i in range(3)]
        heads = []
        for p in parts:
            p = em.call(aten.reshape.default, (p, [L, B, H, Dh]))
            heads.append(em.call(aten.permute.default, (p, [1, 2, 0, 3])))
        s.q, s.k, s.v = heads
        if kpm_atom is not None:  # key present where the atom holds
            node, mode = kpm_atom[1], kpm_atom[3]
            if not isinstance(mode, str):
                s.kpm_node = em.call(aten.eq.Scalar if mode[0] == "eq" else aten.ne.Scalar, (node, mode[1]))
            elif tensor_meta(node).dtype == torch.bool:
                s.kpm_node = node if mode == "truthy" else em.call(aten.logical_not.default, (node,))
            else:
                s.kpm_node = em.call(aten.ne.Scalar if mode == "truthy" else aten.eq.Scalar, (node, 0))
        elif kpm is not None:
            s.kpm_node = em.call(aten.logical_not.default, (kpm,))

    def post(em, out):
        L, B = _size(em, x, 0), _size(em, x, 1)
        o = em.call(aten.permute.default, (out, [2, 0, 1, 3]))
        o = em.call(aten.reshape.default, (o, [L, B, E]))
        return em.call(aten.linear.default, (o, a["out_proj_weight"], a["out_proj_bias"]))

    s.pre_emit, s.post_emit = pre, post
    import types
    s.q_meta = types.SimpleNamespace(shape=(xt.shape[1], H, xt.shape[0], Dh), dtype=xt.dtype,
                                     device=xt.device)
    s.mha_shapes = (xt, H, Dh)
    return s


class _Post:
    """What happens to a mask's fill value between the mask and the softmax: `chain` lists the
    steps from the softmax inwards: ("scale", constant), ("rt", runtime scalar node, "mul"/"div"),
    ("floor", c) (a max() with a constant). Added constants and other additive masks shift masked
    and kept logits alike, which the softmax ignores (an additive mask's kept value is its largest
    one). `space`: the logits node the mask is applied to (its shape is the mask's index space)."""

    __slots__ = ("chain", "fill", "space")

    def __init__(self, chain: tuple = (), fill: Any = None, space: Any = None):
        self.chain, self.fill, self.space = chain, fill, space

    def times(self, y, op) -> "_Post":
        if isinstance(y, (int, float)):
            step = ("scale", float(y) if op == "mul" else 1.0 / y)
        else:
            step = ("rt", y, op)
        return _Post(self.chain + (step,), self.fill, self.space)

    def floor(self, c: float) -> "_Post":
        return _Post(self.chain + (("floor", c),), self.fill, self.space)

    def at(self, fill, space) -> "_Post":
        return _Post(self.chain, fill, space)


def _fake_like(em: "_Emitter", n: fx.Node, val) -> fx.Node:
    """Give an emitted node of a dynamo graph an example value (later size reads need it)."""
    if val is not None and "val" not in n.meta and "example_value" not in n.meta:
        n.meta["example_value"] = val
    return n


def _parse_encoder_layer(node: fx.Node, c) -> Site:
    """``torch._transformer_encoder_layer_fwd`` (nn.TransformerEncoderLayer's fast path in eval
    mode): the whole layer is emitted again around the rewritten attention (layer norms, residuals,
    feed-forward), batch-first [B, L, E]."""
    a = c.args[0]
    x = a["src"]
    xt = tensor_meta(x)
    E, H = a["embed_dim"], a["num_heads"]
    if xt is None or xt.dim() != 3 or not isinstance(E, int) or not isinstance(H, int) or E % H:
        raise Skip("TransformerEncoderLayer input not [B, L, E]")
    if not isinstance(a["use_gelu"], bool) or not isinstance(a["norm_first"], bool) \
            or not _is_scalar_operand(a["eps"]):  # eps: a float, or a SymFloat under dynamic=True
        raise Skip("TransformerEncoderLayer fast path with non-constant settings")
    Dh = E // H
    s = Site(node, "encoder-layer")
    s.scale = 1.0 / math.sqrt(Dh)
    s.batch_first = True
    s.logits_ndim = 4
    mask, mtype = a["mask"], a["mask_type"]
    if mask is not None:
        mt = tensor_meta(mask)
        if mt is None or mt.dtype == torch.bool or mtype not in (0, 2) or mt.dim() != (2 if mtype == 0 else 4):
            raise Skip("TransformerEncoderLayer fast-path mask not understood (key padding only, or bool)")
        s.terms.append((mask, "add", None))

    def ln(em, y, w, b):
        return em.call(aten.layer_norm.default, (y, [E], w, b, a["eps"]))

    def pre(em):
        B, L = _size(em, x, 0), _size(em, x, 1)
        y = ln(em, x, a["norm_weight_1"], a["norm_bias_1"]) if a["norm_first"] else x
        qkv = em.call(aten.linear.default, (y, a["qkv_weight"], a["qkv_bias"]))
        heads = []
        hv = xt.new_empty((xt.shape[0], H, xt.shape[1], Dh)) if isinstance(xt, torch.Tensor) else None
        for i in range(3):
            p = em.call(aten.slice.Tensor, (qkv, 2, i * E, (i + 1) * E))
            p = em.call(aten.reshape.default, (p, [B, L, H, Dh]))
            heads.append(_fake_like(em, em.call(aten.permute.default, (p, [0, 2, 1, 3])), hv))
        s.q, s.k, s.v = heads
        s.sa_in = y

    def post(em, out):
        B, L = _size(em, x, 0), _size(em, x, 1)
        o = em.call(aten.permute.default, (out, [0, 2, 1, 3]))
        o = em.call(aten.reshape.default, (o, [B, L, E]))
        sa = em.call(aten.linear.default, (o, a["proj_weight"], a["proj_bias"]))

        def ff(y):
            h = em.call(aten.linear.default, (y, a["ffn_weight_1"], a["ffn_bias_1"]))
            h = em.call(aten.gelu.default if a["use_gelu"] else aten.relu.default, (h,))
            return em.call(aten.linear.default, (h, a["ffn_weight_2"], a["ffn_bias_2"]))

        if a["norm_first"]:
            x1 = em.call(aten.add.Tensor, (x, sa))
            return em.call(aten.add.Tensor, (x1, ff(ln(em, x1, a["norm_weight_2"], a["norm_bias_2"]))))
        x1 = ln(em, em.call(aten.add.Tensor, (x, sa)), a["norm_weight_1"], a["norm_bias_1"])
        return ln(em, em.call(aten.add.Tensor, (x1, ff(x1))), a["norm_weight_2"], a["norm_bias_2"])

    s.pre_emit, s.post_emit = pre, post
    import types
    s.q_meta = types.SimpleNamespace(shape=(xt.shape[0], H, xt.shape[1], Dh), dtype=xt.dtype,
                                     device=xt.device)
    s.mha_shapes = (xt, H, Dh)
    return s


def _parse_logits(node, terms: list, ev: MaskEvaluator, depth=0, post: Optional[_Post] = None):
    """Walk from the softmax input down to q @ k^T, collecting masks and scales. Each mask term is
    recorded as (node, kind, post): `post` says how its fill value reaches the softmax."""
    factor = 1.0
    runtime: list = []
    post = post or _Post()
    cur = node
    for _ in range(64):
        if not isinstance(cur, fx.Node):
            raise Skip("softmax input is not a tensor expression")
        c = canon(cur)
        if c is None:
            raise Skip(f"unsupported op before softmax: {cur.target}")
        op = c.op
        if op in ("matmul", "einsum", "baddbmm"):
            q, k, f, rt = _parse_qk(cur)
            return q, k, factor * f, runtime + rt
        if op == "to":
            cur = c.args[0]
            continue
        if op in ("mul", "div"):
            x, y = c.args
            if op == "mul" and _is_scalar_operand(x) and not _is_scalar_operand(y):
                x, y = y, x
            if not _is_scalar_operand(y) or not isinstance(x, fx.Node):
                if op == "mul":  # w * b with b a 0/1 mask (OpenAI-GPT: w * b + -1e4 * (1 - b))
                    for main, other in ((x, y), (y, x)):
                        if isinstance(main, fx.Node) and isinstance(other, fx.Node) \
                                and _unit_mask(other, ev) and _has_qk_below(main):
                            terms.append((other, "mulkeep", post.at(None, cur)))
                            cur = main
                            break
                    else:
                        raise Skip("logits multiplied by a tensor (position bias / gating)")
                    continue
                raise Skip("logits divided by a tensor (position bias / gating)")
            if isinstance(y, (int, float)):
                factor = factor * y if op == "mul" else factor / y
            else:
                runtime.append((y, op))
            post = post.times(y, op)
            cur = x
            continue
        if op == "view":  # [B*H, L, T] <-> [B, H, L, T]: the query and key dims stay last
            inner = _lead_view_input(cur)
            if inner is None:
                raise Skip("logits viewed to a shape that moves the query/key dims")
            cur = inner
            continue
        if op == "maximum":  # a floor (XGLM's max(w, finfo.min)): it keeps a mask very negative
            x, y = c.args
            for main, other in ((x, y), (y, x)):
                fv = _fill_value(other, ev)
                if isinstance(main, fx.Node) and fv is not None:
                    break
            else:
                raise Skip("max() of logits and a tensor")
            if not fv <= VERY_NEGATIVE:
                raise Skip(f"max() of logits and {fv:g} (a clamp that changes logits)")
            post = post.floor(fv)
            cur = main
            continue
        if op == "masked_fill":
            x, m, val = c.args
            if not _very_neg_value(val, ev):
                raise Skip("masked_fill with a value that does not remove keys")
            terms.append((m, "drop", post.at(_fill_value(val, ev), cur)))
            cur = x
            continue
        if op == "where":
            cond, x, y = c.args
            if _very_neg_value(y, ev):
                terms.append((cond, "keep", post.at(_fill_value(y, ev), cur)))
                cur = x
            elif _very_neg_value(x, ev):
                terms.append((cond, "drop", post.at(_fill_value(x, ev), cur)))
                cur = y
            else:
                raise Skip("where() on logits that is not a mask")
            continue
        if op in ("add", "sub"):
            x, y = c.args
            if op == "sub" and isinstance(y, (int, float)):
                cur = x
                continue
            if op == "add" and isinstance(x, (int, float)):
                x, y = y, x
            if isinstance(y, (int, float)):
                cur = x
                continue
            if op == "sub":
                raise Skip("subtraction of a tensor from logits")
            # which operand carries the logits?
            for main, other in ((x, y), (y, x)):
                sub_terms: list = []
                try:
                    q, k, f, rt = _parse_logits(main, sub_terms, ev, depth + 1, post)
                except Skip:
                    continue
                terms.extend(sub_terms)
                terms.append((other, "add", post.at(None, cur)))
                return q, k, factor * f, runtime + rt
            raise Skip("additive term on logits not understood")
        if op == "tanh":
            raise Skip("logit soft-capping (tanh) before softmax")
        raise Skip(f"unsupported op before softmax: {op}")
    raise Skip("logits expression too deep")


def _fill_value(x, ev: MaskEvaluator) -> Optional[float]:
    """The number a fill argument holds (a python number, or a constant tensor node)."""
    if isinstance(x, fx.Node):
        from .maskproof import Const
        v = ev.eval(x)
        x = v.v if isinstance(v, Const) else None
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    return None


def _positive_scalar(y, ev: MaskEvaluator) -> Optional[bool]:
    """Whether a runtime scalar operand is provably > 0 (a size expression such as sqrt(D), or a
    constant 0-d tensor); None when unknown."""
    v = meta_val(y)
    if isinstance(v, (torch.SymFloat, torch.SymInt)):
        e = v.node.expr
        return True if e.is_positive else None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v > 0
    from .maskproof import Const
    r = ev.eval(y) if isinstance(y, fx.Node) else None
    if isinstance(r, Const) and isinstance(r.v, (int, float)) and not isinstance(r.v, bool):
        return r.v > 0
    return None


def _unit_mask(node, ev: MaskEvaluator) -> bool:
    """A tensor that is 1 where a mask keeps and 0 elsewhere (a float tril buffer, b.float())."""
    from .maskproof import Const, Sel
    v = ev.eval(node)
    if isinstance(v, Const):
        return not isinstance(v.v, bool) and v.v == 1
    return isinstance(v, Sel) and v.a == 1 and v.b == 0 and not isinstance(v.a, bool)


def _depends_on(node, anc, limit=4096) -> bool:
    """Whether `node` is computed from `anc` (or is it)."""
    seen, stack = set(), [node]
    while stack and len(seen) < limit:
        n = stack.pop()
        if n is anc:
            return True
        if not isinstance(n, fx.Node) or n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _check_mulkeep(site: Site, cons, post, removals):
    """Logits multiplied by a 0/1 mask are 0 where it is 0: exact only if a mask applied after the
    product removes every such key (its kept keys all lie where the product keeps), and no -inf
    fill applied before it meets a 0 (NaN)."""
    space = post.space if post is not None else None
    after, before = set(), []
    for rc, rp, fill in removals:
        rs = rp.space if rp is not None else None
        if space is not None and rs is not None and rs is not space and _depends_on(rs, space):
            after |= set(rc)
        elif rc:
            before.append(fill)
    if not set(cons) <= after:
        raise Skip("logits multiplied by a 0/1 mask whose zeros no later mask removes")
    if any(f is None or math.isinf(f) for f in before):
        raise Skip("logits multiplied by a 0/1 mask after a -inf fill (NaN where both apply)")


def _check_space(site: Site, space, cons):
    """A mask applied to the logits in another view than the site's ([B*H, L, T] vs [B, H, L, T])
    shares only the query and key dims with it: a runtime factor along the others cannot be read."""
    st = tensor_meta(space)
    qt = site.q_meta if site.q_meta is not None else tensor_meta(site.q)
    if st is None or qt is None:
        return
    lead = [sym(x) for x in st.shape[:-2]]
    want = [sym(qt.shape[0]), sym(qt.shape[1])] if not site.three_d else [sym(qt.shape[1])]
    while lead and _one(lead[0]):
        lead = lead[1:]
    same = len(lead) <= len(want) and all(_one(a) or sym_eq(a, b) for a, b in zip(lead[::-1], want[::-1]))
    if same:
        return
    for at in cons:
        if at[0] == "opq" and set(at[2]) - {-1}:
            raise Skip(f"runtime mask factor on the logits viewed as {tuple(str(x) for x in st.shape)}, "
                       "not as the attention's [B, H, L, T]")


def _removal_value(val, kind: str, post: _Post) -> Optional[float]:
    """The value a mask term leaves at the keys it removes."""
    if kind != "add":
        return post.fill
    from .maskproof import Sel
    if isinstance(val, Sel):
        for x in (val.b, val.a):
            if isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) <= VERY_NEGATIVE:
                return float(x)
    return None


def _check_fill_reaches_softmax(post: Optional[_Post], fill: Optional[float], ev: MaskEvaluator):
    """A fill value removes keys only if it reaches the softmax still effectively -inf: -inf
    scaled by positive factors, or a finite value that arrives at or below VERY_NEGATIVE (the
    same bound a fill applied last must meet). Raises Skip naming what was not followed."""
    if post is None or not post.chain:
        return
    if fill is None:
        raise Skip("mask fill value is not a known constant, and the logits change after the mask")
    v, total = fill, 1.0
    for step in reversed(post.chain):  # from the mask out to the softmax
        if step[0] == "scale":
            f = step[1]
            v, total = v * f, total * f  # a negative factor may be undone by a later one
        elif step[0] == "rt":
            y = step[1]
            name = getattr(y, "name", y)
            if _positive_scalar(y, ev) is not True:
                raise Skip(f"mask fill value {fill:g} is scaled after the mask by a runtime scalar "
                           f"({name}) whose sign is not known")
            if not (math.isinf(v) and v < 0):
                raise Skip(f"mask fill value {fill:g} is scaled after the mask by a runtime scalar "
                           f"({name}): the masked logits are not provably still effectively -inf at "
                           "the softmax")
        else:  # floor
            v = max(v, step[1])
    if not v <= VERY_NEGATIVE:  # (NaN too: -inf times 0)
        raise Skip(f"mask fill value {fill:g} reaches the softmax as {v:g} (scaled by {total:g} after "
                   "the mask): it does not remove the masked keys")


def _lead_view_input(node) -> Optional[fx.Node]:
    """For a view that only splits or merges leading dims (the last two unchanged): its input."""
    c = canon(node) if isinstance(node, fx.Node) else None
    if c is None or c.op != "view":
        return None
    ti, to = tensor_meta(c.args[0]), tensor_meta(node)
    if ti is None or to is None or ti.dim() < 2 or to.dim() < 2:
        return None
    si, so = [sym(x) for x in ti.shape], [sym(x) for x in to.shape]
    if not (sym_eq(si[-1], so[-1]) and sym_eq(si[-2], so[-2])):
        return None
    if not sym_eq(sympy.Mul(*si[:-2]), sympy.Mul(*so[:-2])):
        return None
    return c.args[0]


def _unflatten(node) -> Optional[fx.Node]:
    """A 3-D [B*H, L, D] operand reshaped from a 4-D [B, H, L, D] tensor: that tensor."""
    t = tensor_meta(node)
    if t is None or t.dim() != 3:
        return None
    n = _peel_same_dtype_casts(_strip_trivial(node))
    inner = _lead_view_input(n)
    ti = tensor_meta(inner) if inner is not None else None
    if ti is None or ti.dim() != 4:
        return None
    return inner


def _parse_softmax(node: fx.Node, c, ev: MaskEvaluator) -> Optional[Site]:
    x, dim = c.args
    t = tensor_meta(x)
    if t is None or dim not in (-1, t.dim() - 1) or t.dim() < 3:
        return None
    # is it attention at all? find q @ k^T under the softmax
    terms: list = []
    try:
        q, k, factor, runtime = _parse_logits(x, terms, ev)
    except Skip as e:
        # only report it as a site when a q @ k^T is underneath somewhere
        if _has_qk_below(x):
            s = Site(node, "matmul-softmax")
            s.q = None
            raise Skip(str(e)) from None
        return None
    # forward: probs -> (cast, inactive dropout)* -> probs @ v
    out_perm = [0, 1, 2, 3]
    cur = node
    walk = node  # walks past the expand/view/bmm of a decomposed (AOTAutograd) matmul
    for _ in range(16):
        users = list(walk.users)
        if len(users) != 1:
            raise Skip("attention probabilities used elsewhere (e.g. returned weights)")
        u = users[0]
        cu = canon(u)
        if cu is None:
            raise Skip("attention probabilities feed an unsupported op")
        if cu.op in ("expand", "view") or (cu.op == "matmul" and u.target is aten.bmm.default
                                           and cu.args[0] is not cur):
            walk = u  # part of AOTAutograd's view(bmm(view(expand(probs)), ...))
            continue
        walk = u
        if cu.op == "to":
            cur = u
            continue
        if cu.op == "dropout":
            p, train = cu.args[1], cu.args[2]
            if train is False or p == 0:
                cur = u
                continue
            raise Skip("attention dropout p > 0 in training mode")
        if cu.op == "matmul" and cu.args[0] is cur:
            form = "matmul-softmax"
            v = cu.args[1]
            out = u
            break
        if cu.op == "einsum" and len(cu.args[1]) == 2 and cu.args[1][0] is cur:
            eq = cu.args[0].replace(" ", "").replace("...", "@")
            lhs, rhs = eq.split("->")
            s0, s1 = lhs.split(",")
            v = cu.args[1][1]
            if not (s0[:-2] == s1[:-2] == rhs[:-2] and s1[-2] == s0[-1] and rhs[-2] == s0[-2]
                    and rhs[-1] == s1[-1]):
                # explicit 4-D subscripts in another order ('bhqk,bkhd->bqhd'): v read permuted to
                # [B, H, T, D], the [B, H, L, D] result permuted to the einsum's output order
                e = set(s1) - set(s0)
                if not (len(s0) == len(s1) == len(rhs) == 4 and "@" not in eq and len(set(s0)) == 4
                        and len(e) == 1 and set(s1) == {s0[0], s0[1], s0[3]} | e
                        and set(rhs) == {s0[0], s0[1], s0[2]} | e):
                    raise Skip("einsum form of probs @ v not understood")
                e = e.pop()
                res = (s0[0], s0[1], s0[2], e)
                v = _Perm.of(v, [s1.index(x) for x in (s0[0], s0[1], s0[3], e)])
                out_perm = [res.index(x) for x in rhs]
            form = "einsum-softmax"
            out = u
            break
        raise Skip("attention probabilities feed an unsupported op")
    else:
        raise Skip("probability chain too long")
    s = Site(out, form)
    if out_perm != [0, 1, 2, 3]:
        s.out_perm = out_perm
    for name, x in (("q", q), ("k", k), ("v", v)):
        if isinstance(x, _Perm):
            s.perm[name] = x.perm
    q, k, v = (x.node if isinstance(x, _Perm) else x for x in (q, k, v))
    if not s.perm:
        q, k, v = _layout_4d(q, k, v, out, terms, s)
    s.q = q
    kb, gk = _unrepeat(k) if not s.perm else (k, 1)
    vb, gv = _unrepeat(v) if not s.perm else (v, 1)
    if gk == gv:
        s.k, s.v, s.group = kb, vb, gk
    else:
        s.k, s.v, s.group = k, v, 1
    s.factor = factor
    s.scale = 1.0  # the logits are exactly factor * q.k
    s.runtime = runtime
    s.terms = terms
    return s


def _layout_4d(q, k, v, out, terms, s: Site):
    """[B*H, L, D] attention whose operands are views of [B, H, L, D] tensors is read as 4-D
    attention on those tensors when that is needed: keys merged after their transpose (GPT-2's
    baddbmm), operands of mixed rank, or masks applied to the logits viewed as [B, H, L, T]
    (XGLM), whose runtime padding can then be carried. A 3-D output is viewed back."""
    nd = lambda x: tensor_meta(x).dim() if tensor_meta(x) is not None else None  # noqa: E731
    flat_k = isinstance(k, _Flat)
    spaces4 = any(p is not None and p.space is not None and nd(p.space) == 4 for _, _, p in terms)
    if not (flat_k or len({nd(q), nd(v), nd(k) if not flat_k else 3}) > 1 or spaces4) \
            or (not flat_k and nd(q) == nd(k) == nd(v) == 4):
        return q, k, v
    q4 = q if nd(q) == 4 else _unflatten(q)
    k4 = k.node if flat_k else (k if nd(k) == 4 else _unflatten(k))
    v4 = v if nd(v) == 4 else _unflatten(v)
    if q4 is None or k4 is None or v4 is None:
        if flat_k or len({nd(q), nd(v), nd(k) if not flat_k else 3}) > 1:
            raise Skip("[B*H, L, D] attention whose q/k/v are not all views of [B, H, L, D] tensors")
        return q, k, v  # plain 3-D attention (run as B*H heads)
    qt, kt = tensor_meta(q4), tensor_meta(k4)
    if not (sym_eq(sym(qt.shape[1]), sym(kt.shape[1])) and sym_eq(sym(qt.shape[0]), sym(kt.shape[0]))):
        raise Skip("[B*H, L, D] attention over q/k views with different head counts")
    ot = tensor_meta(out)
    if ot is not None and ot.dim() == 3:
        s.flat_out = True
    return q4, k4, v4


def _has_qk_below(x, depth=0) -> bool:
    if depth > 12 or not isinstance(x, fx.Node):
        return False
    c = canon(x)
    if c is None:
        return False
    if c.op in ("matmul", "einsum", "baddbmm"):
        try:
            _parse_qk(x)
            return True
        except Skip:
            return False
    return any(_has_qk_below(a, depth + 1) for a in c.args if isinstance(a, fx.Node))
