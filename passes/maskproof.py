"""Proving that an attention mask is causal, from the graph.

An abstract interpreter evaluates the subgraph that builds a mask (or additive bias) and describes
every tensor by what its elements are as a function of their index, with dimensions counted from
the right (-1 = key position j, -2 = query position i, -3 = head, -4 = batch once broadcast to the
attention logits):

* `Aff`: an integer tensor whose element is ``const + sum(coef[d] * idx[d])`` (aranges and what is
  derived from them by adds, offsets, views, slices); ``const`` is a sympy expression of the sizes.
* `Sel`: a tensor equal to ``a`` where every atom of ``atoms`` holds and ``b`` elsewhere. An atom is
  a linear inequality over index dims (``("lin", coef, const)``: ``sum(coef*idx) + const <= 0``) or
  a runtime boolean factor (``("opq", node, support, mode)``: the value of a graph node, varying
  only along ``support``).
* `Const`: one value everywhere.
* `Opq`: runtime values of unknown content that vary at most along ``support``.

Constant buffers (GPT-2's ``tril``) are read concretely and recognised as triangular patterns;
runtime tensors only ever become opaque atoms, so a mask is "proven causal" only when its position
structure comes from shapes, constants and buffers; runtime data can only remove keys per batch
(padding), which the rewrite carries into ``key_padding_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Tuple

import sympy
import torch
import torch.fx as fx

from .canon import COp, canon, decode_getitem, meta_val, tensor_meta

VERY_NEGATIVE = -1e4
RUNTIME_PREFIX = "rt_"  # names of the symbols that stand for runtime integer scalars


def runtime_symbols(e) -> set:
    """The runtime-scalar symbols in a sympy expression (see MaskEvaluator.runtime)."""
    if e is None or not hasattr(e, "free_symbols"):
        return set()
    return {s for s in e.free_symbols if s.name.startswith(RUNTIME_PREFIX)}


# --------------------------------------------------------------------------------------------
# symbolic helpers (never call bool() on a SymInt: that would add guards)
# --------------------------------------------------------------------------------------------

def sym(x: Any) -> Optional[sympy.Expr]:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, torch.SymInt):
        return x.node.expr
    if isinstance(x, fx.Node):
        v = meta_val(x)
        if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
            return sym(v)
    return None


def sym_eq(a: Optional[sympy.Expr], b: Optional[sympy.Expr]) -> bool:
    if a is None or b is None:
        return False
    if a == b:
        return True
    d = sympy.expand(a - b)
    if d == 0:
        return True
    if d.is_Number or not d.free_symbols:
        return False
    try:
        return sympy.simplify(d) == 0
    except Exception:  # noqa: BLE001
        return False


def static_int(e: Optional[sympy.Expr]) -> Optional[int]:
    if e is not None and e.is_Integer:
        return int(e)
    return None


def shape_syms(t: torch.Tensor) -> List[Optional[sympy.Expr]]:
    return [sym(s) for s in t.shape]


def _is_one(e) -> bool:
    return e is not None and e == 1


# --------------------------------------------------------------------------------------------
# abstract values
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Const:
    v: Any


@dataclass(frozen=True)
class Aff:
    coef: Tuple[Tuple[int, int], ...]  # (dim from the right, coefficient), sorted, nonzero
    const: Any  # sympy expr


@dataclass(frozen=True)
class Sel:
    atoms: FrozenSet[tuple]
    a: Any
    b: Any


@dataclass(frozen=True)
class Opq:
    support: FrozenSet[int]


def _coef(d: Dict[int, int]) -> Tuple[Tuple[int, int], ...]:
    return tuple(sorted((k, v) for k, v in d.items() if v != 0))


def lin_atom(coef: Dict[int, int], const) -> tuple:
    return ("lin", _coef(coef), sympy.sympify(const))


def _mk_sel(atoms, a, b):
    if not atoms or a == b and type(a) is type(b):
        return Const(a) if not atoms else Const(a)
    return Sel(frozenset(atoms), a, b)


def _support(v) -> FrozenSet[int]:
    if isinstance(v, Const):
        return frozenset()
    if isinstance(v, Aff):
        return frozenset(d for d, _ in v.coef)
    if isinstance(v, Opq):
        return v.support
    if isinstance(v, Sel):
        s = set()
        for at in v.atoms:
            s |= set(d for d, _ in at[1]) if at[0] == "lin" else set(at[2])
        return frozenset(s)
    return frozenset()


def _cast(v, dtype):
    if dtype is None:
        return v
    if dtype == torch.bool:
        return bool(v)
    if dtype.is_floating_point:
        return float(v)
    return int(v)


# dimension bookkeeping --------------------------------------------------------------------

def _remap(v, fn, subst=None, aligned=False):
    """Apply an index map: fn(d) -> new d (or None: dim removed, index fixed at subst[d]).
    subst: {d: (scale, offset)} meaning idx_old = offset + scale * idx_new (before fn)."""
    subst = subst or {}

    def map_lin(coef, const):
        nc = {}
        for d, c in coef:
            sc, off = subst.get(d, (1, 0))
            const = const + c * off
            c = c * sc
            nd = fn(d)
            if nd is None:
                continue
            nc[nd] = nc.get(nd, 0) + c
        return nc, const

    if isinstance(v, Const):
        return v
    if isinstance(v, Aff):
        nc, const = map_lin(v.coef, v.const)
        return Aff(_coef(nc), sympy.sympify(const))
    if isinstance(v, Opq):
        return Opq(frozenset(fn(d) for d in v.support if fn(d) is not None))
    if isinstance(v, Sel):
        atoms = set()
        for at in v.atoms:
            if at[0] == "lin":
                nc, const = map_lin(at[1], at[2])
                atoms.add(lin_atom(nc, const))
            else:
                if not aligned:
                    return None
                atoms.add(at)
        return _mk_sel(atoms, v.a, v.b)
    return None


def _opq_only(v) -> bool:
    return isinstance(v, Sel) and all(at[0] == "opq" for at in v.atoms)


# --------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------

class MaskEvaluator:
    """Evaluates mask subgraphs abstractly; memoised per node. `constants` maps nodes to the real
    tensors of buffers (their contents are read, as for any module constant)."""

    def __init__(self, constants: Optional[Dict[fx.Node, torch.Tensor]] = None):
        self.constants = constants or {}
        self.memo: Dict[fx.Node, Any] = {}
        self._pattern_cache: Dict[int, Any] = {}
        # symbols standing for runtime integer scalars (a static cache's fill level): symbol -> node
        self.runtime: Dict[sympy.Symbol, fx.Node] = {}
        self.unfollowed: List[fx.Node] = []  # ops on position structure the evaluator cannot read

    # -- entry ------------------------------------------------------------------------------
    def eval(self, x):
        if isinstance(x, fx.Node):
            if x in self.memo:
                return self.memo[x]
            try:
                r = self._eval_node(x)
            except Exception:  # noqa: BLE001 - anything unreadable is opaque
                r = self._fallback(x)
            self.memo[x] = r
            return r
        if isinstance(x, (bool, int, float)):
            return Const(x)
        if isinstance(x, torch.SymInt):
            return Aff((), sym(x))
        return None

    def not_followed(self, root: fx.Node) -> str:
        """The ops under `root` that the evaluator met on position structure and could not read,
        as text for a reason (empty when none)."""
        seen, stack, names = set(), [root], []
        while stack:
            n = stack.pop()
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            stack.extend(n.all_input_nodes)
        for n in self.unfollowed:
            if n in seen:
                t = n.target
                nm = t if isinstance(t, str) else getattr(t, "__name__", str(t))
                if t is getattr and len(n.args) > 1:
                    nm = f"getattr .{n.args[1]}"
                nm = f"{nm} ({n.name})"
                if nm not in names:
                    names.append(nm)
        return ", ".join(names)

    # -- helpers ----------------------------------------------------------------------------
    def _fallback(self, node: fx.Node, structured: bool = False):
        """Opaque. `structured`: an op on position structure the evaluator cannot follow
        (recorded so the proof says 'unsupported' rather than 'runtime data')."""
        t = tensor_meta(node)
        if t is None:
            e = sym(node)
            if e is not None:
                return Aff((), e)
            return None
        n = t.dim()
        sup = frozenset(d - n for d in range(n) if not _is_one(sym(t.shape[d])))
        if structured and any(isinstance(v, (Sel, Aff)) and not _opq_only(v)
                              for v in (self.memo.get(a) for a in node.all_input_nodes)):
            self.unfollowed.append(node)
            return None
        if not sup and not t.dtype.is_floating_point and t.dtype != torch.bool and not t.is_complex():
            # one runtime integer (e.g. StaticCache's fill level, the first query's position): a
            # symbol, so that positions offset by it stay affine and a causal comparison proves
            s = sympy.Symbol(f"{RUNTIME_PREFIX}{node.name}", integer=True)
            self.runtime[s] = node
            return Aff((), s)
        if t.dtype == torch.bool:
            return Sel(frozenset([("opq", node, sup, "truthy")]), True, False)
        return Opq(sup)

    def _reroot(self, node, v):
        """A value made only of runtime atoms, after a layout change: its atom becomes `node`."""
        t = tensor_meta(node)
        if t is None or not isinstance(v, Sel) or not _opq_only(v):
            return None
        n = t.dim()
        sup = frozenset(d - n for d in range(n) if not _is_one(sym(t.shape[d])))
        if v.a is True and v.b is False:
            return Sel(frozenset([("opq", node, sup, "truthy")]), True, False)
        if v.a is False and v.b is True:
            return Sel(frozenset([("opq", node, sup, "not")]), True, False)
        if isinstance(v.a, (int, float)) and not isinstance(v.a, bool):
            return Sel(frozenset([("opq", node, sup, ("eq", v.a))]), v.a, v.b)
        return None

    def _layout(self, node, v, fn, subst=None, aligned=False):
        if isinstance(v, Sel) and not aligned and any(at[0] == "opq" for at in v.atoms):
            if _opq_only(v):
                return self._reroot(node, v)
            return None
        return _remap(v, fn, subst, aligned)

    def _ndim(self, x) -> Optional[int]:
        t = tensor_meta(x)
        return t.dim() if t is not None else None

    # -- constants ----------------------------------------------------------------------------
    def _constant_pattern(self, t: torch.Tensor):
        key = id(t)
        if key in self._pattern_cache:
            return self._pattern_cache[key][1]
        r = self._analyse_constant(t)
        self._pattern_cache[key] = (t, r)
        return r

    @staticmethod
    def _analyse_constant(t: torch.Tensor):
        if t.numel() == 0 or t.numel() > (1 << 26) or t.is_complex():
            return None
        flat = t.reshape(-1)
        first = flat[0]
        if bool((flat == first).all()):
            return Const(first.item())
        if t.dim() < 2:
            return None
        lead = t.reshape(-1, t.shape[-2], t.shape[-1])
        if not bool((lead == lead[:1]).all()):
            return None
        m = lead[0]
        vals = torch.unique(m)
        if vals.numel() != 2:
            return None
        R, C = m.shape
        i = torch.arange(R, device=m.device)[:, None]
        j = torch.arange(C, device=m.device)[None, :]
        for a, b in ((vals[0], vals[1]), (vals[1], vals[0])):
            is_a = m == a
            # tril-like: a where j - i <= k
            k = int(is_a[0].sum().item()) - 1
            if bool((is_a == (j - i <= k)).all()):
                return Sel(frozenset([lin_atom({-1: 1, -2: -1}, -k)]), a.item(), b.item())
        return None

    # -- per op -------------------------------------------------------------------------------
    def _eval_node(self, node: fx.Node):
        if node in self.constants:
            r = self._constant_pattern(self.constants[node])
            if r is not None:
                return r
            return self._fallback(node)
        if node.op in ("placeholder", "get_attr", "output"):
            return self._fallback(node)
        c = canon(node)
        if c is None:
            fb = self._fallback(node)
            if node.op in ("call_function", "call_method") and _support(fb) - {-4, -1} and any(
                    isinstance(v, (Sel, Aff)) and not _opq_only(v) and _support(v) & {-1, -2}
                    for v in (self.eval(x) for x in node.all_input_nodes)):
                # an op on position structure that is not read: as runtime data it could only be
                # refused (it varies along queries), so say what was not followed instead
                self.unfollowed.append(node)
                return None
            return fb
        r = self._eval_op(node, c)
        if r is None:
            return self._fallback(node, structured=True)
        t = tensor_meta(node)
        if t is not None:
            # along a dim of size 1 the index is always 0: drop it, so that broadcasting the
            # value later cannot be mistaken for a dependence on the broadcast index
            n = t.dim()
            ones = {d - n for d in range(n) if _is_one(sym(t.shape[d]))}
            if ones and isinstance(r, (Aff, Sel, Opq)):
                r = _remap(r, lambda d: None if d in ones else d, {d: (0, 0) for d in ones}, aligned=True) or r
            # values take the node's dtype (torch.ones(dtype=bool) is True)
            if isinstance(r, Const):
                r = Const(_cast(r.v, t.dtype))
            elif isinstance(r, Sel):
                r = _mk_sel(r.atoms, _cast(r.a, t.dtype), _cast(r.b, t.dtype))
        return r

    def _eval_op(self, node: fx.Node, c: COp):
        fn = self._TRANSFER.get(c.op)
        if fn is None:
            return None
        return fn(self, node, c.args, c.op)

    # -- transfer functions: (self, node, args, op) -> abstract value, or None when not followed --
    def _op_to(self, node, a, op):
        v = self.eval(a[0])
        dt = a[1]
        if dt is None or v is None:
            return v
        if isinstance(v, Const):
            return Const(_cast(v.v, dt))
        if isinstance(v, Sel):
            return _mk_sel(v.atoms, _cast(v.a, dt), _cast(v.b, dt))
        if isinstance(v, Aff) and dt != torch.bool:
            return v
        return None

    def _op_arange(self, node, a, op):
        start = sym(a[0]) if not isinstance(a[0], float) else None
        step = a[2]  # the end (a[1]) is the extent, which the abstract value does not keep
        if start is None or not isinstance(step, int) or isinstance(step, bool):
            return None
        return Aff(_coef({-1: step}), start)

    def _op_full(self, node, a, op):
        v = a[0]
        if isinstance(v, (bool, int, float)):
            return Const(v)
        return None

    def _op_sym_size(self, node, a, op):
        e = sym(node)
        return Aff((), e) if e is not None else None

    def _op_unsqueeze(self, node, a, op):
        n = self._ndim(a[0])
        if n is None:
            return None
        pos = a[1] if a[1] >= 0 else a[1] + n + 1
        return self._layout(node, self.eval(a[0]), lambda d: d - 1 if n + d < pos else d)

    def _op_squeeze(self, node, a, op):
        t = tensor_meta(a[0])
        if t is None:
            return None
        n = t.dim()
        dims = a[1]
        if dims is None:
            dims = [i for i in range(n) if _is_one(sym(t.shape[i]))]
        elif isinstance(dims, int):
            dims = [dims]
        dims = sorted({(d + n) % n for d in dims if _is_one(sym(t.shape[(d + n) % n]))})
        if not dims:
            return self.eval(a[0])

        def fn(d, dims=dims, n=n):
            p = n + d
            if p in dims:
                return None
            return d + sum(1 for q in dims if q < p)
        return self._layout(node, self.eval(a[0]), fn)

    def _op_expand(self, node, a, op):
        return self.eval(a[0])  # right-aligned dims keep their meaning

    def _op_repeat(self, node, a, op):
        # like expand where each repeated dim has size 1 (Whisper's .repeat(B, 1))
        t = tensor_meta(a[0])
        reps = a[1]
        if t is None or len(reps) < t.dim():
            return None
        n = t.dim()
        for p, r in enumerate(reps[len(reps) - n:]):
            if not _is_one(sym(r)) and not _is_one(sym(t.shape[p])):
                return None  # tiles a varying dim: index mod size, not followed
        return self.eval(a[0])

    @staticmethod
    def _axis(a):
        """(meta, axis, axis counted from the right) of an op on a[0] along dim a[1], or None."""
        t = tensor_meta(a[0])
        if t is None:
            return None
        pos = a[1] if a[1] >= 0 else a[1] + t.dim()
        return t, pos, pos - t.dim()

    @staticmethod
    def _index_expr(t, pos, i):
        """An index along axis pos (an int, negative from the end, or a size) as an expression."""
        if isinstance(i, int) and i < 0:
            i = sym(t.shape[pos]) + i
        return sym(i) if not isinstance(i, sympy.Expr) else i

    def _op_slice(self, node, a, op):
        ax = self._axis(a)
        if ax is None:
            return None
        t, pos, d = ax
        step = a[4] if len(a) > 4 and a[4] is not None else 1
        s = self._index_expr(t, pos, a[2] if a[2] is not None else 0)
        if s is None or not isinstance(step, int):
            return None
        trivial = s == 0 and step == 1
        return self._layout(node, self.eval(a[0]), lambda dd: dd, {d: (step, s)}, aligned=trivial)

    def _op_select(self, node, a, op):
        ax = self._axis(a)
        if ax is None:
            return None
        t, pos, d = ax
        s = self._index_expr(t, pos, a[2])
        if s is None:
            return None
        return self._layout(node, self.eval(a[0]),
                            lambda dd: None if dd == d else (dd + 1 if dd < d else dd), {d: (0, s)})

    def _op_transpose(self, node, a, op):
        n = self._ndim(a[0])
        p0, p1 = (a[1] + n) % n - n, (a[2] + n) % n - n
        return self._layout(node, self.eval(a[0]), lambda d: p1 if d == p0 else (p0 if d == p1 else d))

    def _op_permute(self, node, a, op):
        n = self._ndim(a[0])
        perm = [(p + n) % n for p in a[1]]
        inv = {old - n: new - n for new, old in enumerate(perm)}
        return self._layout(node, self.eval(a[0]), lambda d: inv[d])

    def _op_arith(self, node, a, op):  # add, sub, rsub, mul, div
        E = self.eval
        x, y = (a[1], a[0]) if op == "rsub" else (a[0], a[1])
        return self._arith("sub" if op == "rsub" else op, node, E(x), E(y))

    def _op_neg(self, node, a, op):
        v = self.eval(a[0])
        return self._arith("mul", node, v, Const(-1))

    def _op_compare(self, node, a, op):  # le, lt, ge, gt, eq, ne
        return self._compare(op, node, self.eval(a[0]), self.eval(a[1]))

    def _op_logic(self, node, a, op):  # and, or
        return self._logic(op, node, self.eval(a[0]), self.eval(a[1]))

    def _op_not(self, node, a, op):
        v = self.eval(a[0])
        if isinstance(v, Const):
            return Const(not v.v)
        if isinstance(v, Sel) and isinstance(v.a, bool):
            return _mk_sel(v.atoms, not v.a, not v.b)
        return None

    def _op_where(self, node, a, op):
        E = self.eval
        return self._where(node, E(a[0]), E(a[1]), E(a[2]))

    def _op_masked_fill(self, node, a, op):
        E = self.eval
        return self._where(node, E(a[1]), E(a[2]), E(a[0]))

    def _op_canonical_mask(self, node, a, op):  # bool (True = masked) -> float 0 / -inf; float unchanged
        v = self.eval(a[0])
        mt = tensor_meta(a[0])
        if mt is not None and mt.dtype == torch.bool:
            return self._where(node, v, Const(float("-inf")), Const(0.0))
        return v

    def _op_cumsum(self, node, a, op):
        v = self.eval(a[0])
        n = self._ndim(a[0])
        if isinstance(v, Const) and n is not None and isinstance(v.v, (int, bool)) :
            k = int(v.v)
            d = (a[1] + n) % n - n
            return Const(0) if k == 0 else Aff(_coef({d: k}), sympy.Integer(k))
        return None

    def _op_diff(self, node, a, op):
        E = self.eval
        x, nd, dim, prepend, append = a
        n = self._ndim(x)
        if nd != 1 or append is not None or n is None:
            return None
        d = (dim + n) % n - n
        v = E(x)
        if not isinstance(v, Aff):
            return None
        cd = dict(v.coef).get(d, 0)
        if prepend is None:
            return Const(cd)
        p = E(prepend)
        pt = tensor_meta(prepend)
        if not isinstance(p, Aff) or pt is None or not _is_one(sym(pt.shape[d])):
            return None
        po = {k: c for k, c in p.coef if k != d}
        vo = {k: c for k, c in v.coef if k != d}
        if po == vo and sym_eq(v.const - p.const, sympy.Integer(cd)):
            return Const(cd)
        return None

    def _op_tri(self, node, a, op):  # tril, triu
        v = self.eval(a[0])
        k = a[1] if isinstance(a[1], int) and not isinstance(a[1], bool) else sym(a[1])
        if k is None:  # a diagonal from sizes (dynamic=True) is a sympy expression
            return None
        atom = lin_atom({-1: 1, -2: -1}, -k) if op == "tril" else lin_atom({-1: -1, -2: 1}, k)
        if isinstance(v, Const):
            zero = _cast(0, None) if not isinstance(v.v, bool) else False
            return _mk_sel({atom}, v.v, zero)
        if isinstance(v, Sel) and v.b in (0, False) and not any(at[0] == "opq" for at in v.atoms):
            return _mk_sel(set(v.atoms) | {atom}, v.a, v.b)
        return None

    # op name -> transfer function; supporting a new mask form's op is one entry here (and its method)
    _TRANSFER = {
        "to": _op_to, "arange": _op_arange, "full": _op_full, "sym_size": _op_sym_size,
        "unsqueeze": _op_unsqueeze, "squeeze": _op_squeeze, "expand": _op_expand, "repeat": _op_repeat,
        "slice": _op_slice, "select": _op_select, "transpose": _op_transpose, "permute": _op_permute,
        "view": lambda self, node, a, op: self._view(node, a[0]),
        "getitem": lambda self, node, a, op: self._getitem(node, a[0], a[1]),
        "index": lambda self, node, a, op: self._index(node, a[0], a[1]),
        "add": _op_arith, "sub": _op_arith, "rsub": _op_arith, "mul": _op_arith, "div": _op_arith,
        "neg": _op_neg,
        "le": _op_compare, "lt": _op_compare, "ge": _op_compare, "gt": _op_compare, "eq": _op_compare,
        "ne": _op_compare,
        "and": _op_logic, "or": _op_logic, "not": _op_not,
        "where": _op_where, "masked_fill": _op_masked_fill, "canonical_mask": _op_canonical_mask,
        "cumsum": _op_cumsum, "diff": _op_diff, "tril": _op_tri, "triu": _op_tri,
    }

    def _view(self, node, x):
        t_in, t_out = tensor_meta(x), tensor_meta(node)
        if t_in is None or t_out is None:
            return None
        si, so = shape_syms(t_in), shape_syms(t_out)
        ni, no = len(si), len(so)
        ins = [p for p in range(ni) if not _is_one(si[p])]
        outs = [p for p in range(no) if not _is_one(so[p])]
        if len(ins) != len(outs) or not all(sym_eq(si[p], so[q]) for p, q in zip(ins, outs)):
            return None
        m = {p - ni: q - no for p, q in zip(ins, outs)}
        aligned = all(k == v for k, v in m.items())
        return self._layout(node, self.eval(x), lambda d: m.get(d), aligned=aligned)

    def _getitem(self, node, x, idx):
        n = self._ndim(x)
        if n is None:
            return None
        steps = decode_getitem(n, idx)
        if steps is None:
            return None
        v = self.eval(x)
        if len(steps) == 1 and steps[0][0] == "index":
            return self._index(node, x, steps[0][1])
        for st in steps:
            if v is None:
                return None
            if st[0] == "unsqueeze":
                pos = st[1]
                v = self._layout(node, v, lambda d, pos=pos, n=n: d - 1 if n + d < pos else d)
                n += 1
            elif st[0] == "slice":
                d = st[1] - n
                start = st[2]
                s = sym(start) if not isinstance(start, int) else sympy.Integer(start)
                if isinstance(start, int) and start < 0:
                    return None
                if s is None or not isinstance(st[4], int):
                    return None
                trivial = s == 0 and st[4] == 1
                v = self._layout(node, v, lambda dd: dd, {d: (st[4], s)}, aligned=trivial)
            elif st[0] == "select":
                d = st[1] - n
                s = sym(st[2]) if not isinstance(st[2], int) else sympy.Integer(st[2])
                if s is None or (isinstance(st[2], int) and st[2] < 0):
                    return None
                v = self._layout(node, v, lambda dd, d=d: None if dd == d else (dd + 1 if dd < d else dd),
                                 {d: (0, s)})
                n -= 1
            else:
                return None
        return v

    def _index(self, node, x, indices):
        n = self._ndim(x)
        if n is None or len(indices) != n or any(i is None for i in indices):
            return None
        src = self.eval(x)
        if isinstance(src, Aff):  # gather from a position tensor: compose the affine maps
            acc = Aff((), src.const)
            coef = dict(src.coef)
            for p, i in enumerate(indices):
                iv = self.eval(i)
                if not isinstance(iv, (Aff, Const)):
                    return None
                c_d = coef.get(p - n, 0)
                if c_d:
                    acc = self._arith("add", node, acc, self._arith("mul", node, iv, Const(c_d)))
                    if acc is None:
                        return None
            return acc
        if not (isinstance(src, Opq) or _opq_only(src) or isinstance(src, Const)):
            return None
        sup = set()
        for i in indices:
            iv = self.eval(i)
            if iv is None:
                return None
            sup |= _support(iv)
        if isinstance(src, Const):
            return src
        t = tensor_meta(node)
        if t is not None and t.dtype == torch.bool:
            return Sel(frozenset([("opq", node, frozenset(sup), "truthy")]), True, False)
        return Opq(frozenset(sup))

    def _arith(self, op, node, x, y):
        if x is None or y is None:
            return None
        f = {"add": lambda p, q: p + q, "sub": lambda p, q: p - q, "mul": lambda p, q: p * q,
             "div": lambda p, q: p / q}[op]
        if isinstance(x, Const) and isinstance(y, Const):
            try:
                return Const(f(x.v, y.v))
            except Exception:  # noqa: BLE001
                return None
        if isinstance(x, (Aff, Const)) and isinstance(y, (Aff, Const)):
            xa = x if isinstance(x, Aff) else (Aff((), sympy.sympify(x.v)) if isinstance(x.v, int) and not isinstance(x.v, bool) else None)
            ya = y if isinstance(y, Aff) else (Aff((), sympy.sympify(y.v)) if isinstance(y.v, int) and not isinstance(y.v, bool) else None)
            if xa is None or ya is None:
                return None
            if op in ("add", "sub"):
                sgn = 1 if op == "add" else -1
                nc = dict(xa.coef)
                for d, cc in ya.coef:
                    nc[d] = nc.get(d, 0) + sgn * cc
                return Aff(_coef(nc), sympy.expand(xa.const + sgn * ya.const))
            if op == "mul":
                if not xa.coef and static_int(xa.const) is not None:
                    xa, ya = ya, xa
                k = static_int(ya.const)
                if ya.coef or k is None:
                    return None
                return Aff(_coef({d: cc * k for d, cc in xa.coef}), sympy.expand(xa.const * k))
            return None
        if isinstance(x, Sel) and isinstance(y, Const) or isinstance(x, Const) and isinstance(y, Sel):
            s, k, first = (x, y.v, True) if isinstance(x, Sel) else (y, x.v, False)
            try:
                fa = f(s.a, k) if first else f(k, s.a)
                fb = f(s.b, k) if first else f(k, s.b)
            except Exception:  # noqa: BLE001
                return None
            return _mk_sel(s.atoms, fa, fb)
        if isinstance(x, Sel) and isinstance(y, Sel):
            if op == "add":  # 0/-inf biases: one-atom ones written -inf-where-true are turned round
                x, y = _polarise_bias(x), _polarise_bias(y)
            if op == "add" and _finite(x.a) and _finite(y.a) and _very_neg(x.b) and _very_neg(y.b):
                # where some atom fails the sum is at most the larger of the one-sided sums (an
                # upper bound, so that a later scale is judged on the least negative value)
                return _mk_sel(x.atoms | y.atoms, x.a + y.a, max(x.b + y.a, x.a + y.b))
            if op == "mul" and x.b in (0, False) and y.b in (0, False):
                return _mk_sel(x.atoms | y.atoms, x.a * y.a, 0)
            return None
        if isinstance(x, (Opq, Sel, Aff, Const)) and isinstance(y, (Opq, Sel, Aff, Const)):
            return self._fallback_union(node, x, y)
        return None

    def _fallback_union(self, node, *vals):
        t = tensor_meta(node)
        if t is None:
            return None
        sup = frozenset().union(*[_support(v) for v in vals])
        if t.dtype == torch.bool:
            return Sel(frozenset([("opq", node, sup, "truthy")]), True, False)
        return Opq(sup)

    def _compare(self, op, node, x, y):
        if x is None or y is None:
            return None

        def as_aff(v):
            if isinstance(v, Aff):
                return v
            if isinstance(v, Const) and isinstance(v.v, int) and not isinstance(v.v, bool):
                return Aff((), sympy.Integer(v.v))
            return None
        xa, ya = as_aff(x), as_aff(y)
        if xa is not None and ya is not None and (xa.coef or ya.coef):
            # integer semantics: normalise to e <= 0
            if op in ("ge", "gt"):
                xa, ya = ya, xa
                op = "le" if op == "ge" else "lt"
            if op in ("le", "lt"):
                nc = dict(xa.coef)
                for d, cc in ya.coef:
                    nc[d] = nc.get(d, 0) - cc
                const = sympy.expand(xa.const - ya.const + (1 if op == "lt" else 0))
                return _mk_sel({lin_atom(nc, const)}, True, False)
            return None
        if isinstance(x, Sel) and isinstance(y, Const) and op in ("eq", "ne"):
            eq = op == "eq"
            return _mk_sel(x.atoms, (x.a == y.v) == eq, (x.b == y.v) == eq)
        if isinstance(x, Const) and isinstance(y, Sel) and op in ("eq", "ne"):
            return self._compare(op, node, y, x)
        if isinstance(x, Const) and isinstance(y, Const):
            try:
                return Const(bool({"le": x.v <= y.v, "lt": x.v < y.v, "ge": x.v >= y.v,
                                   "gt": x.v > y.v, "eq": x.v == y.v, "ne": x.v != y.v}[op]))
            except Exception:  # noqa: BLE001
                return None
        if isinstance(x, (Opq, Sel, Aff, Const)) and isinstance(y, (Opq, Sel, Aff, Const)):
            if isinstance(x, Sel) and any(at[0] == "lin" for at in x.atoms):
                return None
            if isinstance(y, Sel) and any(at[0] == "lin" for at in y.atoms):
                return None
            if isinstance(x, Aff) and x.coef or isinstance(y, Aff) and y.coef:
                return None  # position compared with runtime data: not provable here
            return self._fallback_union(node, x, y)
        return None

    def _logic(self, op, node, x, y):
        if x is None or y is None:
            return None
        for p, q in ((x, y), (y, x)):
            if isinstance(p, Const):
                pv = bool(p.v)
                if op == "and":
                    return q if pv else Const(False)
                return Const(True) if pv else q
        if isinstance(x, Sel) and isinstance(y, Sel):
            # "and" needs both as True-iff-all-atoms-hold, "or" as False-iff-all-atoms-hold; a
            # one-atom value the other way round is rewritten through its negated atom
            want = (True, False) if op == "and" else (False, True)
            x, y = _polarise(x, want), _polarise(y, want)
            if op == "and" and x.a is True and y.a is True and x.b is False and y.b is False:
                return Sel(x.atoms | y.atoms, True, False)
            if op == "or" and x.a is False and y.a is False and x.b is True and y.b is True:
                return Sel(x.atoms | y.atoms, False, True)
            if _opq_only(x) and _opq_only(y):
                return self._fallback_union(node, x, y)
            return None
        if isinstance(x, (Opq, Sel)) and isinstance(y, (Opq, Sel)):
            if (isinstance(x, Sel) and not _opq_only(x)) or (isinstance(y, Sel) and not _opq_only(y)):
                return None
            return self._fallback_union(node, x, y)
        return None

    def _where(self, node, c, x, y):
        if c is None or x is None or y is None:
            return None
        if isinstance(c, Const):
            return x if c.v else y
        if not isinstance(c, Sel) or not isinstance(c.a, bool) or c.a == c.b:
            if isinstance(c, Sel) and _opq_only(c) and isinstance(x, (Const, Opq)) and isinstance(y, (Const, Opq)):
                return self._fallback_union(node, c, x, y)
            return None
        vt, vf = (x, y) if c.a else (y, x)
        if isinstance(vt, Const) and isinstance(vf, Const):
            return _mk_sel(c.atoms, vt.v, vf.v)
        if isinstance(vt, Sel) and isinstance(vf, Const) and vt.b == vf.v:
            return _mk_sel(c.atoms | vt.atoms, vt.a, vf.v)
        if _opq_only(c) and all(isinstance(v, (Const, Opq)) or _opq_only(v) for v in (vt, vf)):
            return self._fallback_union(node, c, x, y)
        return None


def negate_atom(at) -> Optional[tuple]:
    """The atom that holds exactly where `at` does not (None when not expressible)."""
    if at[0] == "lin":  # not(e <= 0)  <=>  -e + 1 <= 0 (integers)
        return lin_atom({d: -c for d, c in at[1]}, -at[2] + 1)
    m = at[3]
    if isinstance(m, str):
        neg = {"truthy": "not", "not": "truthy"}.get(m)
    else:  # ("eq", c) <-> ("ne", c): the node equals / differs from c
        neg = ({"eq": "ne", "ne": "eq"}[m[0]], m[1]) if m[0] in ("eq", "ne") else None
    return (at[0], at[1], at[2], neg) if neg is not None else None


def _polarise(v: "Sel", want) -> "Sel":
    """A one-atom boolean Sel with (a, b) the other way round from `want`: the same value written
    with the negated atom. Anything else is returned unchanged."""
    if (v.a, v.b) == want or (v.b, v.a) != want or len(v.atoms) != 1:
        return v
    neg = negate_atom(next(iter(v.atoms)))
    return Sel(frozenset([neg]), want[0], want[1]) if neg is not None else v


def _polarise_bias(v: "Sel") -> "Sel":
    """A one-atom additive bias that is very negative where its atom holds, written with the
    negated atom so that it is finite where the atom holds."""
    if len(v.atoms) == 1 and _very_neg(v.a) and _finite(v.b):
        neg = negate_atom(next(iter(v.atoms)))
        if neg is not None:
            return Sel(frozenset([neg]), v.b, v.a)
    return v


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(float(v)) < 1e30 \
        and float(v) > VERY_NEGATIVE


def _very_neg(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) <= VERY_NEGATIVE


# --------------------------------------------------------------------------------------------
# the proof
# --------------------------------------------------------------------------------------------

@dataclass
class CausalProof:
    ok: bool
    reason: str = ""
    offset: Any = None  # sympy: query i sits at absolute position i + offset
    padding: Tuple[tuple, ...] = ()  # runtime atoms ("opq", node, support, mode)


def constraints_of(v, kind: str):
    """The atoms a mask term imposes ("keep": bool, True = attend; "drop": bool, True = masked;
    "add": additive bias). Returns (atoms, error)."""
    if kind == "add" and isinstance(v, (Opq, Aff)):
        return None, "additive bias on the logits is not a 0/-inf mask (position bias such as ALiBi?)"
    if v is None:
        return None, "mask is not provably causal (structure the prover does not follow)"
    if isinstance(v, (Opq, Aff)):
        return None, "mask is runtime data, not provably a function of positions"
    if isinstance(v, Const):
        x = v.v
        if kind == "keep" and bool(x) or kind == "drop" and not bool(x) or kind == "add" and _finite(x):
            return frozenset(), ""
        return None, "mask removes every key"
    a, b = v.a, v.b
    lins = [at for at in v.atoms if at[0] == "lin"]
    if not lins and _flipped(kind, a, b):
        if len(v.atoms) == 1:  # one runtime factor, the other way round: negate it
            neg = negate_atom(next(iter(v.atoms)))
            if neg is not None:
                return frozenset([neg]), ""
        return None, "mask is runtime data, not provably a function of positions"
    if len(v.atoms) == 1 and lins and _flipped(kind, a, b):
        coef, const = dict(lins[0][1]), lins[0][2]  # not(e <= 0)  <=>  -e + 1 <= 0
        return frozenset([lin_atom({d: -c for d, c in coef.items()}, -const + 1)]), ""
    if kind == "keep" and bool(a) and not bool(b):
        return v.atoms, ""
    if kind == "drop" and not bool(a) and bool(b):
        return v.atoms, ""
    if kind == "add" and _finite(a) and _very_neg(b):
        return v.atoms, ""
    if kind == "add":
        return None, "additive bias is not a 0/-inf mask (position bias such as ALiBi?)"
    if len(v.atoms) > 1 and _flipped(kind, a, b):
        return None, ("mask is not provably causal: it keeps a key where any one of several "
                      "conditions holds (prefix-LM / union of masks)")
    return None, "mask polarity is not causal"


def _flipped(kind, a, b) -> bool:
    if kind == "keep":
        return not bool(a) and bool(b)
    if kind == "drop":
        return bool(a) and not bool(b)
    return _very_neg(a) and _finite(b)


def _drop_implied(atoms, Lq, T):
    """Drop comparisons that another one implies over every query i in [0, Lq) and key j in
    [0, T): ``e2 <= 0`` follows from ``e1 <= 0`` when ``max(e2 - e1) <= 0`` over that box, e.g. a
    static cache's ``j < fill + Lq`` next to the causal ``j <= i + fill``."""
    size = {-1: T, -2: Lq}

    def implies(a1, a2) -> bool:
        c1, c2 = dict(a1[1]), dict(a2[1])
        bound = sympy.expand(a2[2] - a1[2])
        for d in set(c1) | set(c2):
            diff = c2.get(d, 0) - c1.get(d, 0)
            if diff > 0:
                if d not in size or size[d] is None:
                    return False
                bound += diff * (size[d] - 1)
        b = static_int(sympy.expand(bound))
        return b is not None and b <= 0

    kept: list = []
    for at in atoms:
        if any(implies(k, at) for k in kept):
            continue
        kept = [k for k in kept if not implies(at, k)] + [at]
    return kept


def prove_causal(atoms, Lq, T, logits_ndim: int, box: Optional[Tuple[int, int]] = None) -> CausalProof:
    Lq_i, T_i = static_int(Lq), static_int(T)
    lins = {at for at in atoms if at[0] == "lin"}
    if Lq_i == 1:  # one query row (a decode step): its index is 0
        lins = {lin_atom({d: c for d, c in at[1] if d != -2}, at[2]) for at in lins}
    lins = sorted(lins, key=str)
    opqs = [at for at in atoms if at[0] == "opq"]
    causal_coef = [{-1: 1, -2: -1}] + ([{-1: 1}] if Lq_i == 1 else [])
    kept, redundant = [], []
    for at in lins:
        coef = dict(at[1])
        if any(d not in (-1, -2) for d in coef):
            return CausalProof(False, "mask constrains positions along batch/head dims")
        if Lq_i is not None and T_i is not None and static_int(at[2]) is not None:
            ci, cj = coef.get(-2, 0), coef.get(-1, 0)
            mx = max(0, ci * (Lq_i - 1)) + max(0, cj * (T_i - 1)) + int(at[2])
            if mx <= 0:
                redundant.append(at)  # always true for these shapes (e.g. a decode step)
                continue
        kept.append(at)
    for at in opqs:
        if at[3] == "unknown":
            return CausalProof(False, "mask is not provably causal (structure the prover does not follow)")
        sup = set(at[2])
        if logits_ndim != 4 and sup:
            return CausalProof(False, "runtime mask factor on non-4-D attention logits")
        if not sup <= {-4, -1}:
            return CausalProof(False, "mask depends on runtime data along query/head axes")
    if not kept:
        causal = [at for at in redundant if dict(at[1]) in causal_coef]
        if len(causal) != 1:
            if opqs and not lins:
                return CausalProof(False, "mask is runtime data with no position structure in the graph "
                                          "(a 4-D mask built outside the compiled region?)")
            return CausalProof(False, "no causal structure in the mask (bidirectional attention)")
        kept = causal  # the mask is a causal comparison that these shapes make all-true
    kept = _drop_implied(kept, Lq, T)
    if len(kept) > 1:
        return CausalProof(False, "mask restricts positions beyond causality (sliding window / prefix-LM / band)")
    coef = dict(kept[0][1])
    if coef not in causal_coef:
        if coef.get(-2, 0) > 0 and coef.get(-1, 0) < 0:
            return CausalProof(False, "mask keeps keys after the query (anti-causal / prefix)")
        return CausalProof(False, f"mask is not a causal position comparison ({coef})")
    off = -kept[0][2]
    expected = sympy.expand(T - Lq) if T is not None and Lq is not None else None
    return CausalProof(True, "", off if expected is None or not sym_eq(off, expected) else expected,
                       tuple(opqs))
