"""Property (issue 22): random values for the CLI's options. Every run either succeeds or is
refused at the front door: click's own usage error or slcompile's one-line error, with the
documented exit status (2 usage, 7 config), never a failure inside (8 model failed, 70 internal
error, a traceback, or an exception escaping the command).

Runs `slcompile check` in process through click's runner (one subprocess per example would take
minutes; test_cli_issue22.py runs the same front door in subprocesses): check loads the model,
rewrites it under the exact config and under the given one and runs both, so a value that passes
the front door but not the ops shows up here as exit 8."""

from __future__ import annotations

import json

from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slcompile.cli import main

INT64_MAX = 2**63 - 1

_junk = st.one_of(
    st.integers(-2**70, 2**70).map(str),
    st.sampled_from(["0", "1", "-1", "2", "8", "9", "nan", "inf", "-inf", "1e400", "abc", "",
                     " ", "0.5", "1.5", "1e6", "1e7", str(INT64_MAX), str(INT64_MAX + 1), "10**20",
                     "union", "gated", "anchor", "mean", "block", "block_rerank", "12,x", "3,0"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
_ints = st.one_of(st.integers(0, 64), st.integers(-2**70, 2**70),
                  st.sampled_from([0, 1, 2, 8, INT64_MAX, INT64_MAX + 1]))
_floats = st.one_of(st.floats(-2.0, 2.0), st.floats(0.0, 2e6), st.floats(allow_nan=True, allow_infinity=True))
# Options sized in tokens (--seq-len, --batch, --lengths) take small valid values or values that
# must be refused: a valid 10**6 would run dense attention at a million tokens on the CPU.
_small_or_bad = st.one_of(st.integers(1, 48).map(str), st.integers(-2**70, 0).map(str),
                          st.sampled_from([str(INT64_MAX + 1), str(2**80), "abc", "", "1.5"]))

OPTIONS = {
    "--window": _ints.map(str), "--sinks": _ints.map(str), "--topk": _ints.map(str),
    "--dense-below": _ints.map(str), "--steps": st.integers(-2, 10).map(str),
    "--search-power": _floats.map(repr), "--span-power": _floats.map(repr),
    "--backward-factor": _floats.map(repr), "--forward-factor": _floats.map(repr),
    "--scale": _floats.map(repr),
    "--combine": st.sampled_from(["union", "gated", "sum", "", "UNION"]),
    # "block", "block_rerank": retired keys, refused with the config's one-line error
    "--search-key": st.sampled_from(["blocksparse", "anchor", "mean", "block", "block_rerank", "max",
                                     ""]),
    "--seq-len": _small_or_bad, "--batch": _small_or_bad, "--vocab": _ints.map(str),
    "--lengths": st.one_of(st.lists(st.integers(1, 48), min_size=1, max_size=2).map(
        lambda v: ",".join(map(str, v))), _small_or_bad),
    "--atol": _floats.map(repr), "--rtol": _floats.map(repr),
}


def _values(name):
    # three parts the option's own kind of value, one part anything
    return st.integers(0, 3).flatmap(lambda i: _junk if i == 0 else OPTIONS[name])


_argv = st.lists(st.sampled_from(sorted(OPTIONS)), min_size=1, max_size=4, unique=True).flatmap(
    lambda names: st.tuples(*[st.tuples(st.just(n), _values(n)) for n in names]))


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(opts=_argv)
def test_property_cli_options_are_refused_at_the_front_door_or_run(tiny_files, opts):
    argv = ["check", str(tiny_files["dir"] / "tiny.pt2"), "--json", "-q"]
    for name, value in opts:
        argv += [f"{name}={value}"]  # --opt=value: a value starting with '-' stays a value
    res = CliRunner().invoke(main, argv)
    given_names = {n for n, _ in opts}
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"{argv}: an exception escaped the command") from res.exception
    err = res.stderr
    assert "Traceback" not in err, (argv, err)
    ours = [ln for ln in err.splitlines() if ln.startswith("slcompile: error:")]
    if res.exit_code == 0:
        event("ran")
        assert json.loads(res.stdout)["ok"] is True
        return
    if res.exit_code == 1:
        # check's verdict "not exact" is legitimate only when the scale is changed (the model's
        # own scale is then not the one the rewrite uses) or the tolerances are (0 is float noise)
        assert given_names & {"--scale", "--atol", "--rtol"}, (argv, err, res.stdout[-2000:])
        event("not exact (--scale/--atol/--rtol given)")
        return
    assert res.exit_code in (2, 7), (argv, res.exit_code, err, res.stdout[-2000:])
    if ours:
        assert len(ours) == 1, (argv, err)
        assert "internal error" not in ours[0]
        msg = ours[0]
        if res.exit_code == 7:
            assert msg.startswith("slcompile: error: SuperlinearConfig."), msg
        event(f"refused by slcompile ({res.exit_code})")
    else:
        # click's own parse error: exit 2, "Error: Invalid value for '--window': ..."
        assert res.exit_code == 2 and "Error:" in err, (argv, err)
        event("refused by click (2)")
    # a refusal carries one JSON document on stdout with the same status
    doc = json.loads(res.stdout) if res.stdout.strip() else None
    if doc is not None:
        assert doc["ok"] is False and doc["exit_code"] == res.exit_code, doc
