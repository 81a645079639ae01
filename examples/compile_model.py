"""Compile a causal LM with ``torch.compile(backend="superlinear")`` and compare it with dense.

Run:  python examples/compile_model.py --seq-len 1024 --window 64

Uses slcompile's built-in tiny Llama-style model (swap in your own ``nn.Module``: any model whose
attention is causal SDPA, or a hand-written masked softmax, is found and rewritten). No import of
slcompile is needed for ``backend="superlinear"`` itself (it is registered as an entry point); we
import it here for ``explain`` and the model.
"""

import argparse
import time

import torch

import slcompile
from slcompile.demo import tiny_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--compiler", default="eager" if not torch.cuda.is_available() else "inductor",
                    choices=["inductor", "aot_eager", "eager"])
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model(seed=0).to(device)
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.seq_len), device=device)

    # dense_below=0: take the superlinear path even at this (short) length.
    config = slcompile.SuperlinearConfig(window=args.window, dense_below=0)

    # 1. What would be rewritten, as data.
    report = slcompile.explain(model, ids, config=config)
    print(report.summary())
    for site in report.sites:
        print(f"  {site.module_path:<16} {site.form:<8} q={list(site.q_shape)} "
              f"rewritten={site.rewritten} {site.reason}")

    # 2. Compile. Options are SuperlinearConfig fields plus the backend's own ("compiler").
    compiled = torch.compile(model, backend="superlinear",
                             options={**config.to_dict(), "compiler": args.compiler})
    with torch.no_grad():
        dense = model(ids)
        t = time.perf_counter()
        out = compiled(ids)
        print(f"first call (compiles): {time.perf_counter() - t:.1f}s")

        # 3. How far from dense attention is it? And under the exact config (a window that covers
        #    everything), the superlinear path must reproduce dense attention.
        print(f"max |superlinear - dense| logits: {(out - dense).abs().max():.3g}; "
              f"next-token agreement: {(out.argmax(-1) == dense.argmax(-1)).float().mean():.3f}")
        torch._dynamo.reset()
        exact = torch.compile(model, backend="superlinear",
                              options={**slcompile.SuperlinearConfig.exact().to_dict(),
                                       "compiler": args.compiler})
        print(f"exact config: max |error| {(exact(ids) - dense).abs().max():.2e}")


if __name__ == "__main__":
    main()
