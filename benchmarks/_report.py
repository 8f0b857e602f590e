"""Markdown tables and a PNG plot from a suite's results (the JSON dict)."""

from __future__ import annotations

import math
from collections import Counter

LABELS = {"floor": "floor", "vijax.fit": "vijax.fit", "numpyro": "NumPyro SVI",
          "blackjax": "Blackjax"}
COLORS = {"floor": "black", "vijax.fit": "tab:blue", "numpyro": "tab:orange",
          "blackjax": "tab:green"}
FAMILY_STYLE = {"mean_field": "-", "full_rank": "--"}


def _impls(results) -> list[str]:
    return [n for n in results["implementations"]
            if any(n in c["impls"] for c in results["configs"])]


def _geomean(xs) -> float:
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


def _short(cfg) -> str:
    c = cfg["config"]
    fam = {"mean_field": "MF", "full_rank": "FR"}[c["family"]]
    return f"{c['model']} n={c['n']} d={c['d']} S={c['num_samples']} {fam} {c['estimator']}"


def _machine_line(results) -> str:
    m, v = results["machine"], results["versions"]
    line = (f"{m['cpu']}, {m['cores']} cores, {m['backend']} ({m['device']}); "
            f"Python {m['python']}; "
            + ", ".join(f"{k} {val}" for k, val in v.items()))
    load = m.get("load_average_1_5_15_min")
    if load:
        line += f"; load average at start {load[0]:.1f}"
    return line


def summary(results) -> dict:
    """Geometric-mean steady-state ratios to the floor, with their ranges."""
    out = {}
    for name in _impls(results):
        if name == "floor":
            continue
        rs = [c["impls"][name].get("ratio_to_floor") for c in results["configs"]
              if name in c["impls"]]
        rs = [r for r in rs if r is not None]
        mins = [c["impls"][name].get("min_ratio_to_floor") for c in results["configs"]
                if name in c["impls"]]
        if rs:
            out[name] = {"geomean": _geomean(rs), "min": min(rs), "max": max(rs),
                         "geomean_of_min_ratios": _geomean(mins), "configs": len(rs)}
    return out


def markdown(results) -> str:
    """Returns the suite's report: settings, a summary and four tables."""
    names = _impls(results)
    peers = [n for n in names if n != "floor"]
    s = results["settings"]
    lines = [
        f"# vijax benchmark suite: {results['suite']}",
        "",
        results.get("description", ""),
        "",
        f"Machine: {_machine_line(results)}.",
        "",
        f"Every implementation fits the same problem with {s['optimizer']} from "
        f"{s['init']} in {s['dtype']}, with the same family, estimator and number of "
        "draws S per step. The floor is a hand-written jitted `lax.scan` + optax loop "
        "doing the same work (`benchmarks/_impls.py`). Steady state: median over "
        f"{s['repeats']} timed calls of K steps each (K per configuration), after a "
        "warm-up, interleaved across implementations; ratios are to the floor of the "
        "same run (absolute times are context only). "
        f"Runtime {results['runtime_s']:.0f} s"
        + (f", configurations matching `{results['filter']}`" if results.get("filter") else "")
        + ".",
        "",
    ]
    summ = summary(results)
    if summ:
        lines.append("Steady-state time per step relative to the floor, geometric mean "
                     "over configurations of the ratio of medians (range; in brackets the "
                     "geometric mean of the ratio of the fastest repeats, less sensitive to "
                     "background load):")
        lines.append("")
        for name, r in summ.items():
            lines.append(f"- {LABELS[name]}: {r['geomean']:.2f}x ({r['min']:.2f} to "
                         f"{r['max']:.2f}, {r['configs']} configurations) "
                         f"[{r['geomean_of_min_ratios']:.2f}x]")
        lines.append("")

    def table(title, note, header, rows):
        lines.extend([f"## {title}", "", note, ""] if note else [f"## {title}", ""])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in rows)
        lines.append("")

    # 1. Steady state.
    rows = []
    for c in results["configs"]:
        floor = c["impls"].get("floor")
        row = [_short(c), str(c["steps_per_call"]),
               f"{1e6 * floor['steady_s_per_step']:.1f}" if floor else "—"]
        for name in peers:
            r = c["impls"].get(name)
            if r is None:
                row.append("—")
            elif "ratio_to_floor" in r:
                row.append(f"{r['ratio_to_floor']:.2f}x ({1e6 * r['steady_s_per_step']:.1f})")
            else:
                row.append(f"{1e6 * r['steady_s_per_step']:.1f}")
        rows.append(row)
    table("Steady-state time per step",
          "Floor in microseconds per step; the others as ratio to the floor "
          "(microseconds per step). MF: mean-field, FR: full-rank; — : not run "
          "(NumPyro's `Trace_ELBO` has no STL estimator).",
          ["configuration", "K", "floor (us)"] + [LABELS[n] for n in peers], rows)

    # 2. One-time cost and end to end.
    rows = []
    for c in results["configs"]:
        row = [_short(c)]
        for name in names:
            r = c["impls"].get(name)
            row.append("—" if r is None else
                       f"{r['compile_s']:.2f} / {r['end_to_end_s']:.2f}")
        rows.append(row)
    table("Compile and end-to-end time (seconds)",
          f"Each cell: compile / end-to-end wall time of a cold {s['fit_steps']}-step fit "
          "in this process (build, compile, run; nothing cached). Compile: the seconds "
          "JAX spent tracing, lowering and XLA-compiling during that fit, from JAX's "
          "monitoring events.",
          ["configuration"] + [LABELS[n] for n in names], rows)

    # 3. Memory.
    rows = []
    for c in results["configs"]:
        row = [_short(c)]
        for name in names:
            r = c["impls"].get(name)
            mem = r.get("memory") if r else None
            row.append("—" if not mem else f"{mem['peak_bytes'] / 2**20:.2f}")
        rows.append(row)
    table("Peak memory of the compiled program (MiB)",
          "XLA's memory analysis of the compiled K-step program: arguments + outputs "
          "- aliased + temporaries (for vijax.fit, its compiled chunk of up to 500 steps, "
          "which also holds the per-step trace).",
          ["configuration"] + [LABELS[n] for n in names], rows)

    # 4. Gradient evaluations to tolerance.
    rows = []
    for c in results["configs"]:
        if not any("convergence" in r for r in c["impls"].values()):
            continue
        opt = c.get("optimum_kl")
        row = [_short(c), "—" if opt is None or not math.isfinite(opt) else f"{opt:.3f}"]
        for name in names:
            conv = c["impls"].get(name, {}).get("convergence")
            if conv is None:
                row.append("—")
            elif conv["reached"]:
                row.append(f"{conv['evals']}")
            elif conv["final_gap"] is None or not math.isfinite(conv["final_gap"]):
                row.append(f"diverged (by {conv['trace'][-1][0] * c['config']['num_samples']})")
            else:
                row.append(f"> {conv['max_steps'] * c['config']['num_samples']} "
                           f"(gap {conv['final_gap']:.3g})")
        rows.append(row)
    if rows:
        table(f"Gradient evaluations to within {s['tol']} nats of the family's optimum",
              "Log-density gradient evaluations (steps x S) until the exact "
              "KL(q || p) - min over the family of KL falls below the tolerance, checked "
              f"every {s['check_every']} steps. BLR: closed forms; logistic regression: "
              "the ELBO gap to the family's optimum, by one-dimensional quadrature "
              "(vijax.models._glm.expected_softplus, about 1e-10 per row). The gap must stay below the tolerance for "
              "two more checks. min KL: the family's optimum (BLR; 0 for full-rank). "
              "'>': not reached, with the gap at the last check; diverged: the fit's "
              "parameters became non-finite (by that many evaluations).",
              ["configuration", "min KL"] + [LABELS[n] for n in names], rows)
    return "\n".join(lines)


def _sweep(results, axis: str):
    """Configs that vary ``axis`` ("d" or "num_samples") with everything else at its mode."""
    cfgs = [c for c in results["configs"] if c["config"]["model"] == "blr"]
    if not cfgs:
        return [], {}
    fixed = {}
    for key in ("n", "d", "num_samples", "estimator"):
        if key != axis:
            fixed[key] = Counter(c["config"][key] for c in cfgs).most_common(1)[0][0]
    if "reparam" in {c["config"]["estimator"] for c in cfgs}:
        fixed["estimator"] = "reparam"
    chosen = [c for c in cfgs if all(c["config"][k] == v for k, v in fixed.items())]
    return chosen, fixed


def plot(results, path: str) -> None:
    """Writes a 2 x 3 figure: time vs d, time vs S, ratio, compile, memory, evals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _impls(results)
    fig, axes = plt.subplots(2, 3, figsize=(18, 10))
    m = results["machine"]
    fig.suptitle(f"vijax benchmark suite '{results['suite']}' on {m['backend']} "
                 f"({m['cpu'] if m['backend'] == 'cpu' else m['device']}, {m['cores']} "
                 f"cores), jax {m['jax']}")

    for ax, axis, xlabel in ((axes[0, 0], "d", "dimension d"),
                             (axes[0, 1], "num_samples", "draws per step S")):
        chosen, fixed = _sweep(results, axis)
        for name in names:
            for fam, style in FAMILY_STYLE.items():
                pts = sorted((c["config"][axis], c["impls"][name]["steady_s_per_step"])
                             for c in chosen if c["config"]["family"] == fam
                             and name in c["impls"])
                if pts:
                    ax.plot([p[0] for p in pts], [1e6 * p[1] for p in pts], style,
                            marker="o", color=COLORS[name],
                            label=f"{LABELS[name]}, {fam.replace('_', '-')}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("steady-state time per step (us)")
        desc = ", ".join(f"{'S' if k == 'num_samples' else k}={v}" for k, v in fixed.items())
        ax.set_title(f"BLR: time per step vs {xlabel.split()[-1]}\n({desc})", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)

    labels = [_short(c) for c in results["configs"]]
    xs = list(range(len(labels)))
    width = 0.8 / max(1, len(names))

    def per_config(ax, value, ylabel, title, log=True, names_=names, dots=False):
        for i, name in enumerate(names_):
            pts = [(x, value(c["impls"][name])) for x, c in zip(xs, results["configs"])
                   if name in c["impls"] and value(c["impls"][name]) is not None]
            if pts and dots:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=COLORS[name],
                        label=LABELS[name])
            elif pts:
                ax.bar([p[0] + (i - (len(names_) - 1) / 2) * width for p in pts],
                       [p[1] for p in pts], width=width, color=COLORS[name],
                       label=LABELS[name])
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=6)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log:
            ax.set_yscale("log")
        ax.grid(True, axis="y", which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    ratio_names = [n for n in names if n != "floor"]
    per_config(axes[0, 2], lambda r: r.get("ratio_to_floor"),
               "time per step / floor's (same run)", "Steady state relative to the floor",
               names_=ratio_names, dots=True)
    axes[0, 2].axhline(1.0, color="black", lw=1)
    per_config(axes[1, 0], lambda r: r["compile_s"], "compile time (s)",
               "Trace + lower + XLA compile of a cold fit")
    per_config(axes[1, 1],
               lambda r: r["memory"]["peak_bytes"] / 2**20 if r.get("memory") else None,
               "peak memory of the compiled program (MiB)", "XLA memory analysis")

    def evals(r):
        conv = r.get("convergence")
        return conv["evals"] if conv and conv["reached"] else None

    per_config(axes[1, 2], evals, "gradient evaluations (steps x S)",
               f"Evaluations to KL gap < {results['settings']['tol']} "
               "(missing bar: not reached)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
