"""The `superlinear` torch.compile backend (registered through the torch_dynamo_backends entry point)."""

from __future__ import annotations


def superlinear_backend(gm, example_inputs, **kwargs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)
