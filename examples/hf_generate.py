"""Generate with a Hugging Face model under ``attn_implementation="superlinear"``, no compiling.

Run:  python examples/hf_generate.py                      # tiny random Llama on CPU, seconds
      python examples/hf_generate.py --model HuggingFaceTB/SmolLM2-135M-Instruct --window 256

A left-padded batch of prompts is generated greedily with a DynamicCache and a StaticCache, and
each prompt again on its own: the tokens agree, because padding is handled per sequence.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import slcompile  # registers attn_implementation="superlinear" with transformers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a transformers causal LM (name or path); default: tiny random Llama")
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--dense-below", type=int, default=0, help="exact dense attention up to this many keys")
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args()

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="superlinear")
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="superlinear")
    model.eval()
    # stored in model.config.superlinear: save_pretrained keeps it
    config = slcompile.hf.configure(model, window=args.window, dense_below=args.dense_below)
    print(f"{type(model).__name__}: attn_implementation={model.config._attn_implementation!r}, {config}")

    vocab = model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,)) for n in (96, 61, 80)]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), model.config.pad_token_id or 0)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):  # left padding, as generate() wants for decoder-only models
        ids[b, width - len(p):] = p
        mask[b, width - len(p):] = 1
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=model.config.pad_token_id or 0)

    with torch.no_grad():
        for cache in ("dynamic", "static"):
            batch = model.generate(input_ids=ids, attention_mask=mask, cache_implementation=cache, **kw)[:, width:]
            for b, p in enumerate(prompts):
                alone = model.generate(input_ids=p[None], attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                       cache_implementation=cache, **kw)[0, len(p):]
                n = min(len(alone), len(batch[b]))
                same = torch.equal(batch[b, :n], alone[:n])
                print(f"{cache:>7} cache, prompt {b} ({len(p)} tokens): {batch[b].tolist()} "
                      f"{'= alone' if same else '!= alone: ' + str(alone.tolist())}")


if __name__ == "__main__":
    main()
