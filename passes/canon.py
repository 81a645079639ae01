"""Canonical view of FX nodes: one vocabulary for dynamo (torch-level) and ATen graphs.

`canon(node)` maps a node of either level to a `COp(op, args)` with a fixed argument order per
op name, or None when the node is not one of the ops the analyses understand. Nothing here
rewrites: it only reads. ATen overloads are bound through their schema; torch functions, tensor
methods and `operator` functions through small per-op tables.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx

aten = torch.ops.aten


@dataclass(frozen=True)
class COp:
    op: str
    args: Tuple[Any, ...]


def meta_val(x: Any) -> Any:
    """The example value of a node (fake tensor, SymInt, ...) or the constant itself."""
    if isinstance(x, fx.Node):
        m = x.meta
        if "val" in m:
            return m["val"]
        return m.get("example_value")
    return x


def tensor_meta(x: Any) -> Optional[torch.Tensor]:
    v = meta_val(x)
    return v if isinstance(v, torch.Tensor) else None


# --------------------------------------------------------------------------------------------
# ATen: bind by schema
# --------------------------------------------------------------------------------------------

def _bind_schema(target, args, kwargs) -> Dict[str, Any]:
    out = {}
    schema = target._schema
    for a, v in zip(schema.arguments, args):
        out[a.name] = v
    for a in schema.arguments:
        if a.name not in out:
            if a.name in kwargs:
                out[a.name] = kwargs[a.name]
            elif a.has_default_value():
                out[a.name] = a.default_value
            else:
                out[a.name] = None
    return out


_BINARY = {
    "add": "add", "sub": "sub", "rsub": "rsub", "mul": "mul", "div": "div", "true_divide": "div",
    "le": "le", "lt": "lt", "ge": "ge", "gt": "gt", "eq": "eq", "ne": "ne",
    "__and__": "and", "bitwise_and": "and", "logical_and": "and",
    "__or__": "or", "bitwise_or": "or", "logical_or": "or",
}
_UNARY = {"logical_not": "not", "bitwise_not": "not", "neg": "neg", "tanh": "tanh"}
_IDENTITY = {"clone", "contiguous", "alias", "detach", "detach_", "lift_fresh_copy", "lift_fresh",
             "_assert_tensor_metadata"}
_FULL_LIKE = {"ones_like": 1, "zeros_like": 0, "new_ones": 1, "new_zeros": 0, "ones": 1, "zeros": 0}


def _resolve_overload(packet, args, kwargs):
    """The overload a call of an OpOverloadPacket binds to: the only one, or the one whose schema
    takes these arguments (tensor arguments where it expects tensors), ``default`` first."""
    names = list(packet.overloads())
    names.sort(key=lambda n: n != "default")
    fits = []
    for name in names:
        ov = getattr(packet, name)
        sch = ov._schema
        pos = [a for a in sch.arguments if not a.kwarg_only]
        if len(args) > len(pos) or any(k not in {a.name for a in sch.arguments} for k in kwargs):
            continue
        ok = True
        for a, v in zip(pos, args):
            is_t = isinstance(tensor_meta(v), torch.Tensor)
            wants_t = isinstance(a.type, torch.TensorType) or "Tensor" in str(a.type)
            if is_t != wants_t and not (wants_t and str(a.type).endswith("?") and v is None):
                ok = False
                break
        given = {a.name for a in pos[:len(args)]} | set(kwargs)
        if ok and all(a.name in given or a.has_default_value() for a in sch.arguments):
            fits.append(ov)
    return fits[0] if fits else None


def _canon_aten(node: fx.Node, target=None) -> Optional[COp]:
    t = target if target is not None else node.target
    name = t.overloadpacket.__name__
    a = _bind_schema(t, node.args, node.kwargs)
    first = next(iter(a.values()), None)
    if name == "_transformer_encoder_layer_fwd":
        return COp("encoder_layer", (dict(a),))
    if name == "scaled_dot_product_attention":
        return COp("sdpa", (a["query"], a["key"], a["value"], a.get("attn_mask"), a.get("dropout_p", 0.0),
                            a.get("is_causal", False), a.get("scale"), a.get("enable_gqa", False)))
    if name in ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        mask = a.get("attn_mask", a.get("attn_bias"))
        return COp("sdpa_fused", (a["query"], a["key"], a["value"], mask, a.get("dropout_p", 0.0),
                                  a.get("is_causal", False), a.get("scale"), False))
    if name in ("matmul", "bmm"):
        return COp("matmul", (a["self"], a["other"] if "other" in a else a["mat2"]))
    if name == "einsum":
        return COp("einsum", (a["equation"], tuple(a["tensors"])))
    if name == "transpose":
        return COp("transpose", (a["self"], a["dim0"], a["dim1"]))
    if name == "permute":
        return COp("permute", (a["self"], tuple(a["dims"])))
    if name in ("view", "_unsafe_view", "reshape"):
        mm = _decomposed_matmul(node, a["self"])
        if mm is not None:
            return mm
        if "size" in a and isinstance(a["size"], (list, tuple)):
            return COp("view", (a["self"], tuple(a["size"])))
        if "shape" in a and isinstance(a["shape"], (list, tuple)):
            return COp("view", (a["self"], tuple(a["shape"])))
        return None
    if name == "unsqueeze":
        return COp("unsqueeze", (a["self"], a["dim"]))
    if name == "squeeze":
        d = a.get("dim")
        return COp("squeeze", (a["self"], d))
    if name == "slice":
        return COp("slice", (a["self"], a["dim"], a["start"], a["end"], a["step"]))
    if name == "select":
        return COp("select", (a["self"], a["dim"], a["index"]))
    if name == "index" and "indices" in a:
        return COp("index", (a["self"], tuple(a["indices"])))
    if name in ("expand", "expand_copy"):
        return COp("expand", (a["self"], tuple(a["size"])))
    if name in ("to", "_to_copy", "type_as", "_to_dim_order_copy"):
        dt = a.get("dtype")
        if name == "type_as":
            m = tensor_meta(a.get("other"))
            dt = m.dtype if m is not None else None
        return COp("to", (first, dt))
    if name in _IDENTITY:
        return COp("to", (first, None))
    if name in _BINARY:
        other = a.get("other")
        alpha = a.get("alpha", 1)
        if name in ("add", "sub") and alpha not in (None, 1):
            return None
        return COp(_BINARY[name], (a["self"], other))
    if name in _UNARY:
        return COp(_UNARY[name], (a["self"],))
    if name == "where" and "condition" in a:
        return COp("where", (a["condition"], a["self"], a["other"]))
    if name == "masked_fill" or (name == "masked_fill_" and isinstance(a["self"], fx.Node)
                                 and len(a["self"].users) == 1):
        return COp("masked_fill", (a["self"], a["mask"], a["value"]))
    if name in ("softmax", "_softmax", "_safe_softmax"):
        return COp("softmax", (a["self"], a["dim"]))
    if name in ("dropout", "native_dropout"):
        return COp("dropout", (a["input"], a["p"], a["train"]))
    if name == "arange":
        return COp("arange", (a.get("start", 0), a.get("end"), a.get("step", 1)))
    if name in ("full", "new_full", "full_like", "scalar_tensor"):
        v = a.get("fill_value", a.get("s"))
        return COp("full", (v,))
    if name in _FULL_LIKE:
        return COp("full", (_FULL_LIKE[name],))
    if name in ("tril", "triu"):
        return COp(name, (a["self"], a.get("diagonal", 0)))
    if name in ("maximum", "max") and "other" in a:  # aten.max.other: elementwise
        return COp("maximum", (a["self"], a["other"]))
    if name in ("clamp", "clamp_min") and a.get("min") is not None and a.get("max") is None:
        return COp("maximum", (a["self"], a["min"]))
    if name == "baddbmm":
        return COp("baddbmm", (a["self"], a["batch1"], a["batch2"], a.get("beta", 1), a.get("alpha", 1)))
    if name == "repeat" and "repeats" in a:
        return COp("repeat", (a["self"], tuple(a["repeats"])))
    if name in ("t", "numpy_T") and tensor_meta(a["self"]) is not None and tensor_meta(a["self"]).dim() == 2:
        return COp("transpose", (a["self"], 0, 1))
    if name == "repeat_interleave" and "repeats" in a and "self" in a:
        return COp("repeat_interleave", (a["self"], a["repeats"], a.get("dim")))
    if name == "sym_size":
        return COp("sym_size", (a["self"], a["dim"]))
    if name == "cumsum":
        return COp("cumsum", (a["self"], a["dim"]))
    if name == "diff":
        return COp("diff", (a["self"], a["n"], a["dim"], a.get("prepend"), a.get("append")))
    if name == "item":
        return COp("item", (a["self"],))
    return None


def _decomposed_matmul(node, x) -> Optional[COp]:
    """AOTAutograd spells a batched matmul(A, B) as view(bmm(view(expand(A)), view(expand(B)))):
    recognise it as matmul(A, B)."""
    if not (isinstance(x, fx.Node) and x.op == "call_function" and x.target is aten.bmm.default):
        return None
    out = tensor_meta(node)
    if out is None or out.dim() < 3:
        return None
    ops = []
    for v in x.args[:2]:
        if not (isinstance(v, fx.Node) and v.op == "call_function"
                and getattr(v.target, "overloadpacket", None) in (aten.view, aten._unsafe_view, aten.reshape)):
            return None
        e = v.args[0]
        if isinstance(e, fx.Node) and e.op == "call_function" and e.target is aten.expand.default:
            et = tensor_meta(e)
            base = e.args[0]
        else:
            et = tensor_meta(e)
            base = e
        if et is None or et.dim() != out.dim():
            return None
        ops.append((base, et))
    (a, at), (b, bt) = ops
    if list(at.shape[:-2]) != list(out.shape[:-2]) or list(bt.shape[:-2]) != list(out.shape[:-2]):
        return None
    return COp("matmul", (a, b))


# --------------------------------------------------------------------------------------------
# dynamo / torch-level graphs
# --------------------------------------------------------------------------------------------

def _dtype_in(args, kwargs):
    if "dtype" in kwargs:
        return kwargs["dtype"]
    for x in args:
        if isinstance(x, torch.dtype):
            return x
        m = tensor_meta(x)
        if m is not None and isinstance(x, fx.Node):  # .to(other)
            return m.dtype
    return None


def _varargs(args):
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        return tuple(args[0])
    return tuple(args)


_METHOD_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                 "double": torch.float64, "bool": torch.bool, "long": torch.int64, "int": torch.int32}

_OPERATORS = {
    operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.isub: "sub",
    operator.mul: "mul", operator.imul: "mul", operator.truediv: "div", operator.itruediv: "div",
    operator.le: "le", operator.lt: "lt", operator.ge: "ge", operator.gt: "gt", operator.eq: "eq",
    operator.ne: "ne", operator.and_: "and", operator.iand: "and", operator.or_: "or",
    operator.ior: "or",
}


def _fn_name(target) -> Optional[str]:
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    if mod.startswith("torch") or mod == "" or mod is None:
        return name
    return None


def _canon_torch(node: fx.Node, name: str, args, kwargs, is_method: bool) -> Optional[COp]:
    def arg(i, key, default=None):
        if i is not None and len(args) > i:
            return args[i]
        return kwargs.get(key, default)

    if name == "_canonical_mask":
        return COp("canonical_mask", (arg(0, "mask"),))
    if name == "multi_head_attention_forward":
        import inspect
        sig = inspect.signature(torch.nn.functional.multi_head_attention_forward)
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        return COp("mha", (dict(b.arguments),))
    if name == "_transformer_encoder_layer_fwd":  # nn.TransformerEncoderLayer's fused fast path
        names = ("src", "embed_dim", "num_heads", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias",
                 "use_gelu", "norm_first", "eps", "norm_weight_1", "norm_bias_1", "norm_weight_2",
                 "norm_bias_2", "ffn_weight_1", "ffn_bias_1", "ffn_weight_2", "ffn_bias_2", "mask",
                 "mask_type")
        d = dict(zip(names, args))
        d.update({k: v for k, v in kwargs.items() if k in names})
        d.setdefault("mask", None)
        d.setdefault("mask_type", None)
        return COp("encoder_layer", (d,)) if len(d) == len(names) else None
    if name == "scaled_dot_product_attention":
        return COp("sdpa", (arg(0, "query"), arg(1, "key"), arg(2, "value"), arg(3, "attn_mask"),
                            arg(4, "dropout_p", 0.0), arg(5, "is_causal", False), arg(6, "scale"),
                            arg(7, "enable_gqa", False)))
    if name in ("matmul", "bmm"):
        return COp("matmul", (arg(0, "input"), arg(1, "other", kwargs.get("mat2"))))
    if name == "einsum":
        ops = args[1:]
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        return COp("einsum", (args[0], tuple(ops)))
    if name == "transpose":
        return COp("transpose", (arg(0, "input"), arg(1, "dim0"), arg(2, "dim1")))
    if name == "permute":
        return COp("permute", (args[0], _varargs(args[1:]) if len(args) > 1 else tuple(kwargs.get("dims", ()))))
    if name in ("view", "reshape"):
        rest = _varargs(args[1:]) if len(args) > 1 else tuple(kwargs.get("shape", kwargs.get("size", ())))
        if any(isinstance(r, torch.dtype) for r in rest):
            return None
        return COp("view", (args[0], rest))
    if name == "unsqueeze":
        return COp("unsqueeze", (arg(0, "input"), arg(1, "dim")))
    if name == "squeeze":
        return COp("squeeze", (arg(0, "input"), arg(1, "dim")))
    if name == "expand":
        return COp("expand", (args[0], _varargs(args[1:])))
    if name == "expand_as":
        m = tensor_meta(args[1])
        return COp("expand", (args[0], tuple(m.shape))) if m is not None else None
    if name in ("to", "type"):
        return COp("to", (args[0], _dtype_in(args[1:], kwargs)))
    if name == "type_as":
        m = tensor_meta(args[1])
        return COp("to", (args[0], m.dtype if m is not None else None))
    if name in _METHOD_CASTS and is_method:
        return COp("to", (args[0], _METHOD_CASTS[name]))
    if name in ("contiguous", "clone", "detach"):
        return COp("to", (args[0], None))
    if name in ("add", "sub", "mul", "div", "true_divide", "le", "lt", "ge", "gt", "eq", "ne",
                "logical_and", "bitwise_and", "logical_or", "bitwise_or", "__and__", "__or__",
                "rsub"):
        if kwargs.get("alpha", 1) != 1 or kwargs.get("rounding_mode") is not None:
            return None
        return COp(_BINARY.get(name, name), (arg(0, "input"), arg(1, "other")))
    if name in ("logical_not", "bitwise_not", "neg", "tanh", "__invert__", "__neg__"):
        return COp({"__invert__": "not", "__neg__": "neg"}.get(name, _UNARY.get(name)), (args[0],))
    if name == "where":
        if is_method:  # x.where(cond, y) == where(cond, x, y)
            return COp("where", (arg(1, "condition"), args[0], arg(2, "other")))
        if len(args) + len(kwargs) < 3:
            return None
        return COp("where", (arg(0, "condition"), arg(1, "input"), arg(2, "other")))
    if name == "masked_fill" or (name == "masked_fill_" and isinstance(args[0], fx.Node)
                                 and len(args[0].users) == 1):
        # in place on a tensor nothing else reads: the same value as the functional form
        return COp("masked_fill", (arg(0, "input"), arg(1, "mask"), arg(2, "value")))
    if name == "softmax":
        return COp("softmax", (arg(0, "input"), arg(1, "dim")))
    if name == "dropout":
        return COp("dropout", (arg(0, "input"), arg(1, "p", 0.5), arg(2, "training", arg(2, "train", True))))
    if name == "arange":
        pos = [a for a in args]
        if len(pos) == 1:
            return COp("arange", (0, pos[0], 1))
        if len(pos) >= 2:
            return COp("arange", (pos[0], pos[1], pos[2] if len(pos) > 2 else kwargs.get("step", 1)))
        return COp("arange", (kwargs.get("start", 0), kwargs.get("end"), kwargs.get("step", 1)))
    if name in ("ones", "ones_like", "new_ones"):
        return COp("full", (1,))
    if name in ("zeros", "zeros_like", "new_zeros"):
        return COp("full", (0,))
    if name in ("full", "new_full"):
        if name == "full":
            v = args[1] if len(args) > 1 else kwargs.get("fill_value")
        else:
            v = args[2] if len(args) > 2 else kwargs.get("fill_value")
        return COp("full", (v,))
    if name == "full_like":
        return COp("full", (args[1] if len(args) > 1 else kwargs.get("fill_value"),))
    if name == "scalar_tensor" or (name == "tensor" and not is_method):
        v = args[0] if args else None
        return COp("full", (v,)) if isinstance(v, (int, float, bool)) else None
    if name in ("tril", "triu"):
        return COp(name, (arg(0, "input"), arg(1, "diagonal", 0)))
    if name == "repeat_interleave":
        return COp("repeat_interleave", (arg(0, "input"), arg(1, "repeats"), arg(2, "dim")))
    if name == "maximum" or (name == "max" and len(args) == 2 and not kwargs
                             and isinstance(tensor_meta(args[1]), torch.Tensor)):
        return COp("maximum", (args[0], arg(1, "other")))  # torch.max(x, y): elementwise
    if name in ("clamp", "clamp_min"):
        lo = arg(1, "min")
        hi = None if name == "clamp_min" else arg(2, "max")
        return COp("maximum", (args[0], lo)) if lo is not None and hi is None else None
    if name == "baddbmm":
        return COp("baddbmm", (arg(0, "input"), arg(1, "batch1"), arg(2, "batch2"), kwargs.get("beta", 1),
                               kwargs.get("alpha", 1)))
    if name == "repeat" and is_method:
        return COp("repeat", (args[0], _varargs(args[1:]) if len(args) > 1 else tuple(kwargs.get("repeats", ()))))
    if name == "t":  # x.t() / torch.t(x): a 2-D transpose (0-D/1-D: unchanged)
        m = tensor_meta(args[0])
        if m is None:
            return None
        return COp("transpose", (args[0], 0, 1)) if m.dim() == 2 else COp("to", (args[0], None))
    if name == "cumsum":
        return COp("cumsum", (arg(0, "input"), arg(1, "dim")))
    if name == "diff":
        return COp("diff", (arg(0, "input"), arg(1, "n", 1), arg(2, "dim", -1), arg(3, "prepend"),
                            arg(4, "append")))
    if name == "size" and is_method and len(args) == 2:
        return COp("sym_size", (args[0], args[1]))
    if name == "item":
        return COp("item", (args[0],))
    return None


def canon(node: fx.Node) -> Optional[COp]:
    """The canonical form of `node`, cached on the node."""
    c = node.meta.get("_sl_canon", _MISSING)
    if c is not _MISSING:
        return c
    c = None
    try:
        c = _canon(node)
    except Exception:  # noqa: BLE001 - an op we cannot read is simply not understood
        c = None
    node.meta["_sl_canon"] = c
    return c


_MISSING = object()


def _canon(node: fx.Node) -> Optional[COp]:
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return _canon_aten(node)
        if t is operator.getitem:
            return COp("getitem", (node.args[0], node.args[1]))
        if t is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT", "H", "mH"):
            # x.T reverses every dim (a 2-D transpose), x.mT swaps the last two (real tensors:
            # .H / .mH are the same)
            m = tensor_meta(node.args[0])
            if m is None or m.is_complex():
                return None
            n = m.dim()
            if node.args[1] in ("T", "H"):
                return COp("permute", (node.args[0], tuple(range(n - 1, -1, -1))))
            return COp("transpose", (node.args[0], -2, -1)) if n >= 2 else None
        if isinstance(t, torch._ops.OpOverloadPacket):  # torch.ops.aten.x(...) without an overload
            ov = _resolve_overload(t, node.args, node.kwargs)
            if ov is None:
                return None
            return _canon_aten(node, ov)
        if t in _OPERATORS:
            return COp(_OPERATORS[t], tuple(node.args))
        if t is operator.invert:
            return COp("not", (node.args[0],))
        if t is operator.neg:
            return COp("neg", (node.args[0],))
        if t is operator.matmul:
            return COp("matmul", tuple(node.args))
        if t is math.sqrt:
            return None
        name = _fn_name(t)
        if name is None:
            return None
        return _canon_torch(node, name, node.args, node.kwargs, False)
    if node.op == "call_method":
        name = node.target
        args = tuple(node.args)
        if name.startswith("__") and name.endswith("__"):  # x.__eq__(y) (dynamo spells some ops so)
            base = name[2:-2]
            if base in ("radd", "rmul", "rsub", "rtruediv", "rand", "ror"):
                base = base[1:]
                args = (args[1], args[0]) + args[2:]
            base = {"truediv": "div", "invert": "not", "and": "and", "or": "or",
                    "getitem": "getitem"}.get(base, base)
            if base == "getitem":
                return COp("getitem", (args[0], args[1]))
            if base in ("not", "neg"):
                return COp(base, (args[0],))
            if base == "matmul":
                return COp("matmul", args[:2])
            if base in ("and", "or"):
                return COp(base, args[:2])
            name = base
        return _canon_torch(node, name, args, node.kwargs, True)
    return None


def remove_canon_cache(graph: fx.Graph) -> None:
    for n in graph.nodes:
        n.meta.pop("_sl_canon", None)


# --------------------------------------------------------------------------------------------
# getitem decoding (dynamo): x[idx] -> list of steps on the canonical vocabulary
# --------------------------------------------------------------------------------------------

def decode_getitem(x_ndim: int, idx) -> Optional[list]:
    """Decode a basic/advanced index into steps: ("slice", dim, start, end, step),
    ("unsqueeze", dim), ("select", dim, i), ("index", tuple_of_index_or_None).
    Dims refer to the tensor as it is when the step runs. None when not understood."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    n_ell = sum(1 for i in idx if i is Ellipsis)
    if n_ell > 1:
        return None
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if consumed > x_ndim:
        return None
    full = []
    for i in idx:
        if i is Ellipsis:
            full.extend([slice(None)] * (x_ndim - consumed))
        else:
            full.append(i)
    if n_ell == 0:
        full.extend([slice(None)] * (x_ndim - consumed))
    tensors = [i for i in full if isinstance(i, fx.Node) and isinstance(tensor_meta(i), torch.Tensor)
               and tensor_meta(i).dim() > 0]
    if tensors:
        # advanced indexing: only the all-tensor form (each dim indexed by a tensor) is supported
        if any(not (isinstance(i, fx.Node)) for i in full):
            return None
        return [("index", tuple(full))]
    steps = []
    d = 0
    for i in full:
        if i is None:
            steps.append(("unsqueeze", d))
            d += 1
        elif isinstance(i, slice):
            if not (i.start is None and i.stop is None and i.step is None):
                steps.append(("slice", d, 0 if i.start is None else i.start,
                              None if i.stop is None else i.stop, 1 if i.step is None else i.step))
            d += 1
        elif isinstance(i, (int, fx.Node)) and not isinstance(i, bool):
            steps.append(("select", d, i))
        else:
            return None
    return steps
