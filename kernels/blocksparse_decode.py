"""A decoded token's launches (or a short chunk's: queries of one query block), prepared once per
call shape, so that a token pays for little more host time than its four launches.

A decoded token of the default search runs four kernels: the two stages of the search
(`triton_blocksparse_search.block_select_triton` with ``exact_keys``), the attention given the
search's order keys and the merge of its split tiles (`triton_blocksparse.block_attention_triton`
with ``keys_topk``). Through those general entry points each token derives again some forty
launch values a kernel from the shapes and the configuration, and `launch.launch` classifies
every one of them for its key: about 140 us of Python a token on a 2-core CPU
(benchmarks/decode_host_cpu.py), where the token's GPU work at 16K keys is about 35 us. Here
`_plan` derives, once per call shape (shapes but the key count, q's and the summaries' strides,
dtypes, device, configuration, and the few counts of the key count that change every many
thousand tokens), everything those entry points derive that does not move with the key count,
and makes one `launch.Site` a kernel; a token computes the values that move with it (the key
count, the cache's strides, the sink and window blocks, the query's block and the tensors) and
launches. It launches what the general path launches, value for value (tests/kernels/
test_blocksparse_decode.py records both), into one scratch allocation instead of four.

`attention` returns None where the general path must run: a call that is not one query block,
a key-padding mask, no summaries kept with the cache, operands without unit stride in the last
dim, a negative scale, more stage-1 tile tops than stage 2 merges, or a shape the plan could not
launch (shared memory: the general path fits it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from triton.runtime.errors import OutOfResources

from . import blocksparse as bs
from . import triton_blocksparse as tba
from . import triton_blocksparse_search as tss
from .launch import Site, classes

_PLANS: dict = {}  # call shape -> _Plan, or None where the general path runs
_MAX_PLANS = 256  # a bound on the table: emptied when full


class _Plan:
    __slots__ = ("stage1", "stage2", "attend", "combine", "grid1", "grid2", "grid_a", "grid_c",
                 "n64", "o_keys", "o_ci", "o_acc", "out_shape", "per_q", "BM")


def _build(B, Hq, Lq, D, Hkv, Dv, dtype, device, q_stride, s_stride, window, sinks, topk, scale,
           q_block, k_block, rows, pool, exact_rows, group, spread, MG, MP, parts):
    """The plan of a call shape: the values `block_select_triton` and `block_attention_triton`
    derive that do not move with the key count (the same expressions, in their order), for
    queries in one attention tile."""
    G = Hq // Hkv
    BH = B * Hkv
    M = MG * group
    RG = G * rows
    ieee = dtype == torch.float32
    elem = torch.empty((), dtype=dtype).element_size()
    RGP, DP = tba._pow2(RG), tba._pow2(D)
    DK = min(64, DP)
    stages1 = max(1, min(3, tss._STAGE1_SMEM // (MP * DK * 2 * elem)))
    rows2 = exact_rows or rows
    RGP2 = tba._pow2(G * rows2)
    CB = max(1, (128 * 32 // max(32, RGP2)) // k_block)
    mparts = max(1, min(M, bs._ceil_div(tss._FUSED_PROGRAMS, BH)))
    MC = bs._ceil_div(bs._ceil_div(M, mparts), CB) * CB
    p = _Plan()
    p.per_q = q_block // k_block
    # scratch, int64: stage 2's order keys [BH, 1, M], stage 1's tops [BH, 1, parts, MG], the
    # pool [BH, 1, MG], then the split attention's float32 partials (16-byte aligned pieces)
    n_ex, n_keys, n_ci = BH * M, BH * parts * MG, BH * MG
    p.o_keys = n_ex + (n_ex & 1)
    p.o_ci = p.o_keys + n_keys + (n_keys & 1)
    end = p.o_ci + n_ci + (n_ci & 1)
    # stage 1 (block_select_triton's first launch; Q and the order keys' strides fixed)
    p.stage1 = Site(tss._bound_kernel, dict(
        s_q_b=q_stride[0], s_q_h=q_stride[1], s_q_t=q_stride[2],
        s_kk_b=s_stride[0], s_kk_h=s_stride[1], s_kk_k=s_stride[2], s_has_b=0,
        s_o_bh=parts * MG, s_o_n=parts * MG, s_o_c=MG, Hkv=Hkv, Lq=Lq, n0=0, per_q=p.per_q,
        RG=RG, ROWS=rows, STEP=q_block // rows if spread else 1, D=D,
        G=G, Q_BLOCK=q_block, RGP=RGP, DP=DP, DK=DK, MP=MP, F=group, HAS_MASK=False,
        IDX_BITS=bs._IDX_BITS, IEEE=ieee, TOPS=MG),
        ("Q", "KK", "HAS", "OUT", "nK", "nG", "sb", "front", "before0", "wb"),
        num_warps=4 if MP <= 128 else 8, num_stages=stages1)
    p.grid1 = (1, BH, parts)
    p.stage2 = Site(tss._exact_kernel, dict(
        s_q_b=q_stride[0], s_q_h=q_stride[1], s_q_t=q_stride[2], s_kpm_b=0,
        s_ci_bh=MG, s_ci_n=MG, s_o_bh=M, s_o_n=M, Hkv=Hkv, M=M, MC=MC, Lq=Lq, n0=0,
        per_q=p.per_q, RG=G * rows2, ROWS=rows2, STEP=q_block // rows2 if spread else 1, D=D,
        G=G, Q_BLOCK=q_block, KB=k_block, CB=CB, F=group, RGP=RGP2, DP=DP, HAS_KPM=False,
        IDX_BITS=bs._IDX_BITS, IEEE=ieee, s_t_bh=parts * MG, s_t_n=parts * MG, NT=parts * MG,
        TP=tba._pow2(parts * MG), s_tab_bh=0, HAS_TAB=False),
        ("Q", "K", "KPM", "CI", "OUT", "s_k_b", "s_k_h", "s_k_t", "T", "nK", "sb", "front",
         "before0", "wb", "TOPS_IN", "TAB"),
        num_warps=4 if RGP2 <= 64 else 8)
    p.grid2 = (1, BH, bs._ceil_div(M, MC))
    # the attention, with block_attention_triton's default launch shape
    BD, BDV = tba._pow2(D), tba._pow2(Dv)
    shape_args = (Lq, q_block, k_block, BD, BDV, elem, tba._BLOCK_M, tba._BLOCK_N, tba._WARPS,
                  tba._STAGES, G, None)
    BM, HP, BN, warps, stages = tba._launch_shape(*shape_args,
                                                  tba.fitted_budget(device, shape_args))
    grid = (G // HP, BH)  # one tile of rows (`attention` sends calls over two to the general path)
    sp = tba._split(grid[0] * grid[1])
    ml0 = BH * grid[0] * sp * HP * BM * BDV if sp > 1 else 0
    p.o_acc = end
    p.n64 = end + (bs._ceil_div(ml0 + 2 * ml0 // BDV, 2) if sp > 1 else 0)
    p.out_shape = (B, Hq, Lq, Dv)
    o_str = (Hq * Lq * Dv, Lq * Dv, Dv)
    p.BM = BM
    p.attend = Site(tba._fwd_kernel, dict(
        sqb=q_stride[0], sqh=q_stride[1], sqm=q_stride[2], sob=o_str[0], soh=o_str[1],
        som=o_str[2], slb=0, slh=0, Hkv=Hkv, Lq=Lq, nQ=1, F=topk, W=topk + 2,
        qk_scale=float(scale) * tba._LOG2E, G=G, D=D, DV=Dv, Q_BLOCK=q_block, K_BLOCK=k_block,
        BLOCK_M=BM, HP=HP, BLOCK_N=BN, BLOCK_D=BD, BLOCK_DV=BDV, SUB=max(1, k_block // BN),
        NB=max(1, BN // k_block), FP=tba._pow2(topk, 2), IEEE=ieee,
        DOT_F32=dtype == torch.bfloat16 and tba._interpreted(), WRITE_LSE=False, stab=0,
        HAS_TAB=False, s_kbh=M, s_kn=M, NKEYS=M, PER_Q=p.per_q, KEYS_TOPK=topk,
        KP=tba._pow2(M), IDX_BITS=tba._IDX_BITS, SPLIT=sp, ML0=ml0),
        ("Q", "K", "V", "O", "LST", "LSE", "skb", "skh", "skn", "svb", "svh", "svn", "T",
         "front", "q0", "tile0", "TAB", "KEYS", "SB", "WB", "PACC"),
        num_warps=warps, num_stages=stages)
    p.grid_a = (grid[0] * sp, grid[1])
    p.combine = None
    if sp > 1:
        bc = min(BDV, max(16, tba._COMBINE_VALUES // (sp * HP * BM)))
        p.combine = Site(tba._combine_kernel, dict(
            ML0=ml0, sob=o_str[0], soh=o_str[1], som=o_str[2], slb=0, slh=0, Hkv=Hkv, Lq=Lq,
            G=G, BLOCK_M=BM, HP=HP, DV=Dv, BLOCK_DV=BDV, SPLIT=sp, WRITE_LSE=False, BLOCK_C=bc),
            ("PACC", "O", "LSE", "front", "tile0"), num_warps=4)
        p.grid_c = (grid[0], grid[1], BDV // bc)
    return p


def attention(q: Tensor, k: Tensor, v: Tensor, summary: Tensor, p0: int, *, window: int,
              sinks: int, topk: int, scale: float, q_block: int, k_block: int, rows: int,
              pool: int, exact_rows: int, group: int, spread: bool) -> Optional[Tensor]:
    """`ops.block_sparse_attention`'s Triton path for queries p0..p0+Lq-1 of one query block with
    the summaries kept with the cache and no key-padding mask: [B, Hq, Lq, Dv], or None where
    the general path must run (module docstring)."""
    B, Hq, Lq, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    front = p0 % q_block
    if front + Lq > q_block or scale < 0 or p0 < 0 or p0 + Lq > T:
        return None
    gs = bs.stage1_group(window, k_block, group)
    gspan = gs * k_block
    nG = -(-T // gspan)
    MG = min(-(-(pool * topk) // gs), nG)
    MP = max(tba._pow2(MG), min(256, tba._pow2(nG)))
    parts = -(-nG // MP)
    if parts * MG > tss._MERGE_KEYS:
        return None
    sig = (q.shape, k.shape[:2], k.shape[3], v.shape[:2], v.shape[3], q.dtype, k.dtype, v.dtype,
           summary.dtype, q.device, k.device, v.device, summary.device, q.stride(),
           summary.shape[:2], summary.shape[3], summary.stride(), k.stride(3), v.stride(3), window,
           sinks, topk, scale, q_block, k_block, rows, pool, exact_rows, gs, spread, MG, MP, parts)
    plan = _PLANS.get(sig, _PLANS)
    if plan is None:
        return None
    if plan is _PLANS:  # a new call shape: the general path's checks, then a plan
        tba.check_arguments("block_sparse_attention", q, k, v, q_block, k_block)
        bs.check_summary(summary, k, None, gspan, T)
        plan = None
        if (v.shape[2] == T and q.stride(3) == 1 and k.stride(3) == 1 and v.stride(3) == 1
                and summary.stride(3) == 1 and summary.dtype == q.dtype
                and q.device == k.device == v.device == summary.device):
            plan = _build(B, Hq, Lq, D, Hkv, v.shape[3], q.dtype, q.device, q.stride()[:3],
                          summary.stride()[:3], window, sinks, topk, scale, q_block, k_block,
                          rows, pool, exact_rows, gs, spread, MG, MP, parts)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[sig] = plan
        if plan is None:
            return None
    elif v.shape[2] != T or summary.shape[2] < nG:
        return None  # the general path's checks say what is wrong
    tile0 = front // plan.BM
    if (front + Lq - 1) // plan.BM != tile0:  # queries over two tiles of rows
        return None
    nK, sb, wb, _ = bs.geometry(T, window, sinks, q_block, k_block)
    j0 = p0 // q_block
    dev = q.device
    ws = torch.empty(plan.n64, dtype=torch.int64, device=dev)
    out = torch.empty(plan.out_shape, dtype=q.dtype, device=dev)
    keys, ci = ws[plan.o_keys:], ws[plan.o_ci:]  # 16-byte aligned pieces of ws
    pacc = ws[plan.o_acc:].view(torch.float32) if plan.combine is not None else out
    sk, sv = k.stride(), v.stride()
    b1, q0 = j0 * plan.per_q, j0 * q_block
    # every dynamic value of the four launches, classified once (the pieces of ws with it)
    key = classes((q, k, v, summary, ws, out, nK, nG, sb, front, b1, wb, T, *sk[:3], *sv[:3],
                   q0, tile0))
    try:
        plan.stage1(plan.grid1, key, q, summary, summary, keys, nK, nG, sb, front, b1, wb)
        plan.stage2(plan.grid2, key, q, k, k, ci, ws, sk[0], sk[1], sk[2], T, nK, sb, front, b1,
                    wb, keys, k)
        plan.attend(plan.grid_a, key, q, k, v, out, ws, out, sk[0], sk[1], sk[2], sv[0], sv[1],
                    sv[2], T, front, q0, tile0, ws, ws, sb, wb, pacc)
        if plan.combine is not None:
            plan.combine(plan.grid_c, key, pacc, out, out, front, tile0)
    except OutOfResources:  # shared memory: the general path fits the launch
        _PLANS[sig] = None
        return None
    return out
