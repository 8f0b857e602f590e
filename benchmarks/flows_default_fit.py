"""The default fit (no optimizer) on flow families: its first step scaled by the base's d, against 0.1.

``vijax.fit(key, flow, log_joint, flow.init(latent), num_steps=20000)`` with
no optimizer: ``vijax.adaptive_lr(optax.adam(lr))`` under the default
stopping rule, ``lr = vijax.fitting._drivers.default_learning_rate(init)``
(``0.1 sqrt(2 d / P)``, d the flow's base's dimension, P its parameters:
**after**). **Before** (flows' step until this benchmark's commit): the same
call with ``optimizer=vijax.adaptive_lr(optax.adam(0.1))``, which gives the
same fit as the default did then (the stopping rule is on for any
``adaptive_lr``; flows take no control variate and no antithetic draws, and
8 draws per step either way).

**Targets**, both normalized (``log Z = 0``, so KL(q || p) = -ELBO):

* ``banana``: ``z1 ~ N(0, 1)``, ``z2 | z1 ~ N(z1^2 - 1, 0.5)``, variance 0.5
  (a 2-d latent; ``notebooks/06_flows``'s has variance 0.25);
* ``gaussian pytree``: ``{"a": (3,), "b": (2, 2)}``, ``a ~ N(1, 2^2)``,
  ``b | a ~ N(a_0, 0.5^2)`` (d = 7, a Gaussian posterior a flow can match).

**Flows**: ``vijax.flows.affine_coupling()``, ``autoregressive()`` and
``spline_coupling()`` at their defaults; fit keys 0, 1 and 2. **Measured**:
the KL from ``vijax.diagnose`` (4,000 draws, key 5, with its standard
error), k-hat, the steps, whether the rule stopped the fit, skipped steps,
and wall time (compilation included for the first call of each flow and
target). The two settings alternate per fit (before, after) so that the
machine's load hits both alike.

Run ``python -m benchmarks.flows_default_fit [--out DIR]``: writes
``benchmarks/results/cpu/flows_default_fit.{json,md}`` (about 3 minutes on
2 cores).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy import stats

import vijax
from benchmarks import _machine
from vijax.fitting import _drivers

NUM_STEPS = 20_000
KEYS = (0, 1, 2)


def banana(z):
    return stats.norm.logpdf(z[0]) + stats.norm.logpdf(z[1], z[0] ** 2 - 1.0, jnp.sqrt(0.5))


def gaussian_pytree(z):
    return (stats.norm.logpdf(z["a"], 1.0, 2.0).sum()
            + stats.norm.logpdf(z["b"], z["a"][0], 0.5).sum())


TARGETS = {
    "banana": (banana, jnp.zeros(2)),
    "gaussian pytree": (gaussian_pytree, {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}),
}
FLOWS = {
    "affine_coupling": vijax.flows.affine_coupling,
    "autoregressive": vijax.flows.autoregressive,
    "spline_coupling": vijax.flows.spline_coupling,
}
BEFORE = vijax.adaptive_lr(optax.adam(0.1))  # one object: one compiled chunk per flow


def one_fit(flow, log_joint, latent, key: int, setting: str) -> dict:
    init = flow.init(latent)
    optimizer = BEFORE if setting == "before" else None
    t0 = time.perf_counter()
    res = vijax.fit(jax.random.key(key), flow, log_joint, init, num_steps=NUM_STEPS,
                    optimizer=optimizer, progress=False)
    jax.block_until_ready(res.params)
    wall = time.perf_counter() - t0
    d = vijax.diagnose(jax.random.key(5), res.params, flow, log_joint)
    return dict(setting=setting, key=key, steps=int(res.state.step),
                stopped_by_rule=bool(res.stopped_early), skipped=int(res.num_skipped),
                first_step=0.1 if setting == "before" else _drivers.default_learning_rate(init),
                kl=float(-d.elbo), kl_se=float(d.elbo_se), khat=float(d.khat),
                wall_s=round(wall, 2))


def run() -> dict:
    rows = []
    for target, (log_joint, latent) in TARGETS.items():
        for name, make in FLOWS.items():
            flow = make()
            for key in KEYS:
                for setting in ("before", "after") if key % 2 == 0 else ("after", "before"):
                    row = dict(target=target, flow=name, **one_fit(flow, log_joint, latent,
                                                                    key, setting))
                    print(f"{target:16s} {name:16s} key {key} {setting:6s} "
                          f"KL {row['kl']:.4g} steps {row['steps']} "
                          f"rule {row['stopped_by_rule']} {row['wall_s']} s", flush=True)
                    rows.append(row)
    return dict(rows=rows)


def markdown(results: dict) -> str:
    rows = results["rows"]
    lines = [
        "# The default fit on flows: first step from the base's d, against 0.1",
        "",
        f"Written by `python -m benchmarks.flows_default_fit`; the protocol is its module "
        f"docstring. vijax commit `{results['vijax_commit']}`. Float32. "
        f"Machine: {_machine.one_line(results['machine'])}.",
        "",
    ]
    for setting in ("before", "after"):
        kl = np.array([r["kl"] for r in rows if r["setting"] == setting])
        rule = sum(r["stopped_by_rule"] for r in rows if r["setting"] == setting)
        lines.append(f"- **{setting}**: KL {kl.min():.3g} to {kl.max():.3g} nats over "
                     f"{kl.size} fits; {rule} of {kl.size} stopped by the rule; "
                     f"{int(np.sum(kl < 0.05))} within 0.05 nats.")
    lines += ["", "| target | flow | key | first step | KL (nats) | k-hat | steps | stopped by "
              "| skipped | wall s |", "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['target']} | {r['flow']} | {r['key']} | {r['first_step']:.2g} "
            f"({r['setting']}) | {r['kl']:.4g} ± {r['kl_se']:.2g} | {r['khat']:.2f} | "
            f"{r['steps']:,} | {'rule' if r['stopped_by_rule'] else 'step cap'} | "
            f"{r['skipped']} | {r['wall_s']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("benchmarks", "results", "cpu"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    results = run()
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    results.update(machine=_machine.describe(), vijax_commit=commit,
                   total_wall_s=round(time.perf_counter() - t0, 1))
    _machine.write_results(args.out, "flows_default_fit", results, markdown(results))
    print(f"wrote {args.out}/flows_default_fit.{{json,md}}")


if __name__ == "__main__":
    main()
