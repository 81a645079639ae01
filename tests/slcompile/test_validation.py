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
    ("topk", 0, "topk"), ("topk", 257, "topk"), ("search_power", 0.0, "search_power"),
    ("search_power", 1.5, "search_power"), ("span_power", -0.1, "span_power"),
    ("backward_factor", float("nan"), "backward_factor"), ("forward_factor", -1.0, "forward_factor"),
    ("combine", "mean", "combine"), ("search_key", "max", "search_key"),
    ("dense_below", -5, "dense_below"), ("scale", 0.0, "scale"), ("topk", True, "topk"),
])
def test_bad_config_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        SuperlinearConfig(**{field: value})


def test_topk_bound_is_the_search_kinds():
    # the default (blocksparse) keeps topk key blocks (1..256); the stripe searches topk spans (1..8)
    with pytest.raises(ValueError, match="topk"):
        SuperlinearConfig(search_key="anchor", topk=9)


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


# --- issue 22: bounds are checked where the config is made, against what the ops take ---------

@pytest.mark.parametrize("field", ["window", "sinks", "dense_below"])
@pytest.mark.parametrize("value", [2**63, 2**70, 10**20])
def test_int_fields_beyond_int64_are_refused_where_the_config_is_made(field, value):
    # They used to pass and fail inside the op call: "Expected a value of type 'int' for argument
    # 'window' but instead found type 'int'".
    with pytest.raises(ValueError, match=rf"SuperlinearConfig\.{field}=\d+ is invalid: .*int64"):
        SuperlinearConfig(**{field: value})


def test_int64_max_is_accepted_and_runs():
    q, k, v = qkv(L=40)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for cfg in (SuperlinearConfig(window=2**63 - 1, dense_below=0),
                SuperlinearConfig(dense_below=2**63 - 1)):
        torch.testing.assert_close(superlinear_attention(q, k, v, config=cfg), dense,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field", ["backward_factor", "forward_factor", "scale", "search_power"])
def test_huge_ints_for_float_fields_are_a_value_error(field):
    # math.isfinite(10**400) raises OverflowError: it must be the config's ValueError instead.
    with pytest.raises(ValueError, match=rf"SuperlinearConfig\.{field}=1000.*\.\.\. is invalid"):
        SuperlinearConfig(**{field: 10**400})


def test_error_message_is_one_short_line_for_any_value():
    for value in (10**5000, "x" * 10_000, "a\nb", [1] * 1000):
        with pytest.raises(ValueError) as info:
            SuperlinearConfig(window=value)
        msg = str(info.value)
        assert "\n" not in msg and len(msg) < 200, msg
    with pytest.raises(ValueError, match="combine"):
        SuperlinearConfig(combine=["union"])  # unhashable / non-str: still the config's error


# --- property: any value thrown at SuperlinearConfig is accepted and runs, or is refused at once --

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FIELDS = ("window", "sinks", "topk", "search_power", "span_power", "backward_factor",
           "forward_factor", "combine", "search_key", "dense_below", "scale", "steps")

_any_value = st.one_of(
    st.integers(-2**80, 2**80),
    st.sampled_from([0, 1, 2, 3, 8, 9, 16, 2**31, 2**62, 2**63 - 1, 2**63, 2**64, -1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-300, 0.25, 0.5, 1.0, 1.5, 1e6, 1e7, 1e300]),
    st.booleans(), st.none(),
    # search keys, retired ones ("block", "block_rerank") too, and other strings
    st.sampled_from(["union", "gated", "anchor", "mean", "block", "block_rerank", "", "x", "64"]),
    st.text(max_size=6), st.lists(st.integers(), max_size=2),
)


_big_int = st.one_of(st.integers(0, 80), st.integers(0, 2**63 - 1), st.sampled_from([0, 2**63 - 1]))
_valid = {  # each field's own range, bounds included (most values the ops must run with)
    "window": _big_int, "sinks": _big_int, "dense_below": _big_int,
    "topk": st.integers(1, 8), "steps": st.one_of(st.just(2), st.integers(2, 8)),
    "search_power": st.one_of(st.just(0.5), st.floats(0.0, 1.0, exclude_min=True)),
    "span_power": st.one_of(st.just(0.5), st.floats(0.0, 1.0)),
    "backward_factor": st.floats(0.0, 1e6), "forward_factor": st.floats(0.0, 1e6),
    "combine": st.sampled_from(["union", "gated"]),
    "search_key": st.sampled_from(["anchor", "mean", "blocksparse"]),
    "scale": st.one_of(st.none(), st.floats(1e-3, 10.0)),
}
# three parts a value in the field's range, one part anything at all
_config_values = st.fixed_dictionaries(
    {}, optional={f: st.integers(0, 3).flatmap(lambda i, f=f: _any_value if i == 0 else _valid[f])
                  for f in _FIELDS})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=_config_values, L=st.sampled_from([1, 17, 40, 64]))
def test_property_config_refuses_at_construction_or_the_ops_run(values, L):
    """Random values for random fields: SuperlinearConfig either refuses them with its own one-line
    ValueError naming a field it was given, or the config runs through the ops (no failure inside).
    """
    from slcompile import SuperlinearConfig

    try:
        cfg = SuperlinearConfig(**values)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and len(msg) < 300, msg
        assert msg.startswith("SuperlinearConfig."), msg
        named = msg.split(".", 1)[1].split("=", 1)[0]
        assert named in values, (named, values)
        event(f"refused: {named}")
        return
    event("accepted: the ops ran")
    q, k, v = torch.randn(1, 2, L, 8), torch.randn(1, 1, L, 8), torch.randn(1, 1, L, 8)
    out = superlinear_attention(q, k, v, config=cfg, enable_gqa=True)
    assert out.shape == q.shape


def test_sinks_covering_every_key_equal_dense():
    # sinks >= T made span_attention's window gather index past its buffer (an empty window
    # segment starting past the keys fell in a bucket beyond the last); the sinks cover every key
    from slcompile.kernels.reference import dense_attention
    q, k, v = qkv(Hq=2, Hkv=2, L=64)
    cfg = SuperlinearConfig(search_key="anchor", window=4, sinks=64, dense_below=0)
    out = superlinear_attention(q, k, v, config=cfg)
    torch.testing.assert_close(out, dense_attention(q, k, v, None, None, 0.25), atol=1e-5, rtol=1e-5)
