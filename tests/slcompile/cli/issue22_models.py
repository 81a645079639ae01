"""Test models of tests/slcompile/cli/test_cli_issue22.py, importable by the CLI subprocesses (PYTHONPATH):
one whose dynamic-length export fails (so the CLI falls back to a static export), and an output
type registered as a pytree node only when this module is imported."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slcompile.demo import tiny_model


class FixedMultipleOf8(torch.nn.Module):
    """The tiny LM, refusing lengths that are not a multiple of 8: torch.export cannot keep the
    sequence length dynamic (the branch guards it), so the CLI exports it static."""

    def __init__(self, **cfg):
        super().__init__()
        self.lm = tiny_model(seed=1, **cfg)

    def forward(self, ids):
        if ids.shape[1] % 8:
            raise ValueError("length must be a multiple of 8")
        return self.lm(ids)


@dataclass
class Pair:
    logits: torch.Tensor
    last: torch.Tensor


torch.export.register_dataclass(Pair, serialized_type_name="issue22_models.Pair")


class PairOutput(torch.nn.Module):
    """The tiny LM returning a Pair: an archive of it loads only once this module is imported."""

    def __init__(self, **cfg):
        super().__init__()
        self.lm = tiny_model(seed=1, **cfg)

    def forward(self, ids):
        out = self.lm(ids)
        return Pair(out, out[:, -1])
