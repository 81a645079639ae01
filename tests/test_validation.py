"""Bad input gets a clear error naming the problem."""

import pytest
import torch

from slcompile import SuperlinearConfig, superlinear_attention


def qkv(Hq=4, Hkv=4, L=32, D=16, T=None, dtype=torch.float32):
    T = L if T is None else T
    return torch.randn(1, Hq, L, D, dtype=dtype), torch.randn(1, Hkv, T, D, dtype=dtype), \
        torch.randn(1, Hkv, T, D, dtype=dtype)


@pytest.mark.parametrize("field,value,match", [
    ("window", -1, "window"), ("window", 1.5, "window"), ("sinks", -2, "sinks"),
    ("topk", 0, "topk"), ("topk", 9, "topk"), ("search_power", 0.0, "search_power"),
    ("search_power", 1.5, "search_power"), ("span_power", -0.1, "span_power"),
    ("backward_factor", float("nan"), "backward_factor"), ("forward_factor", -1.0, "forward_factor"),
    ("combine", "mean", "combine"), ("search_key", "max", "search_key"),
    ("dense_below", -5, "dense_below"), ("scale", 0.0, "scale"), ("topk", True, "topk"),
])
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        SuperlinearConfig(**{field: value})


def test_unknown_config_field():
    with pytest.raises(ValueError, match="unknown"):
        SuperlinearConfig().replace(windw=3)


def test_shape_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="4-D"):
        superlinear_attention(q[0], k, v)
    with pytest.raises(ValueError, match="head dim"):
        superlinear_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="must agree"):
        superlinear_attention(q, k, v[:, :, :5])
    q6, k4, v4 = qkv(Hq=6, Hkv=4)
    with pytest.raises(ValueError, match="not divisible"):
        superlinear_attention(q6, k4, v4, enable_gqa=True)
    q8, k2, v2 = qkv(Hq=8, Hkv=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        superlinear_attention(q8, k2, v2)
    with pytest.raises(ValueError, match="empty"):
        superlinear_attention(q[:, :, :0], k, v)
    with pytest.raises(ValueError, match="empty"):
        superlinear_attention(q, k[:, :, :0], v[:, :, :0], query_positions=0)
    with pytest.raises(ValueError, match="only 16 keys"):
        superlinear_attention(q, k[:, :, :16], v[:, :, :16])


def test_dtype_device_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="share a dtype"):
        superlinear_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="floating"):
        superlinear_attention(q.long(), k.long(), v.long())
    with pytest.raises(ValueError, match="one device"):
        superlinear_attention(q, k.to("meta"), v)


def test_mask_and_position_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="bool"):
        superlinear_attention(q, k, v, key_padding_mask=torch.ones(1, 32))
    with pytest.raises(ValueError, match="shape"):
        superlinear_attention(q, k, v, key_padding_mask=torch.ones(1, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match="lie in"):
        superlinear_attention(q, k, v, query_positions=torch.arange(32) + 5)
    with pytest.raises(ValueError, match="integer"):
        superlinear_attention(q, k, v, query_positions=torch.arange(32.0))
    with pytest.raises(ValueError, match="exceeds"):
        superlinear_attention(q, k, v, query_positions=3)
    with pytest.raises(ValueError, match="search_query shape"):
        superlinear_attention(q, k, v, search_query=q[:, :2])
    with pytest.raises(ValueError, match="scale"):
        superlinear_attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="config"):
        superlinear_attention(q, k, v, config={"window": 3})
