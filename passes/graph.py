"""Graph utilities of the rewrite pass: small readers of FX nodes (scalars, transposes, repeated
K/V, module paths and sources) and `_Emitter`, which adds nodes before a site's output."""

from __future__ import annotations

import logging
import re
from typing import Any, List, Optional, Tuple

import torch
import torch.fx as fx


from .canon import canon, decode_getitem, meta_val, tensor_meta
from .maskproof import MaskEvaluator, static_int, sym, sym_eq, VERY_NEGATIVE

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
