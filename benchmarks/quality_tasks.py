"""The two measurements of the quality harness (``benchmarks/quality.py``) on a loaded model:
needle in a haystack (building the prompts and checking the answer, by greedy generation or
teacher-forced) and perplexity of held-out text.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List

import torch

ADJ = ["amber", "brisk", "silent", "golden", "crimson", "hollow", "gentle", "rusty", "frozen", "lucky",
       "velvet", "quiet", "marble", "scarlet", "wooden", "misty"]
ANIMALS = ["otter", "falcon", "badger", "heron", "lynx", "walrus", "gecko", "bison", "panda", "raven",
           "beetle", "moose", "salmon", "toucan", "jackal", "ferret"]


@dataclass
class NeedleCase:
    length: int
    depth: float
    seed: int
    ids: torch.Tensor  # the prompt (and, teacher-forced, the answer's tokens after it)
    answer: str
    needle: tuple = (0, 0)  # token range [lo, hi) of the needle sentence
    answer_ids: tuple = ()  # teacher-forced: the answer's tokens, the last len(answer_ids) of ids


CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Read the document and answer the question at the end.\n\n", "<|im_end|>\n<|im_start|>assistant\n")


def make_needle_cases(tok, hay_ids: List[int], lengths, depths, seeds, prompt: str = "plain",
                      teacher_forced: bool = False) -> List[NeedleCase]:
    """Needle prompts of exactly L tokens (plus the answer's tokens when teacher-forced).

    prompt "plain": haystack, then "Question: ... Answer: The secret code of the <key> is";
    prompt "chat": the same inside SmolLM2's chat template (system + user turn holding the document
    and the question, the assistant turn begun with "The secret code of the <key> is")."""
    cases = []
    for L in lengths:
        for s in range(seeds):
            rng = random.Random(1000 * L + s)
            key = f"{rng.choice(ADJ)} {rng.choice(ANIMALS)}"
            val = f"{rng.randrange(100000, 999999)}"
            needle = tok.encode(f" The secret code of the {key} is {val}. Remember it. ", add_special_tokens=False)
            q = f"\n\nQuestion: What is the secret code of the {key}?"
            if prompt == "chat":
                head = tok.encode(CHAT[0], add_special_tokens=False)
                ask = tok.encode(q + CHAT[1] + f"The secret code of the {key} is", add_special_tokens=False)
            else:
                head = []
                ask = tok.encode(q + f"\nAnswer: The secret code of the {key} is", add_special_tokens=False)
            ans = tok.encode(f" {val}", add_special_tokens=False) if teacher_forced else []
            n = L - len(head) - len(needle) - len(ask)
            if n < 16 or n > len(hay_ids):
                raise SystemExit(f"length {L} does not fit the haystack ({len(hay_ids)} tokens)")
            start = rng.randrange(0, len(hay_ids) - n + 1)
            hay = hay_ids[start:start + n]
            for d in depths:
                p = int(round(d * n))
                ids = head + hay[:p] + needle + hay[p:] + ask
                assert len(ids) == L
                cases.append(NeedleCase(L, d, s, torch.tensor([ids + ans]), val,
                                        (len(head) + p, len(head) + p + len(needle)), tuple(ans)))
    return cases


@torch.no_grad()
def run_needle(model, tok, case: NeedleCase, device):
    """(found, answer log-probability). Teacher-forced cases: one prefill; found iff greedy
    decoding would emit exactly the answer's tokens (each is the argmax after the ones before it);
    the log-probability is the sum over the answer's tokens of log p(token | everything before it),
    a continuous measure of retrieval. Otherwise: greedy generation of 10 tokens, found iff the
    digits before the first period are the answer (log-probability None)."""
    ids = case.ids.to(device)
    if case.answer_ids:
        n = len(case.answer_ids)
        logits = model(input_ids=ids).logits[0, -n - 1:-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, -n:, None]).sum()
        return bool((logits.argmax(-1) == ids[0, -n:]).all()), float(lp)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                         do_sample=False, pad_token_id=tok.eos_token_id or 0)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    digits = "".join(ch for ch in text.strip().split(".")[0] if ch.isdigit())
    return digits == case.answer, None


@torch.no_grad()
def run_ppl(model, ids: torch.Tensor, tail: int, device) -> float:
    ids = ids.to(device)
    logits = model(input_ids=ids).logits[0, -tail - 1:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, -tail:])
    return math.exp(float(nll))
