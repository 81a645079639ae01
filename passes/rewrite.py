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

import logging
import math
import re
import time
from typing import Any, Dict, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from slcompile.kernels import lowering
from slcompile.kernels.config import SuperlinearConfig

from .canon import canon, decode_getitem, meta_val, remove_canon_cache, tensor_meta
from .maskproof import (Aff, CausalProof, MaskEvaluator, constraints_of, prove_causal, runtime_symbols,
                        static_int, sym, sym_eq, VERY_NEGATIVE)
from .report import RewriteReport, SiteReport

log = logging.getLogger("slcompile.passes")
aten = torch.ops.aten


class Skip(Exception):
    """A site that is left alone; the message is the recorded reason."""


# --------------------------------------------------------------------------------------------
# small readers
# --------------------------------------------------------------------------------------------

def _shape_str(t: Optional[torch.Tensor]) -> Tuple[str, ...]:
    if t is None:
        return ()
    return tuple(str(s) for s in t.shape)


def _module_path(node: fx.Node) -> Tuple[str, str]:
    st = node.meta.get("nn_module_stack") or {}
    if not st:
        return "", ""
    path, typ = list(st.values())[-1]
    tname = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    path = re.sub(r"^L\['[^']*'\]\.?", "", str(path))
    return path, tname


def _module_types(node: fx.Node) -> List[str]:
    st = node.meta.get("nn_module_stack") or {}
    out = []
    for _, typ in st.values():
        out.append(typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ)))
    return out


def _source(node: fx.Node) -> str:
    tr = node.meta.get("stack_trace") or ""
    found = re.findall(r'File "([^"]+)", line (\d+)', tr)
    if not found:
        return ""
    f, line = found[-1]
    return f"{f}:{line}"


def _is_scalar_operand(x) -> bool:
    """A python number, a SymFloat/SymInt node, or a 0-d tensor node."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if isinstance(x, fx.Node):
        v = meta_val(x)
        if isinstance(v, (torch.SymFloat, torch.SymInt, float, int)) and not isinstance(v, bool):
            return True
        if isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype.is_floating_point:
            return True
    return False


def _strip_scalars(node, factor: float, runtime: list):
    """Walk down mul/div by scalars; returns the tensor underneath."""
    while isinstance(node, fx.Node):
        c = canon(node)
        if c is None or c.op not in ("mul", "div"):
            break
        x, y = c.args
        if c.op == "mul" and _is_scalar_operand(x) and not _is_scalar_operand(y):
            x, y = y, x
        if not _is_scalar_operand(y) or _is_scalar_operand(x) or not isinstance(x, fx.Node):
            break
        if isinstance(y, (int, float)):
            factor = factor * y if c.op == "mul" else factor / y
        else:
            runtime.append((y, c.op))
        node = x
    return node, factor


def _trivial_slice(c, node_in) -> bool:
    if c.op != "slice":
        return False
    t = tensor_meta(node_in)
    start, end, step = c.args[2], c.args[3], c.args[4]
    if not (start in (0, None) and step in (1, None)):
        return False
    if end is None or (isinstance(end, int) and end >= 2 ** 62):
        return True
    if t is not None:
        d = c.args[1]
        return sym_eq(sym(end), sym(t.shape[d]))
    return False


def _strip_trivial(node):
    while isinstance(node, fx.Node):
        c = canon(node)
        if c is None:
            return node
        if c.op == "to" and c.args[1] is None:
            node = c.args[0]
            continue
        if _trivial_slice(c, c.args[0]):
            node = c.args[0]
            continue
        if c.op == "getitem":
            t = tensor_meta(c.args[0])
            steps = decode_getitem(t.dim(), c.args[1]) if t is not None else None
            if steps == []:
                node = c.args[0]
                continue
        return node
    return node


def _unrepeat(node) -> Tuple[Any, int]:
    """See through repeat_kv / repeat_interleave on the head dim: (un-repeated node, group)."""
    out = tensor_meta(node)
    if out is None or out.dim() != 4:
        return node, 1
    n = _strip_trivial(node)
    c = canon(n)
    if c is None:
        return node, 1
    if c.op == "repeat_interleave":
        x, reps, dim = c.args
        base = tensor_meta(x)
        if isinstance(reps, int) and dim in (1, -3) and base is not None and base.dim() == 4:
            return x, reps
        return node, 1
    if c.op == "view":
        e = _strip_trivial(c.args[0])
        ce = canon(e)
        if ce is None or ce.op != "expand":
            return node, 1
        te = tensor_meta(e)
        u = _strip_trivial(ce.args[0])
        cu = canon(u)
        base = None
        if cu is not None and cu.op == "unsqueeze" and cu.args[1] in (2, -3):
            base = cu.args[0]
        elif cu is not None and cu.op == "getitem":
            tb = tensor_meta(cu.args[0])
            steps = decode_getitem(tb.dim(), cu.args[1]) if tb is not None else None
            if steps == [("unsqueeze", 2)]:
                base = cu.args[0]
        if base is None or te is None or te.dim() != 5:
            return node, 1
        base = _strip_trivial(base)
        tb = tensor_meta(base)
        if tb is None or tb.dim() != 4:
            return node, 1
        g = static_int(sym(te.shape[2]))
        if g is None:
            return node, 1
        # shapes: base [B, Hkv, T, D] -> [B, Hkv, g, T, D] -> [B, Hkv*g, T, D]
        if not (sym_eq(sym(out.shape[1]), sym(tb.shape[1]) * g) and sym_eq(sym(te.shape[1]), sym(tb.shape[1]))
                and sym_eq(sym(out.shape[2]), sym(tb.shape[2]))):
            return node, 1
        return base, g
    return node, 1


def _is_last_two_transpose(c, x) -> bool:
    t = tensor_meta(x)
    if t is None:
        return False
    n = t.dim()
    if c.op == "transpose":
        return {(c.args[1] + n) % n, (c.args[2] + n) % n} == {n - 2, n - 1}
    if c.op == "permute":
        p = [(d + n) % n for d in c.args[1]]
        return p == list(range(n - 2)) + [n - 1, n - 2]
    return False


def _very_neg_value(x, ev: MaskEvaluator) -> bool:
    if isinstance(x, fx.Node):  # e.g. torch.tensor(-inf), torch.finfo(dtype).min tensors
        from .maskproof import Const
        v = ev.eval(x)
        x = v.v if isinstance(v, Const) else None
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) <= VERY_NEGATIVE


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


# --------------------------------------------------------------------------------------------
# emission
# --------------------------------------------------------------------------------------------

def _fake_mode_of(*vals):
    from torch._guards import detect_fake_mode
    try:
        return detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    except Exception:  # noqa: BLE001
        return None


class _Emitter:
    def __init__(self, graph: fx.Graph, anchor: fx.Node, meta_key: Optional[str]):
        self.g = graph
        self.anchor = anchor
        self.meta_key = meta_key  # "val" for ATen graphs; None: leave meta to the next tracer
        self.fake_mode = None

    def call(self, target, args, kwargs=None):
        with self.g.inserting_before(self.anchor):
            n = self.g.call_function(target, tuple(args), kwargs or {})
        for k in ("nn_module_stack", "stack_trace", "source_fn_stack", "seq_nr", "from_node"):
            if k in self.anchor.meta:
                n.meta[k] = self.anchor.meta[k]
        if self.meta_key is not None:
            self._meta(n, target, args, kwargs or {})
        return n

    def _meta(self, n, target, args, kwargs):
        key = self.meta_key
        def mv(a):
            if isinstance(a, fx.Node):
                return meta_val(a)
            if isinstance(a, (list, tuple)):
                return type(a)(mv(x) for x in a)
            return a
        try:
            vals = [mv(a) for a in args]
            if self.fake_mode is None:
                self.fake_mode = _fake_mode_of(*[v for v in vals if isinstance(v, torch.Tensor)])
            if self.fake_mode is None:
                return
            with self.fake_mode:
                n.meta[key] = target(*vals, **{k: mv(v) for k, v in kwargs.items()})
        except Exception as e:  # noqa: BLE001 - meta is a convenience for exported graphs
            log.debug("no example value for %s: %r", n, e)


def _size(em: _Emitter, node, dim):
    t = tensor_meta(node)
    s = t.shape[dim]
    if isinstance(s, int):
        return s
    return em.call(aten.sym_size.int, (node, dim))


def _one(e) -> bool:
    return e is not None and e == 1


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
