"""A whole model through transformers: ``attn_implementation="superlinear"`` against ``"sdpa"``.

A random-weight Llama decoder shaped like Llama-3-8B's layers (hidden 4096, 32 query / 8 kv heads
of 128, SwiGLU 14336; --layers of them, a small vocabulary), bf16, batch 1, run eagerly as
transformers runs it. Per context length L, in one process on the same weights:

* prefill: ``model(ids, logits_to_keep=1)`` over L tokens, without a cache;
* decode: after a prefill into a DynamicCache (what ``generate()`` uses by default), --steps
  single-token forwards; tokens/s. Under "superlinear" the key-block summaries are kept with the
  cache (slcompile.hf), so a token's search reads O(T / k_block) summaries, not the cache.

The superlinear side runs the given config (default: ``search_key="blocksparse"``, its field
defaults, ``dense_below=0``).

    python benchmarks/hf_model.py --lengths 32768 131072 --out results.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time

import torch

import slcompile
from slcompile import SuperlinearConfig
from meta import commit as measured_commit  # noqa: E402  (benchmarks/meta.py)


def timed(fn, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--config", default="search_key=blocksparse",
                    help="SuperlinearConfig fields over dense_below=0, as key=value,key=value")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    fields = {"dense_below": 0}
    for item in filter(None, a.config.split(",")):
        k, v = item.split("=")
        fields[k] = int(v) if v.lstrip("-").isdigit() else v
    scfg = SuperlinearConfig(**fields)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=a.layers, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=max(a.lengths) + a.steps + 1)
    model = LlamaForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()
    slcompile.hf.configure(model, scfg, enable=False)
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                commit=measured_commit(),
                date=time.strftime("%Y-%m-%d"), layers=a.layers, config=scfg.to_dict())
    print(json.dumps(meta), flush=True)
    cache_kw = ("cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters
                else "past_key_values")
    rows = []
    for L in a.lengths:
        ids = torch.randint(3, 1024, (1, L + a.steps), device="cuda")
        row = dict(L=L)
        for impl in ("sdpa", slcompile.hf.NAME):
            model.set_attn_implementation(impl)
            with torch.no_grad():
                row[f"{impl}_prefill_ms"] = timed(lambda: model(ids[:, :L], logits_to_keep=1), a.reps)
                cache = DynamicCache(config=model.config)
                model(ids[:, :L], logits_to_keep=1, use_cache=True, **{cache_kw: cache})
                # one token untimed: kernels compiled, the kept summaries built
                model(ids[:, L - 1:L], use_cache=True, **{cache_kw: cache})
                torch.cuda.synchronize()
                t = time.perf_counter()
                for i in range(a.steps):
                    model(ids[:, L + i:L + i + 1], use_cache=True, **{cache_kw: cache})
                torch.cuda.synchronize()
                row[f"{impl}_tokens_per_s"] = a.steps / (time.perf_counter() - t)
                del cache
            torch.cuda.empty_cache()
        s = slcompile.hf.NAME
        row.update(prefill_speedup=row["sdpa_prefill_ms"] / row[f"{s}_prefill_ms"],
                   decode_speedup=row[f"{s}_tokens_per_s"] / row["sdpa_tokens_per_s"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
