"""Reports of the quality harness (``benchmarks/quality.py``): the results table, the PNG of needle
accuracy by depth and length, and ``--merge`` (several runs' JSON combined into one table and PNG).
"""

from __future__ import annotations

import json
import math


def make_table(results, lengths, ppl_tail, ppl_len) -> str:
    """Keys attended, needle accuracy by length, needles found / of those dense finds, mean
    teacher-forced answer log-probability (and its difference to dense, paired by case), ppl."""
    dense = results.get("dense")
    hdr = (f"| variant | keys attended (mean / last quarter / last {ppl_tail}) | " + " | ".join(
        f"needle {L}" for L in lengths) + " | needle all | found (of dense's) | answer log-prob (vs dense) "
        f"| ppl (last {ppl_tail} of {ppl_len}) |")
    lines = [hdr, "|" + "---|" * (hdr.count("|") - 1)]
    dcases = {} if dense is None else {(c["length"], c["depth"], c["seed"]): c for c in dense.get("cases", [])}
    for name, r in results.items():
        ppl = r.get("ppl")
        rel = "" if (dense is None or ppl is None or "ppl" not in dense) else f" ({ppl / dense['ppl'] - 1:+.1%})"
        nbl = {int(k): v for k, v in r.get("needle_by_length", {}).items()}
        kt = r.get("keys_tail")
        cases = r.get("cases", [])
        found, diffs = "", []
        if cases:
            pairs = [(c, dcases.get((c["length"], c["depth"], c["seed"]))) for c in cases]
            both = sum(1 for c, d in pairs if d is not None and d["found"] and c["found"])
            nd = sum(1 for c, d in pairs if d is not None and d["found"])
            found = f"{sum(c['found'] for c in cases)}/{len(cases)} ({both}/{nd})"
            diffs = [c["logprob"] - d["logprob"] for c, d in pairs
                     if d is not None and c["logprob"] is not None and d["logprob"] is not None]
        lp = r.get("answer_logprob")
        lps = "" if lp is None else f"{lp:.2f}" + ("" if not diffs or name == "dense" else
                                                   f" ({sum(diffs) / len(diffs):+.2f})")
        lines.append(f"| {name} | {r['keys']:.1%} / {r['keys_end']:.1%}"
                     + ("" if kt is None else f" / {kt:.1%}") + " | " + " | ".join(
            f"{nbl.get(L, float('nan')):.2f}" for L in lengths)
            + f" | {r['needle']:.2f} | {found} | {lps} | {'' if ppl is None else f'{ppl:.3f}'}{rel} |")
    return "\n".join(lines)


def plot(results, lengths, depths, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 1, 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        acc = results[name]["needle_grid"]
        grid = [[acc.get(f"{L}/{d}", float("nan")) for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7)
        k = results[name].get("keys")
        ax.set_title(name + ("" if k is None else f"\nkeys {k:.0%}"), fontsize=8)
        ax.set_xlabel("length")
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="exact-match accuracy")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def merge(paths, out):
    results, meta = {}, None
    for p in paths:
        with open(p) as fh:
            d = json.load(fh)
        if meta is None:
            meta = dict(d["meta"], parts=[])
        for key in ("lengths", "depths", "seeds", "ppl_len", "ppl_tail", "model"):
            if d["meta"][key] != meta[key]:
                raise SystemExit(f"--merge: {p} differs in {key}: {d['meta'][key]} != {meta[key]}")
        meta["parts"].append({"file": p, "seconds": d["meta"]["seconds"], "threads": d["meta"]["threads"]})
        results.update(d["results"])
    if "dense" in results:  # dense first
        results = {"dense": results["dense"], **{k: v for k, v in results.items() if k != "dense"}}
    table = make_table(results, meta["lengths"], meta["ppl_tail"], meta["ppl_len"])
    print(table)
    with open(out + ".json", "w") as fh:
        json.dump({"meta": meta, "results": results, "table": table}, fh, indent=1)
    plot(results, meta["lengths"], meta["depths"], out + ".png")
    print(f"wrote {out}.json and {out}.png")
    return results
