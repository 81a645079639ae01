"""Fixtures for the command-line tests: tiny model files written the way users write them."""

from __future__ import annotations

import pytest
import torch

from cli_helpers import TINY


@pytest.fixture(scope="session")
def tiny_files(tmp_path_factory):
    """Model files written by the user's side of things: a torch.export archive with a dynamic
    sequence length, a pickled nn.Module, a state_dict, and broken or foreign files."""
    from slcompile.demo import tiny_model

    d = tmp_path_factory.mktemp("models")
    model = tiny_model(seed=1, **TINY)
    ids = torch.randint(0, TINY["vocab_size"], (1, 40), generator=torch.Generator().manual_seed(0))
    seq = torch.export.Dim("seq", min=2, max=4096)
    ep = torch.export.export(model, (ids,), dynamic_shapes=({1: seq},))
    torch.export.save(ep, d / "tiny.pt2")
    torch.save(model, d / "tiny.pt")
    torch.save(model.state_dict(), d / "state_dict.pt")
    data = (d / "tiny.pt2").read_bytes()
    (d / "truncated.pt2").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    mid = len(flipped) // 3
    for i in range(mid, mid + 64):
        flipped[i] ^= 0xFF
    (d / "bitflip.pt2").write_bytes(bytes(flipped))
    (d / "notes.txt").write_text("this is not a model\n")
    return {"dir": d, "model": model, "ids": ids}


@pytest.fixture
def workdir(tmp_path):
    return tmp_path
