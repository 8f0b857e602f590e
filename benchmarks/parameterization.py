"""How the full-rank parameterization decides where plain Adam ends up.

Bayesian linear regression, n = 1000, d = 100, S = 8 reparameterized samples,
Adam(1e-2), 3000 steps, as a new user would run it. Reports the exact
KL(q || p(z | x)) at the end for several full-rank parameterizations (the
library's ``vijax.full_rank`` and alternatives written out here), for the
``reparam`` and ``stl`` estimators, and NumPyro's ``AutoMultivariateNormal``
when NumPyro is installed. Every row uses the same optimization keys.

Run: ``python -m benchmarks.parameterization [--steps 3000] [--keys 8]`` (about 6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vijax
from benchmarks import _machine


def make_problem(seed: int, n: int = 1000, d: int = 100):
    kx, kw, ke = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, d))
    w = jax.random.normal(kw, (d,))
    y = x @ w + jax.random.normal(ke, (n,))
    return x, y, vijax.models.bayesian_linear_regression(x, y, noise_scale=1.0, prior_scale=1.0)


def _softplus_inv(y):
    return float(np.log(np.expm1(y)))


# Alternative parameterizations, (init(d, init_scale), tril(params)).
def _chol_softplus_diag():
    def init(d, s):
        return {"raw": jnp.full((d,), _softplus_inv(s)), "m": jnp.zeros((d, d))}
    def tril(p):
        return jnp.tril(p["m"], -1) + jnp.diag(jax.nn.softplus(p["raw"]))
    return init, tril


def _scaled_cols():
    def init(d, s):
        return {"raw": jnp.full((d,), _softplus_inv(s)), "m": jnp.zeros((d, d))}
    def tril(p):
        d = p["raw"].shape[0]
        return (jnp.tril(p["m"], -1) + jnp.eye(d)) * jax.nn.softplus(p["raw"])[None, :]
    return init, tril


ALTERNATIVES = {
    "cholesky, softplus diagonal": _chol_softplus_diag,
    "unit lower, columns scaled": _scaled_cols,
}


def run_alternative(name, model, *, init_scale, steps, num_samples, lr, key):
    init, tril_fn = ALTERNATIVES[name]()
    d = model.latent.shape[0]
    params = {"loc": jnp.zeros((d,)), **init(d, init_scale)}
    opt = optax.adam(lr)

    def neg_elbo(p, k):
        tril = tril_fn(p)
        q = vijax.Gaussian(p["loc"], vijax.CholeskyScale(tril))
        z = q.sample(k, (num_samples,))
        return -(jnp.mean(jax.vmap(model.log_joint)(z) - q.log_prob(z)))

    @jax.jit
    def run(params, key):
        def step(carry, k):
            p, s = carry
            g = jax.grad(neg_elbo)(p, k)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
        return p

    p = run(params, key)
    q = vijax.Gaussian(p["loc"], vijax.CholeskyScale(tril_fn(p)))
    return float(vijax.gaussian_kl(q, model.posterior))


def run_vijax(model, *, init_scale, steps, num_samples, lr, key, estimator="reparam",
              uniform_loc=False):
    family = vijax.full_rank(init_scale=init_scale)
    opt = optax.adam(lr)
    latent = model.latent
    if uniform_loc:  # NumPyro's default init_to_uniform: loc ~ U(-2, 2)
        latent = jax.random.uniform(jax.random.fold_in(key, 7), latent.shape, minval=-2.0, maxval=2.0)

    @jax.jit
    def run(params, key):
        def step(carry, k):
            p, s = carry
            g = jax.grad(lambda p: -vijax.elbo(
                k, p, family, model.log_joint, num_samples=num_samples, estimator=estimator))(p)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(step, (params, opt.init(params)), jax.random.split(key, steps))
        return p

    p = run(family.init(latent), key)
    return float(vijax.exact_kl(p, family, model))


def run_numpyro(x, y, model, *, init_scale, steps, num_samples, lr, key):
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal

    d = x.shape[1]

    def np_model(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.zeros(d), 1.0).to_event(1))
        numpyro.sample("y", dist.Normal(x @ w, 1.0), obs=y)

    guide = AutoMultivariateNormal(np_model, init_scale=init_scale)
    svi = SVI(np_model, guide, numpyro.optim.optax_to_numpyro(optax.adam(lr)),
              Trace_ELBO(num_particles=num_samples, vectorize_particles=True))
    res = svi.run(key, steps, x, y, progress_bar=False)
    post = guide.get_posterior(res.params)
    q = vijax.Gaussian(post.loc, vijax.CholeskyScale(post.scale_tril))
    return float(vijax.gaussian_kl(q, model.posterior))


VARIANTS = [
    # (label, init_scale, runner)
    ("cholesky, softplus diagonal", 1.0, "alt"),
    ("cholesky, softplus diagonal", 0.1, "alt"),
    ("unit lower, columns scaled", 0.1, "alt"),
    ("vijax.full_rank (unit lower, rows scaled), reparam", 1.0, "vijax"),
    ("vijax.full_rank (unit lower, rows scaled), reparam", 0.1, "vijax"),
    ("vijax.full_rank, reparam, loc started like NumPyro (U(-2, 2))", 0.1, "vijax-uniform"),
    ("vijax.full_rank, stl", 0.1, "vijax-stl"),
    ("numpyro AutoMultivariateNormal, Trace_ELBO", 0.1, "numpyro"),
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--keys", type=int, default=8, help="optimization keys (one data set)")
    parser.add_argument("--out", default="benchmarks/results/cpu")
    args = parser.parse_args(argv)
    common = dict(steps=args.steps, num_samples=8, lr=1e-2)
    x, y, model = make_problem(0)
    rows = {}
    t0 = time.perf_counter()
    for i in range(args.keys):
        key = jax.random.key(1000 + i)
        for label, init_scale, runner in VARIANTS:
            if runner == "alt":
                name = label
                kl = run_alternative(name, model, init_scale=init_scale, key=key, **common)
            elif runner == "numpyro":
                try:
                    kl = run_numpyro(x, y, model, init_scale=init_scale, key=key, **common)
                except ImportError:
                    continue
            else:
                kl = run_vijax(model, init_scale=init_scale, key=key,
                               estimator="stl" if runner == "vijax-stl" else "reparam",
                               uniform_loc=runner == "vijax-uniform", **common)
            rows.setdefault((label, init_scale), []).append(kl)
        print(f"key {i} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    write(rows, _machine.describe(), args.steps, args.keys, args.out)


def render(rows, machine, steps, keys) -> str:
    """The markdown report; runs that ended non-finite are counted, not averaged."""
    table = ["| parameterization / estimator | init scale | final exact KL, mean ± s.e. over keys |",
             "|---|---:|---:|"]
    for (name, s), kls in rows.items():
        kls = np.asarray(kls, dtype=float)
        ok = kls[np.isfinite(kls)]
        se = np.std(ok, ddof=1) / np.sqrt(len(ok)) if len(ok) > 1 else float("nan")
        cell = f"{np.mean(ok):.3f} ± {se:.3f}" if len(ok) else "—"
        if len(ok) < len(kls):
            cell += f" ({len(kls) - len(ok)} of {len(kls)} runs ended in NaN)"
        table.append(f"| {name} | {s} | {cell} |")
    return (f"# Full-rank parameterization under Adam\n\nBayesian linear regression n = 1000, d = 100, "
            f"S = 8, Adam(1e-2), {steps} steps, one data set, {keys} optimization keys "
            f"(the same keys for every row). Exact KL(q || p(z | x)) at the last step.\n\n"
            f"Machine: {_machine.one_line(machine)}\n\n" + "\n".join(table) + "\n")


def write(rows, machine, steps, keys, out) -> None:
    import os
    md = render(rows, machine, steps, keys)
    print(md)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "parameterization.md"), "w") as f:
        f.write(md)
    with open(os.path.join(out, "parameterization.json"), "w") as f:
        json.dump({"machine": machine, "steps": steps, "keys": keys,
                   "results": [{"variant": n, "init_scale": s, "kl": k} for (n, s), k in rows.items()]},
                  f, indent=1)


if __name__ == "__main__":
    main()
