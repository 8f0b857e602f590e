# %% [markdown]
# # Is vijax fast enough? The benchmark results stored in the repository
#
# **Question.** How much does `vijax.fit` cost per step compared with the loop you would
# write by hand, and compared with NumPyro and Blackjax on the same problem? How long do
# you wait for compilation, how much memory does a step need, and how many gradient
# evaluations does it take to get close to the best Gaussian?
#
# **Answer.** Read from the files below, never retyped: the first table gives, for every
# stored run, the steady-state time per step of each implementation relative to the
# *floor* (a hand-written jitted `lax.scan` + optax loop doing the same work, measured in the
# same run). The plots break it down by dimension d, by number of draws S, and per
# configuration, and show compile time, memory and convergence to the family's optimum.
#
# The results come from `python -m benchmarks --suite quick` (CPU) and, where a GPU run
# was recorded, `python -m benchmarks --suite full --device gpu`; each run writes
# `benchmarks/results/<backend>/suite_<name>.json` with the machine it ran on. Run the
# suite on your own machine to get your own numbers; this notebook plots whatever is there.

# %%
import json
import math
import pathlib
from collections import Counter

import matplotlib.pyplot as plt
from IPython.display import Markdown, display

plt.rcParams["figure.dpi"] = 72  # large multi-panel figures; keeps the notebook small
RESULTS = pathlib.Path("..", "benchmarks", "results")
FILES = sorted(RESULTS.glob("*/suite_*.json"))
assert FILES, f"no benchmark results under {RESULTS.resolve()}: run `python -m benchmarks`"
RUNS = [json.loads(f.read_text()) for f in FILES]

LABELS = {"floor": "floor (hand-written)", "vijax.fit": "vijax.fit",
          "numpyro": "NumPyro SVI", "blackjax": "Blackjax"}
COLORS = {"floor": "black", "vijax.fit": "tab:blue", "numpyro": "tab:orange",
          "blackjax": "tab:green"}
STYLE = {"mean_field": "-", "full_rank": "--"}


def name(run):
    return f"{run['machine']['backend']} / {run['suite']}"


def short(c):
    k = c["config"]
    fam = {"mean_field": "MF", "full_rank": "FR"}[k["family"]]
    return f"{k['model']} n={k['n']} d={k['d']} S={k['num_samples']} {fam} {k['estimator']}"


def md_table(headers, rows):
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


def geomean(xs):
    xs = [x for x in xs if x and x > 0]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


display(md_table(
    ["run", "file", "machine", "versions", "configurations", "runtime", "date (UTC)"],
    [[name(r), f"`{f.relative_to(RESULTS.parent.parent)}`",
      f"{r['machine']['cpu']}, {r['machine']['cores']} cores, {r['machine']['device']}",
      ", ".join(f"{k} {v}" for k, v in r["versions"].items()),
      len(r["configs"]), f"{r['runtime_s']:.0f} s", r["started_utc"]]
     for f, r in zip(FILES, RUNS)]))

# %% [markdown]
# ## Steady-state time per step, relative to the floor
#
# Geometric mean over a run's configurations of (time per step) / (floor's time per step),
# with the range. A ratio of 1 means no overhead over the hand-written loop; the floor
# has no NaN guard and records only the loss, while `vijax.fit` also guards every step
# against non-finite values and records the ELBO, the gradient norm and a skipped flag.

# %%
rows = []
for r in RUNS:
    for impl in r["implementations"]:
        if impl == "floor":
            continue
        ratios = [c["impls"][impl]["ratio_to_floor"] for c in r["configs"] if impl in c["impls"]]
        if ratios:
            rows.append([name(r), LABELS[impl], f"{geomean(ratios):.2f}",
                         f"{min(ratios):.2f} to {max(ratios):.2f}", len(ratios)])
display(md_table(["run", "implementation", "geometric mean ratio", "range", "configurations"],
                 rows))

# %% [markdown]
# ## Time per step against d and against S
#
# Bayesian linear regression, the reparameterization estimator (the one all four
# implementations offer), everything else held at the run's most common value.
# Solid lines: mean-field; dashed: full-rank. Log-log axes.


# %%
def sweep(run, axis):
    cfgs = [c for c in run["configs"]
            if c["config"]["model"] == "blr" and c["config"]["estimator"] == "reparam"]
    fixed = {k: Counter(c["config"][k] for c in cfgs).most_common(1)[0][0]
             for k in ("n", "d", "num_samples") if k != axis}
    return [c for c in cfgs if all(c["config"][k] == v for k, v in fixed.items())], fixed


fig, axes = plt.subplots(len(RUNS), 2, figsize=(13, 4.5 * len(RUNS)), squeeze=False)
for row, run in zip(axes, RUNS):
    for ax, axis, xlabel in zip(row, ("d", "num_samples"), ("dimension d", "draws per step S")):
        cfgs, fixed = sweep(run, axis)
        for impl in run["implementations"]:
            for fam, style in STYLE.items():
                pts = sorted((c["config"][axis], 1e6 * c["impls"][impl]["steady_s_per_step"])
                             for c in cfgs if c["config"]["family"] == fam and impl in c["impls"])
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=COLORS[impl],
                            label=f"{LABELS[impl]}, {fam.replace('_', '-')}")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="time per step (microseconds)")
        held = ", ".join(f"{'S' if k == 'num_samples' else k} = {v}" for k, v in fixed.items())
        ax.set_title(f"{name(run)}: BLR, reparam, {held}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Every configuration: ratio to the floor, compile time and memory
#
# Left: steady-state time per step over the floor's (1 = the hand-written loop). Middle:
# the time JAX spent tracing, lowering and compiling during a cold fit (from JAX's
# monitoring events). Right: the memory XLA's analysis gives for the compiled program
# (arguments, outputs and temporaries).

# %%
for run in RUNS:
    cfgs = run["configs"]
    impls = run["implementations"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.32 * len(cfgs) + 2.5), sharey=True)
    ys = range(len(cfgs))
    panels = [
        ("ratio_to_floor", lambda r: r["ratio_to_floor"], "time per step / floor's"),
        ("compile_s", lambda r: r["compile_s"], "compile time of a cold fit (s)"),
        ("memory", lambda r: r["memory"]["peak_bytes"] / 2**20 if r.get("memory") else None,
         "compiled program memory (MiB)"),
    ]
    for ax, (_, value, xlabel) in zip(axes, panels):
        for impl in impls:
            pts = [(value(c["impls"][impl]), y) for y, c in zip(ys, cfgs)
                   if impl in c["impls"] and value(c["impls"][impl]) is not None]
            if pts:
                ax.plot(*zip(*pts), "o", color=COLORS[impl], label=LABELS[impl], alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].axvline(1.0, color="black", lw=1)
    axes[0].set_yticks(list(ys))
    axes[0].set_yticklabels([short(c) for c in cfgs], fontsize=7)
    axes[0].set_ylabel("configuration")
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{name(run)}: {run['machine']['cpu']} ({run['machine']['device']})")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Getting close to the optimum: exact KL gap against gradient evaluations
#
# For each configuration with a convergence run, the exact gap
# `KL(q || p) - min over the family of KL(q' || p)` (closed form for linear regression;
# for logistic regression the ELBO gap to the family's optimum by Gauss-Hermite
# quadrature) at every check, against the number of log-density gradient evaluations
# (steps x S). All implementations start from the same `N(0, 0.1^2 I)`. The dotted line is
# the tolerance the runner's table counts evaluations to. Lines that stop early reached it
# (or diverged: a gap that is not finite, stored as `null`, ends a line).
#
# The floor and `vijax.fit` use the same parameterization and draw the same noise
# (`fold_in(key, step)`), so their curves coincide: the wide grey band is the floor, and
# `vijax.fit`'s line runs along it. That they agree is a check that the floor does the
# same work as `vijax.fit`. NumPyro draws its own noise; Blackjax's mean-field family
# (scales through `exp` rather than `softplus`) happens to track the floor closely at these
# small scales, and its full-rank family (a Cholesky factor with an `exp` diagonal) is
# where the curves part.

# %%
for run in RUNS:
    cfgs = [c for c in run["configs"]
            if any("convergence" in r for r in c["impls"].values())]
    if not cfgs:
        continue
    cols = 4
    rows_ = math.ceil(len(cfgs) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.5 * cols, 3.4 * rows_), squeeze=False)
    for ax, c in zip(axes.flat, cfgs):
        s = c["config"]["num_samples"]
        for impl, r in c["impls"].items():
            conv = r.get("convergence")
            if conv is None:
                continue
            pts = [(step * s, gap) for step, gap in conv["trace"]
                   if step > 0 and gap is not None and gap > 0]
            if pts:  # the floor drawn wide underneath: vijax.fit's curve lies on it
                ax.plot(*zip(*pts), color=COLORS[impl], label=LABELS[impl],
                        lw=4 if impl == "floor" else 1.2, alpha=0.35 if impl == "floor" else 1,
                        zorder=1 if impl == "floor" else 2)
        ax.axhline(run["settings"]["tol"], color="gray", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="gradient evaluations (steps x S)",
               ylabel="exact KL gap (nats)")
        ax.set_title(short(c), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(cfgs):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{name(run)}: convergence with {run['settings']['optimizer']}")
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Gradient evaluations to tolerance
#
# The number of evaluations until the gap stays below the tolerance (for three
# consecutive checks), as the runner's markdown reports it; `>` means not reached within
# the step budget, with the gap at the end.

# %%
for run in RUNS:
    impls = run["implementations"]
    rows = []
    for c in run["configs"]:
        cells = []
        for impl in impls:
            conv = c["impls"].get(impl, {}).get("convergence")
            if conv is None:
                cells.append("—")
            elif conv["reached"]:
                cells.append(str(conv["evals"]))
            elif conv["final_gap"] is None:
                cells.append("diverged")
            else:
                cells.append(f"> {conv['max_steps'] * c['config']['num_samples']} "
                             f"(gap {conv['final_gap']:.3g})")
        if any(cell != "—" for cell in cells):
            rows.append([short(c)] + cells)
    display(Markdown(f"**{name(run)}**, tolerance {run['settings']['tol']} nats"))
    display(md_table(["configuration"] + [LABELS[i] for i in impls], rows))

# %% [markdown]
# ## The other benchmark reports
#
# The repository's other benchmarks (`python -m benchmarks.<name>`) write their own
# markdown next to their JSON; here they are as stored.

# %%
def demote_headings(text):
    """Turns the report's headings into small ones so they nest under this section."""
    return "\n".join("#### " + line.lstrip("#").strip() if line.startswith("#") else line
                     for line in text.splitlines())


for md in sorted(RESULTS.glob("*/*.md")):
    if md.name.startswith("suite_"):
        continue
    display(Markdown(f"---\n**`{md.relative_to(RESULTS.parent.parent)}`**\n\n"
                     + demote_headings(md.read_text())))
