"""ONNX export of rewritten models (issue 9): standard operators only, dynamic sequence axis,
onnxruntime (CPU) against PyTorch (the reference implementation of the custom ops).

Tolerance: max abs error <= 2e-4 on logits / 1e-5 on attention outputs (float32; both sides
compute the same sums in a different order). Top-k decisions are compared exactly where the op
outputs are graph outputs (anchors)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="needs onnx (pip install 'slcompile[onnx]')")
pytest.importorskip("onnxscript", reason="needs onnxscript (pip install 'slcompile[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'slcompile[onnx]')")

import slcompile.kernels.ops  # noqa: E402,F401
from slcompile import SuperlinearConfig  # noqa: E402
from slcompile.convert import report_to_dict  # noqa: E402
from slcompile.demo import tiny_model  # noqa: E402
from slcompile.export import ExportDependencyError, export_onnx, export_tensorrt  # noqa: E402
from slcompile.kernels import reference as R  # noqa: E402
from slcompile.loading import ExampleInputs, LoadedModel  # noqa: E402
from slcompile.prepare import prepare, reexport, rewrite_module  # noqa: E402

LOGIT_TOL = 2e-4
ATTN_TOL = 1e-5


def _session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def _check_standard(path):
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    domains = {n.domain for n in m.graph.node} | {n.domain for f in m.functions for n in f.node}
    assert domains <= {"", "ai.onnx"}, f"non-standard domains in the exported graph: {domains}"
    ops = {n.op_type for n in m.graph.node} | {n.op_type for f in m.functions for n in f.node}
    assert {"TopK", "Gather", "MatMul"} <= ops, ops  # the superlinear ops were translated
    return m


# --------------------------------------------------------------------------------------------
# a small causal LM: export -> rewrite -> re-export -> ONNX
# --------------------------------------------------------------------------------------------

CFG = SuperlinearConfig(search_key="anchor", window=16, sinks=2, topk=2, dense_below=0)
TINY = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    torch.manual_seed(0)
    model = tiny_model(seed=1, **TINY)
    ids = torch.randint(0, TINY["vocab_size"], (1, 48))
    loaded = LoadedModel(path="<memory>", fmt="module", module=model)
    ex = ExampleInputs((ids,), {}, "token ids", seq_dim_dynamic=True)
    prep = prepare(loaded, ex)
    assert prep.dynamic, prep.notes
    gm, report = rewrite_module(prep, CFG)
    assert report_to_dict(report)["rewritten"] == TINY["n_layers"]
    program = reexport(prep, gm)
    path = str(tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    export_onnx(program, path, example_inputs=((ids,), {}), optimize=False)  # CLI test: optimize=True
    return dict(model=model, program=program, path=path, ids=ids, dir=os.path.dirname(path))


def test_lm_onnx_matches_pytorch_at_two_lengths(lm):
    m = _check_standard(lm["path"])
    seq_dim = m.graph.input[0].type.tensor_type.shape.dim[1]
    assert seq_dim.dim_param and not seq_dim.dim_value, "the sequence axis must be dynamic"
    sess = _session(lm["path"])
    name = sess.get_inputs()[0].name
    rewritten = lm["program"].module()
    g = torch.Generator().manual_seed(7)
    for L in (48, 133):  # the example length and another one, same session (no re-export)
        ids = torch.randint(0, TINY["vocab_size"], (1, L), generator=g)
        with torch.no_grad():
            want = rewritten(ids)
            dense = lm["model"](ids)
        got = sess.run(None, {name: ids.numpy()})[0]
        assert got.shape == tuple(want.shape)
        err = np.abs(got - want.numpy()).max()
        assert err <= LOGIT_TOL, f"L={L}: ONNX vs PyTorch max abs err {err}"
        # far beyond the window the superlinear path drops keys: it must differ from dense
        # attention, or this test would not tell a dense export from a superlinear one
        gap = (want - dense).abs().max().item()
        assert gap > 100 * LOGIT_TOL, f"L={L}: rewritten model equals dense ({gap}); test is vacuous"


def test_cli_export_onnx(lm, tmp_path):
    archive = tmp_path / "model.sl.pt2"
    torch.export.save(lm["program"], str(archive))
    out = tmp_path / "out.onnx"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "slcompile", "export", str(archive), "--format", "onnx",
                           "-o", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file() and "wrote" in proc.stdout
    _check_standard(str(out))
    sess = _session(str(out))
    ids = torch.randint(0, TINY["vocab_size"], (1, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = lm["program"].module()(ids)
    got = sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0]
    assert np.abs(got - want.numpy()).max() <= LOGIT_TOL


# --------------------------------------------------------------------------------------------
# the default (block-sparse attention, docs/blocksparse.md): one file for every batch and length
# --------------------------------------------------------------------------------------------

BS_CFG = SuperlinearConfig(q_block=16, k_block=16, window=32, sinks=4, topk=2, block_rows=4,
                           block_pool=2, dense_below=0)


def test_default_search_lm_onnx_any_batch_and_length(tmp_path):
    assert BS_CFG.search_key == "blocksparse"
    torch.manual_seed(0)
    model = tiny_model(seed=2, **TINY)
    ids = torch.randint(0, TINY["vocab_size"], (1, 48))
    loaded = LoadedModel(path="<memory>", fmt="module", module=model)
    prep = prepare(loaded, ExampleInputs((ids,), {}, "token ids", seq_dim_dynamic=True))
    gm, report = rewrite_module(prep, BS_CFG)
    assert report_to_dict(report)["rewritten"] == TINY["n_layers"]
    program = reexport(prep, gm)
    path = str(tmp_path / "bs.onnx")
    export_onnx(program, path, example_inputs=((ids,), {}), optimize=False)
    m = _check_standard(path)
    dims = m.graph.input[0].type.tensor_type.shape.dim
    assert all(d.dim_param and not d.dim_value for d in dims), "batch and sequence must be dynamic"
    sess = _session(path)
    rewritten = program.module()
    for B, L in ((1, 48), (3, 133), (2, 200)):
        x = torch.randint(0, TINY["vocab_size"], (B, L), generator=torch.Generator().manual_seed(L))
        with torch.no_grad():
            want = torch.cat([rewritten(x[i:i + 1]) for i in range(B)])  # PyTorch, row by row
            dense = model(x)
        got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == tuple(want.shape)
        err = np.abs(got - want.numpy()).max()
        assert err <= LOGIT_TOL, f"B={B}, L={L}: ONNX vs PyTorch max abs err {err}"
        if L > 100:  # far past window + kept blocks: block-sparse, not dense
            gap = (want - dense).abs().max().item()
            assert gap > 100 * LOGIT_TOL, f"L={L}: equals dense ({gap}); the test is vacuous"


BS_VARIANTS = [  # window, sinks, topk, dense_below, q_block, k_block, rows, pool, exact_rows, group,
    # positions, spread rows
    (32, 4, 2, 0, 32, 16, 4, 2, 0, 1, False, False),
    (64, 0, 3, 0, 32, 16, 4, 2, 16, 4, True, True),     # stage 2's rows, groups, positions given
    (48, 20, 1, 150, 16, 16, 8, 3, 0, 8, False, True),  # dense below 150 keys; groups capped to 4
]


class _BlockOps(torch.nn.Module):
    def forward(self, q, k, v, qpos):
        return tuple(torch.ops.superlinear.block_sparse_attention(
            q, k, v, None, qpos if c[10] else None, c[0], c[1], c[2], 0.3, c[3], c[4], c[5], c[6],
            c[7], None, c[8], c[9], c[11]) for c in BS_VARIANTS)


def _bs_inputs(L, P, B, seed):
    g = torch.Generator().manual_seed(seed)
    T = L + P
    q, k, v = (torch.randn(B, h, n, 8, generator=g) for h, n in ((4, L), (2, T), (2, T)))
    return q, k, v, (torch.arange(L) + P).expand(B, L).clone()


def test_block_sparse_variants_match_the_reference(tmp_path):
    from slcompile.kernels import blocksparse as bs

    ex = _bs_inputs(100, 3, 2, 0)
    Bd, Ld, Td = torch.export.Dim("B", min=1), torch.export.Dim("L", min=2), torch.export.Dim("T", min=3)
    ep = torch.export.export(_BlockOps(), ex, dynamic_shapes=(
        {0: Bd, 2: Ld}, {0: Bd, 2: Td}, {0: Bd, 2: Td}, {0: Bd, 1: Ld}))
    path = str(tmp_path / "bs_ops.onnx")
    export_onnx(ep, path, example_inputs=(ex, {}), optimize=False)
    _check_standard(path)
    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]
    for L, P, B, seed in ((100, 3, 2, 1), (230, 40, 1, 2), (1, 300, 3, 3)):  # prefill, chunk, token
        x = _bs_inputs(L, P, B, seed)
        got = sess.run(None, {n: t.numpy() for n, t in zip(["q", "k", "v", "qpos"], x) if n in names})
        q, k, v, _ = x
        dense = R.dense_attention(q, k, v, None, None, 0.3)
        for i, c in enumerate(BS_VARIANTS):
            want = bs.superlinear_block_attention(
                q, k, v, None, P, window=c[0], sinks=c[1], topk=c[2], dense_below=c[3],
                q_block=c[4], k_block=c[5], rows=c[6], pool=c[7], exact_rows=c[8], group=c[9],
                spread=c[11], scale=0.3)
            err = np.abs(got[i] - want.numpy()).max()
            assert err <= ATTN_TOL, f"variant {i}, L={L}: max abs err {err}"
            if L + P > 200:  # sparse here: the check is not vacuous
                assert (want - dense).abs().max() > 1e-2, f"variant {i}, L={L}"
            if L + P <= c[3]:
                assert np.abs(got[i] - dense.numpy()).max() <= ATTN_TOL


# --------------------------------------------------------------------------------------------
# the two ops under many settings, in one exported graph (one export keeps the test fast)
# --------------------------------------------------------------------------------------------

VARIANTS = [
    # (search settings, attention settings, use key padding, use query positions)
    dict(window=8, topk=3, p=0.5, r=0.5, bf=2.0, ff=0.0, sk="anchor", db=0, sinks=2, combine="union",
         kpm=True, qpos=True),
    dict(window=8, topk=3, p=0.5, r=0.5, bf=2.0, ff=0.0, sk="mean", db=0, sinks=2, combine="gated",
         kpm=True, qpos=False),
    dict(window=6, topk=5, p=0.4, r=0.7, bf=1.5, ff=0.5, sk="anchor", db=60, sinks=3, combine="union",
         kpm=False, qpos=False),
    dict(window=0, topk=2, p=1 / 3, r=0.0, bf=3.0, ff=1.0, sk="anchor", db=0, sinks=0, combine="gated",
         kpm=False, qpos=True),
]


class _Ops(torch.nn.Module):
    def forward(self, q, k, v, kpm, qpos):
        outs = []
        for c in VARIANTS:
            m = kpm if c["kpm"] else None
            p = qpos if c["qpos"] else None
            a, s = torch.ops.superlinear.span_search(q, k, m, p, c["window"], c["topk"], c["p"], c["r"],
                                                     c["bf"], c["ff"], c["sk"], c["db"])
            o = torch.ops.superlinear.span_attention(q, k, v, a, s, m, p, c["window"], c["sinks"], c["r"],
                                                     c["bf"], c["ff"], c["combine"], 0.3, c["db"])
            outs += [o, a, s]
        return tuple(outs)


def _op_inputs(L, P, B=2, Hq=4, Hkv=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = L + P
    q = torch.randn(B, Hq, L, D, generator=g)
    k = torch.randn(B, Hkv, T, D, generator=g)
    v = torch.randn(B, Hkv, T, D, generator=g)
    kpm = torch.rand(B, T, generator=g) > 0.25
    kpm[0] = True  # batch row 0 unpadded
    qpos = (torch.arange(L) + P).expand(B, L).clone()
    qpos[1] = torch.randperm(T, generator=g)[:L]  # row 1: arbitrary positions
    return q, k, v, kpm, qpos


def test_ops_variants_match_reference(tmp_path):
    ex = _op_inputs(40, 3)
    Ld, Td = torch.export.Dim("L", min=2), torch.export.Dim("T", min=3)
    ep = torch.export.export(_Ops(), ex, dynamic_shapes=({2: Ld}, {2: Td}, {2: Td}, {1: Td}, {1: Ld}))
    path = str(tmp_path / "ops.onnx")
    export_onnx(ep, path, example_inputs=(ex, {}), optimize=False)
    _check_standard(path)
    sess = _session(path)
    names = [i.name for i in sess.get_inputs()]
    for L, P, seed in ((40, 3, 1), (90, 7, 2)):  # T = 43 (<= dense_below 60 in variant 3), 97
        x = _op_inputs(L, P, seed=seed)
        feeds = {n: t.numpy() for n, t in zip(["q", "k", "v", "kpm", "qpos"], x) if n in names}
        got = sess.run(None, feeds)
        for i, c in enumerate(VARIANTS):
            q, k, v, kpm, qpos = x
            m = kpm if c["kpm"] else None
            p = qpos if c["qpos"] else None
            a, s = R.span_search(q, k, m, p, c["window"], c["topk"], c["p"], c["r"], c["bf"], c["ff"],
                                 c["sk"], c["db"])
            o = R.span_attention(q, k, v, a, s, m, p, c["window"], c["sinks"], c["r"], c["bf"], c["ff"],
                                 c["combine"], 0.3, c["db"])
            go, ga, gs = got[3 * i: 3 * i + 3]
            assert np.array_equal(ga, a.numpy()), f"variant {i}, L={L}: anchors differ"
            fin = np.isfinite(s.numpy())
            assert np.array_equal(np.isfinite(gs), fin)
            assert np.abs(gs[fin] - s.numpy()[fin]).max(initial=0.0) <= ATTN_TOL * 10
            err = np.abs(go - o.numpy()).max()
            assert err <= ATTN_TOL, f"variant {i}, L={L}: attention max abs err {err}"
            if c["db"] and q.shape[2] + P <= c["db"]:  # T <= dense_below: dense attention
                d = R.dense_attention(q, k, v, m, p, 0.3)
                assert np.abs(go - d.numpy()).max() <= ATTN_TOL
                assert (ga == -1).all()
            else:
                assert (ga >= 0).any(), f"variant {i}, L={L}: no span kept; the case is vacuous"


def test_a_retired_search_key_in_a_graph_is_refused_with_a_clear_error(tmp_path):
    """A program made before the block searches were retired (its span_search names "block")."""
    class Blk(torch.nn.Module):
        def forward(self, q, k):
            return torch.ops.superlinear.span_search(q, k, None, None, 8, 2, 0.5, 0.5, 2.0, 0.0, "block", 0)

    q, k = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    ep = torch.export.export(Blk(), (q, k))
    with pytest.raises(Exception) as ei:
        export_onnx(ep, str(tmp_path / "b.onnx"), example_inputs=((q, k), {}), optimize=False)
    text = repr(ei.value) + repr(ei.value.__cause__) + str(ei.getrepr())
    assert "search_key='block', which was retired" in text


# --------------------------------------------------------------------------------------------
# geometry: the ONNX integer tables equal kernels/geometry.py (onnxscript eager mode runs the ops)
# --------------------------------------------------------------------------------------------

def test_onnx_geometry_matches_kernels_geometry():
    import math

    from slcompile import onnx_ops as O
    from slcompile.kernels.geometry import span_extents, stripe_deltas

    def _np(x):  # onnxscript eager tensors: .value is the numpy array (np.asarray would iterate)
        return np.asarray(x.value if hasattr(x, "value") else x)

    N = 100_000
    t1 = np.arange(1, N + 1, dtype=np.int64)
    for r, f in ((0.5, 2.0), (0.5, 1.5), (0.5, 3.0), (0.7, 1.5), (0.0, 3.0), (1.0, 0.25), (0.5, 0.0), (0.25, 2.5)):
        got = _np(O._extent(t1, r, f))
        want = span_extents(N, r, f, 0.0)[0].numpy()
        assert np.array_equal(got, want), (r, f, np.flatnonzero(got != want)[:5])
    i = np.arange(1, 5000, dtype=np.int64)
    for p in (0.5, 1 / 3, 0.4, 0.75, 1.0):
        got = _np(O._deltas(i, p))
        assert np.array_equal(got, stripe_deltas(4999, p).numpy()), p
    # the exact integer ceil(sqrt) (r = 1/2 path) far beyond what the tables above reach
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.integers(0, 2**46, 2000), np.arange(0, 2000) ** 2,
                         np.arange(1, 2000) ** 2 - 1, (2**23 + np.arange(50)) ** 2 + 1]).astype(np.int64)
    got = _np(O._ceil_sqrt(xs))
    want = np.array([math.isqrt(int(x)) + (math.isqrt(int(x)) ** 2 < int(x)) for x in xs])
    assert np.array_equal(got, want)


# --------------------------------------------------------------------------------------------
# TensorRT (no TensorRT here: its use is tested through a recording stand-in; the real compile
# tests skip without it)
# --------------------------------------------------------------------------------------------

def _have(mod):
    try:
        __import__(mod)
        return True
    except Exception:
        return False


@pytest.mark.skipif(_have("tensorrt"), reason="TensorRT is installed")
@pytest.mark.parametrize("name", ["m.ep", "m.engine"])
def test_tensorrt_missing_is_a_clear_error(lm, tmp_path, name):
    with pytest.raises(ExportDependencyError) as ei:
        export_tensorrt(lm["program"], str(tmp_path / name), example_inputs=((lm["ids"],), {}))
    assert "'tensorrt'" in str(ei.value)
    assert not (tmp_path / name).exists()


def test_tensorrt_profile_from_the_onnx_graph(lm):
    from slcompile.export import tensorrt_profile

    m = onnx.load(lm["path"])
    name = m.graph.input[0].name
    prof = tensorrt_profile(m, {name: lm["ids"].numpy()})
    assert prof == {name: ((1, 2), (1, 48), (1, 4096))}
    assert tensorrt_profile(m, {name: lm["ids"].numpy()}, max_seq_len=100)[name][2] == (1, 100)
    with pytest.raises(ValueError, match="below the example"):
        tensorrt_profile(m, {name: lm["ids"].numpy()}, max_seq_len=10)


class _FakeTRT:
    """Records what build_tensorrt_engine asks of the tensorrt module (a stand-in, not TensorRT)."""

    def __init__(self, parse_ok=True):
        import types

        rec = self.rec = {"shapes": {}, "parsed": None}
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, lvl: None})
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
        self.BuilderFlag = types.SimpleNamespace(FP16=1)

        class Inp:
            def __init__(s, n):
                s.name = n

        class Net:
            def __init__(s):
                s.names = []

            @property
            def num_inputs(s):
                return len(s.names)

            def get_input(s, i):
                return Inp(s.names[i])

        class Parser:
            def __init__(s, net, logger):
                s.net = net
                s.num_errors = 0 if parse_ok else 1

            def parse(s, data):
                rec["parsed"] = data
                s.net.names = [i.name for i in onnx.load_from_string(data).graph.input]
                return parse_ok

            def get_error(s, i):
                return "node 7 (TopK): unsupported"

        class Profile:
            def set_shape(s, name, lo, opt, hi):
                rec["shapes"][name] = (lo, opt, hi)

        class Config:
            def add_optimization_profile(s, p):
                rec["profile"] = p

        class Builder:
            def __init__(s, logger):
                pass

            def create_network(s, flags):
                return Net()

            def create_builder_config(s):
                return Config()

            def create_optimization_profile(s):
                return Profile()

            def build_serialized_network(s, net, config):
                return b"ENGINE" if "profile" in rec else None

        self.Builder, self.OnnxParser = Builder, Parser


def test_tensorrt_engine_route_wiring(lm, tmp_path, monkeypatch):
    fake = _FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    out = tmp_path / "m.engine"
    export_tensorrt(lm["program"], str(out), example_inputs=((lm["ids"],), {}), max_seq_len=512)
    assert out.read_bytes() == b"ENGINE"
    m = onnx.load_from_string(fake.rec["parsed"])  # the standard-operator ONNX form was parsed
    assert {n.domain for n in m.graph.node} <= {"", "ai.onnx"}
    assert fake.rec["shapes"] == {m.graph.input[0].name: ((1, 2), (1, 48), (1, 512))}
    from slcompile.export import build_tensorrt_engine

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT(parse_ok=False))
    with pytest.raises(RuntimeError, match="TopK"):
        build_tensorrt_engine(lm["path"], str(tmp_path / "x.engine"), {})


@pytest.mark.skipif(not (_have("torch_tensorrt") and torch.cuda.is_available()),
                    reason="needs torch-tensorrt, TensorRT >= 10.7 and a CUDA device (not installed here)")
def test_tensorrt_compile_matches_pytorch(lm, tmp_path):  # pragma: no cover - not run here
    out = tmp_path / "m.ep"
    export_tensorrt(lm["program"], str(out), example_inputs=((lm["ids"],), {}))
    import torch_tensorrt

    trt_prog = torch_tensorrt.load(str(out)).module()
    for L in (48, 133):
        ids = torch.randint(0, TINY["vocab_size"], (1, L)).cuda()
        want = lm["program"].module().cuda()(ids)
        assert (trt_prog(ids) - want).abs().max().item() <= LOGIT_TOL
