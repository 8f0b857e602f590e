"""Batch-and-match's trust region: plain, fixed radius, adaptive radius (issue #19 item 2).

Evaluations of log p (steps x B) until KL(q || posterior) < 0.01 on
``benchmarks.fast_vi``'s Bayesian linear regression problems (d = 10, 100,
500; B = d and 2d; float64; the family's default start; key 0), for three
variants of ``vijax.algorithms.bam_algorithm``:

* ``plain``: ``max_kl=None``, the paper's update;
* ``fixed radius``: ``max_kl=1`` with the radius kept at 1 nat per coordinate
  (the rule before the radius adapted: ``GROW = 1`` in
  ``vijax.algorithms._score``);
* ``adaptive``: the default, ``max_kl=1`` as the starting radius, grown by
  half after each accepted step (up to 100x) and quartered when the batch
  ELBO drops beyond three standard errors (the step is then undone).

The ``fixed radius`` column must reproduce the counts recorded in
``results/cpu/fast_vi.md`` for the trust region (a check of the protocol).
Accuracy on the zoo (stochastic volatility, item response, funnel, ...) is
measured by ``python -m benchmarks.zoo_accuracy --methods "vijax BaM"``.

Run: ``python -m benchmarks.bam_trust_region`` (about a minute).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

OUT = "benchmarks/results/cpu"
VARIANTS = (("plain", None, 1.0), ("fixed radius", 1.0, 1.0), ("adaptive", 1.0, None))


def run() -> list:
    import vijax
    import vijax.algorithms._score as score
    from benchmarks import fast_vi

    default_grow = score.GROW
    rows = []
    for d in (10, 100, 500):
        model = fast_vi.blr(d)
        log_joint = fast_vi._LogJoint(model.log_joint, model.latent)
        family = vijax.full_rank()
        dist = jax.jit(lambda p: vijax.gaussian_kl(family.to_gaussian(p), model.posterior))
        for batch in (d, 2 * d):
            row = {"d": d, "batch_size": batch}
            for label, max_kl, grow in VARIANTS:
                score.GROW = default_grow if grow is None else grow
                try:
                    algorithm = vijax.algorithms.bam_algorithm(
                        log_joint, batch_size=batch, max_kl=max_kl)
                    state = algorithm.init(jax.random.key(0), family.init(jnp.zeros(d)))
                    steps, last = fast_vi.first_hit(
                        algorithm.step, state, dist, every=1,
                        max_steps=max(60, 24 * d // batch), tol=1e-2)
                finally:
                    score.GROW = default_grow
                row[label] = {"evals": None if steps is None else steps * batch,
                              "last_kl": last}
            print(row, flush=True)
            rows.append(row)
    return rows


def render(rows, machine) -> str:
    lines = [
        "# Batch-and-match: plain, fixed trust radius, adaptive trust radius",
        "",
        "Evaluations of log p to KL < 0.01 on `benchmarks.fast_vi`'s Bayesian linear "
        "regression (float64, default start, key 0). See `benchmarks/bam_trust_region.py`.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, jax {machine['jax']}, "
        f"Python {machine['python']}",
        "",
        "| d | B | plain (`max_kl=None`) | fixed radius 1 (the old default) | adaptive (default) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = []
        for label, _, _ in VARIANTS:
            v = r[label]
            cells.append(str(v["evals"]) if v["evals"] is not None
                         else f"not reached (KL {v['last_kl']:.3g})")
        lines.append(f"| {r['d']} | {r['batch_size']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    from benchmarks import _machine

    jax.config.update("jax_enable_x64", True)
    rows = run()
    machine = _machine.describe()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "bam_trust_region.json"), "w") as f:
        json.dump({"machine": machine, "rows": rows}, f, indent=1)
    with open(os.path.join(OUT, "bam_trust_region.md"), "w") as f:
        f.write(render(rows, machine))
    print(render(rows, machine))


if __name__ == "__main__":
    main()
