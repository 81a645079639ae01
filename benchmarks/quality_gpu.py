"""One-call driver of the quality measurements on a GPU machine (issue 7): 8K needles, perplexity,
exact keys attended, optional router calibration and a routing probe, all with one loaded model,
under a wall-clock budget (variants are run in the order given; the rest are skipped once the
budget is spent, and the JSON says which).

The GPU machine has no texts and no ``gguf`` package: ``benchmarks/quality.py --make-bundle`` writes
the token ids here, and the GGUF file travels as it is (the ``gguf`` wheel is installed there).

    python benchmarks/quality_gpu.py --gguf /tmp/smol.gguf --bundle bundle.pt --out $OUT/q \\
        --calibrate-minutes 1 --variants dense default mean mean+r ... --budget-s 200

The GPU machine has no install of this checkout: ``python3 -m pip install --no-index --no-deps
--no-build-isolation --target /tmp/site .`` there, then run this script with
``PYTHONPATH=/tmp/site`` from outside the checkout (its ``slcompile/`` folder would shadow the
installed package). The GGUF (98 MB) is larger than one call may carry: it travels in two parts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality import evaluate  # noqa: E402
from quality_data import apply_yarn, load_bundle, load_model  # noqa: E402
from quality_report import make_table, plot  # noqa: E402
from quality_routing import routing_table, run_routing  # noqa: E402
from quality_rules import ROUTED, is_masked, variant_config  # noqa: E402
from quality_tasks import make_needle_cases  # noqa: E402

from slcompile.calibrate import attach_routers, calibrate, load_routers, save_routers  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--ppl-len", type=int, default=8192)
    ap.add_argument("--ppl-tail", type=int, default=1024)
    ap.add_argument("--variants", nargs="+", default=["dense", "default"],
                    help="perplexity and needles (named or inline, see quality.py)")
    ap.add_argument("--ppl-variants", nargs="*", default=[], help="perplexity only (after --variants)")
    ap.add_argument("--routers", help="routers file for '+r' variants (else --calibrate-minutes: "
                    "calibrated for the first '+r' variant)")
    ap.add_argument("--calibrate-minutes", type=float, default=0.0)
    ap.add_argument("--calibrate-seqs", type=int, default=2)
    ap.add_argument("--calibrate-steps", type=int, default=100)
    ap.add_argument("--routing-cases", type=int, default=2, help="needle cases for the routing probe")
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--yarn", type=float, default=0.0,
                    help="stretch the rotary embedding with YaRN by this factor (past 8K)")
    args = ap.parse_args(argv)
    t0 = time.time()
    dev = args.device
    if dev.startswith("cuda"):  # bigger query chunks for the reference searches: fewer launches,
        from slcompile.kernels import reference  # same results (queries are independent)

        reference._CHUNK_ELEMS = 1 << 28
    tok, model, gguf = load_model(dev, args.gguf)
    if args.yarn:
        apply_yarn(model, args.yarn)
    hay, hay_src, held, held_src, calib = load_bundle(args.bundle)
    log = {"gpu": torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu", "torch": torch.__version__, "load_s": time.time() - t0}
    print(f"loaded in {log['load_s']:.1f}s on {log['gpu']}", flush=True)

    routers = None
    if args.routers:
        routers = load_routers(args.routers)
    elif args.calibrate_minutes > 0:
        L = args.length
        seqs = [calib[i * L:(i + 1) * L].long() for i in range(args.calibrate_seqs)]
        routed = [v for v in args.variants + args.ppl_variants if v.endswith(ROUTED)]
        if not routed:
            raise SystemExit("--calibrate-minutes: no '+r' variant to calibrate routers for")
        cfg = variant_config(routed[0])
        tc = time.time()
        routers = calibrate(model, seqs, config=cfg, minutes=args.calibrate_minutes,
                            steps=args.calibrate_steps)
        log["calibrate_s"] = time.time() - tc
        log["calibrate_info"] = routers.info
        save_routers(routers, args.out + "_routers.safetensors")

    cases = make_needle_cases(tok, hay, [args.length], args.depths, args.seeds, "chat", True)
    ppl_ids = torch.tensor([held[:args.ppl_len]])
    ns = argparse.Namespace(ppl_tail=args.ppl_tail, device=dev, seeds=args.seeds, depths=args.depths,
                            lengths=[args.length], out=args.out)
    meta = dict(model=gguf, device=dev, gpu=log["gpu"], lengths=[args.length], depths=args.depths,
                seeds=args.seeds, ppl_len=args.ppl_len, ppl_tail=args.ppl_tail, prompt="chat",
                needle_check="teacher-forced", haystack=hay_src, heldout=held_src, log=log,
                yarn=args.yarn)
    results, skipped = {}, []
    for v, cs in [(v, cases) for v in args.variants] + [(v, []) for v in args.ppl_variants]:
        if time.time() - t0 > args.budget_s:
            skipped.append(v)
            continue
        evaluate(model, tok, ns, [v], cs, ppl_ids, meta, t0, results, routers=routers)
        if not cs:
            results[v].update(needle=float("nan"), needle_grid={}, needle_by_length={})
    routing = {}
    rv = [v for v in results if is_masked(v) or variant_config(v) is not None]
    if routers is None:
        rv = [v for v in rv if not v.endswith(ROUTED)]
    if args.routing_cases and rv and time.time() - t0 < args.budget_s:
        tr = time.time()
        rcases = make_needle_cases(tok, hay, [args.length], [0.5], args.routing_cases, "chat", True)
        if routers is not None:
            attach_routers(model, routers)  # the probe reads them from the modules
        routing = run_routing(model, rcases, rv, 16, dev)
        log["routing_s"] = time.time() - tr
    log["skipped"] = skipped
    table = make_table(results, [args.length], args.ppl_tail, args.ppl_len)
    print(table)
    if routing:
        print(routing_table(routing, [args.length]))
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": dict(meta, seconds=time.time() - t0), "results": results, "table": table,
                   "routing": routing}, fh, indent=1)
    with_needles = {v: r for v, r in results.items() if r["needle_grid"]}
    if with_needles:
        plot(with_needles, [args.length], args.depths, args.out + ".png")
    print(f"done in {time.time() - t0:.0f}s; skipped {skipped}", flush=True)


if __name__ == "__main__":
    main()
