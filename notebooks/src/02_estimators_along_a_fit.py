# %% [markdown]
# # Gradient estimators along a fit
#
# **Question.** Notebook 01 compared the Monte Carlo gradient estimators of the ELBO at one
# fixed q. An optimizer sees them at every q along its path, from far away to the optimum.
# How do their variance and signal-to-noise ratio change along that path, what exact KL does
# each estimator reach with each variational family, and where does mean-field get stuck when
# the posterior is correlated?
#
# **Answer.** Far from the optimum the three pathwise estimators are nearly the same (the
# mean's gradient dominates) and the score-function estimator is 200 times noisier. Near the
# optimum they separate. The variance of `reparam` stays at its plateau (about 1000 here) while
# the signal, ‖∇KL‖, goes to zero, so its SNR collapses; `stl`'s variance falls with the KL
# and is zero (1e-26) at the exact posterior. With its leave-one-out baseline the score
# estimator's variance also vanishes at the exact posterior (every draw then has the same
# `log p − log q`); without a baseline (S = 1) it stays near 3e7. This shows in the fits:
# with Adam(0.01) and S = 8 the full-rank fit driven by `stl` ends 0.02 nats from the
# posterior and keeps improving, while `reparam` stalls near 0.1-0.2 nats. Mean-field cannot
# go below the closed-form best mean-field KL of 5.98 nats on this correlated posterior, and
# every estimator ends within 0.15 nats of it (score within 0.7); there `stl`'s variance does
# not vanish, because q is not the posterior.

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from IPython.display import Markdown, display

import vijax

# float64 so that exact KLs of a few 1e-6 nats (and zero variances at the optimum) are not
# rounding noise.
jax.config.update("jax_enable_x64", True)


def md_table(headers, rows):
    """A markdown table from already-formatted cells ("|" inside a cell is escaped)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return Markdown("\n".join([line(headers), "|" + "---:|" * len(headers)] + [line(r) for r in rows]))

# %% [markdown]
# ## The model: a correlated posterior
#
# Bayesian linear regression with d = 8 strongly correlated features and n = 60
# observations: `w ~ N(0, I)`, `y | w ~ N(X w, 0.5^2 I)`. The posterior precision is
# `Λ = X^T X / 0.5^2 + I`; `model.posterior` stores its Cholesky factor.

# %%
D, N = 8, 60
kx, kw, ke = jax.random.split(jax.random.key(0), 3)
latent_factors = jax.random.normal(kx, (N, 2))
X = 0.5 * jax.random.normal(jax.random.fold_in(kx, 1), (N, D)) + latent_factors @ jax.random.normal(
    jax.random.fold_in(kx, 2), (2, D))
y = X @ jax.random.normal(kw, (D,)) + 0.5 * jax.random.normal(ke, (N,))
model = vijax.models.bayesian_linear_regression(X, y, noise_scale=0.5, prior_scale=1.0)

posterior = model.posterior
prec_tril = posterior.scale.tril
precision = prec_tril @ prec_tril.T
cov = posterior.cov
sd = jnp.sqrt(jnp.diagonal(cov))
corr = cov / jnp.outer(sd, sd)
print(f"log p(y) = {float(model.log_evidence):.4f}")
print(f"largest |posterior correlation| = {float(jnp.max(jnp.abs(corr - jnp.eye(D)))):.3f}")
print(f"posterior sds:           {np.round(np.asarray(sd), 4)}")
print(f"1 / sqrt(diag precision): {np.round(np.asarray(1 / jnp.sqrt(jnp.diagonal(precision))), 4)}")

# %% [markdown]
# **The best mean-field KL has a closed form.** For a Gaussian posterior `N(m, Λ^{-1})`, the
# mean-field q that minimizes KL(q || p) has mean `m` and variances `1 / Λ_ii`, the
# *conditional* variances, which are smaller than the marginal ones when the coordinates are
# correlated (the sds above). Its KL is the floor no mean-field fit can go below:

# %%
best_mf = vijax.Gaussian.diagonal(posterior.mean, 1.0 / jnp.sqrt(jnp.diagonal(precision)))
KL_MF_BEST = float(vijax.gaussian_kl(best_mf, posterior))
print(f"min over mean-field q of KL(q || p) = {KL_MF_BEST:.4f} nats")
# The same number as 0.5 * (sum log Λ_ii - log det Λ):
check = 0.5 * (jnp.sum(jnp.log(jnp.diagonal(precision))) - 2 * jnp.sum(jnp.log(jnp.diagonal(prec_tril))))
print(f"0.5 (sum_i log Λ_ii − log det Λ)  = {float(check):.4f} nats")

# %% [markdown]
# ## 1. Exact KL against step, for each estimator and family
#
# `vijax.fit` runs Adam (learning rate 0.01, S = 8 draws per step, 4000 steps) on `−elbo`
# with the chosen gradient estimator. A fit can be continued from `result.state`, bitwise as
# if it had never stopped, so we stop it at log-spaced steps and evaluate the *exact* KL of
# the current q in closed form (the fit itself never sees it).
#
# For the mean-field and full-rank families, `closed_entropy` gives exactly the same gradient
# as `reparam` (notebook 01 explains why), so its fit would repeat `reparam`'s; we run it only
# for `low_rank`, where the two differ. (Section 2 shows the identical columns.)

# %%
FAMILIES = {"mean_field": vijax.mean_field(), "low_rank(rank=2)": vijax.low_rank(rank=2),
            "full_rank": vijax.full_rank()}
ESTIMATORS = ("reparam", "closed_entropy", "stl", "score")
RUNS = {"mean_field": ("reparam", "stl", "score"),
        "low_rank(rank=2)": ESTIMATORS,
        "full_rank": ("reparam", "stl", "score")}
NUM_STEPS, NUM_SAMPLES = 4000, 8
optimizer = optax.adam(1e-2)
checkpoints = [1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1000,
               1500, 2000, 3000, 4000]
exact_kl = {name: jax.jit(lambda p, f=f: vijax.exact_kl(p, f, model)) for name, f in FAMILIES.items()}

curves, snapshots = {}, {}
for fname, estimators in RUNS.items():
    family = FAMILIES[fname]
    init = family.init(model.latent)
    for est in estimators:
        kls, state, done = [float(exact_kl[fname](init))], init, 0
        snaps = {0: init}
        for target in checkpoints:
            result = vijax.fit(jax.random.key(1) if done == 0 else None, family, model.log_joint,
                               state, optimizer=optimizer, num_steps=target - done,
                               num_samples=NUM_SAMPLES, estimator=est, progress=False)
            state, done = result.state, target
            kls.append(float(exact_kl[fname](result.params)))
            snaps[done] = result.params
        curves[fname, est] = np.array(kls)
        snapshots[fname, est] = snaps
steps = np.array([0] + checkpoints)

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 4), sharey=True)
for ax, fname in zip(axes, FAMILIES):
    for est in RUNS[fname]:
        ls = "--" if est == "closed_entropy" else "-"
        ax.loglog(steps + 1, curves[fname, est], ls, marker=".", label=est)
    if fname == "mean_field":
        ax.axhline(KL_MF_BEST, color="k", ls=":", label="best mean-field KL (closed form)")
    ax.set_title(fname)
    ax.set_xlabel("Adam step + 1")
    ax.legend(fontsize=8)
axes[0].set_ylabel("exact KL(q || p)  (nats)")
fig.suptitle(f"Exact KL along Adam(0.01) fits, S = {NUM_SAMPLES} draws per step")
fig.tight_layout()
plt.show()

rows = []
for fname in FAMILIES:
    rows.append([fname] + [f"{curves[fname, est][-1]:.4f}" if (fname, est) in curves
                           else "= reparam" for est in ESTIMATORS])
rows.append(["best mean-field (closed form)", f"{KL_MF_BEST:.4f}", "", "", ""])
display(Markdown(f"Exact KL(q || p) in nats after {NUM_STEPS} steps:"))
display(md_table(["family"] + list(ESTIMATORS), rows))

# %% [markdown]
# ## 2. Variance and SNR along the trajectory
#
# We take snapshots of the `stl` fits (the q an optimizer actually visits) and at each run
# `vijax.compare_gradients`: 500 replicates of every estimator with S = 8 (and S = 1) draws,
# against the exact −∇KL. For the full-rank family we add the exact posterior itself
# (KL = 0), where the family can land; for mean-field, the best mean-field q (KL = 5.98).

# %%
def full_rank_params(family, gaussian):
    """Full-rank params whose Gaussian is ``gaussian`` (unit lower factor, softplus scales)."""
    chol = jnp.linalg.cholesky(gaussian.cov)
    s = jnp.diagonal(chol)
    return family.init(model.latent)._replace(
        loc=gaussian.mean, raw_scale=s + jnp.log(-jnp.expm1(-s)),
        off_diag=chol / s[:, None] - jnp.eye(D))


def mean_field_params(family, gaussian):
    s = jnp.sqrt(gaussian.variance)
    return family.init(model.latent)._replace(loc=gaussian.mean, raw_scale=s + jnp.log(-jnp.expm1(-s)))


SNAPSHOT_STEPS = (0, 10, 100, 1000, NUM_STEPS)
along = {
    "full_rank": [(t, snapshots["full_rank", "stl"][t]) for t in SNAPSHOT_STEPS]
    + [("posterior", full_rank_params(FAMILIES["full_rank"], posterior))],
    "mean_field": [(t, snapshots["mean_field", "stl"][t]) for t in SNAPSHOT_STEPS]
    + [("best MF", mean_field_params(FAMILIES["mean_field"], best_mf))],
}
stats = {}
for fname, snaps in along.items():
    # S = 1 as well for full rank: there the score estimator has no baseline.
    counts = (1, NUM_SAMPLES) if fname == "full_rank" else (NUM_SAMPLES,)
    for label, params in snaps:
        cmp = vijax.compare_gradients(jax.random.key(5), params, FAMILIES[fname], model,
                                      estimators=ESTIMATORS, num_samples=counts,
                                      num_replicates=500)
        stats[fname, label] = (float(exact_kl[fname](params)), cmp)

# %%
for fname in along:
    rows = []
    for (f, label), (kl, cmp) in stats.items():
        if f != fname:
            continue
        j = cmp.num_samples.index(NUM_SAMPLES)
        extra = [f"{cmp.variance[3, 0]:.2e}"] if fname == "full_rank" else []
        rows.append([label, f"{kl:.2e}", f"{cmp.reference_norm:.2e}"]
                    + [f"{v:.2e}" for v in cmp.variance[:, j]] + extra
                    + [f"{v:.3g}" for v in cmp.snr[:, j]])
    display(Markdown(f"**{fname}**, along the `stl` fit. Variance = tr Cov g over 500 "
                     f"replicates, SNR = ||E g|| / sqrt(tr Cov g); S = {NUM_SAMPLES} unless marked."))
    extra = ["var score S=1"] if fname == "full_rank" else []
    display(md_table(["step", "exact KL", "||∇KL||"] + [f"var {e}" for e in ESTIMATORS]
                     + extra + [f"SNR {e}" for e in ESTIMATORS], rows))

# %%
def snapshot_axis(ax, fname):
    items = [(lab, kl) for (f, lab), (kl, _) in stats.items() if f == fname]
    ax.set_xticks(range(len(items)),
                  [f"{'step ' if isinstance(lab, int) else ''}{lab}\nKL {max(kl, 0):.2g}"
                   for lab, kl in items], fontsize=8)
    ax.set_xlabel("snapshot along the stl fit (exact KL in nats)")


fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
for fname, ax in zip(along, axes[:2]):
    cmps = [cmp for (f, _), (_, cmp) in stats.items() if f == fname]
    j = cmps[0].num_samples.index(NUM_SAMPLES)
    x = np.arange(len(cmps))
    for i, est in enumerate(ESTIMATORS):
        var = [max(c.variance[i, j], 1e-30) for c in cmps]
        ax.semilogy(x, var, "--" if est == "closed_entropy" else "-", marker="o",
                    label=f"{est}, S={NUM_SAMPLES}")
    if fname == "full_rank":
        ax.semilogy(x, [c.variance[3, 0] for c in cmps], ":", marker="x", color="C3",
                    label="score, S=1 (no baseline)")
    snapshot_axis(ax, fname)
    ax.set_ylabel("variance tr Cov g  (floored at 1e-30)")
    ax.set_title(f"{fname}: gradient variance along the fit")
    ax.legend(fontsize=8)
ax = axes[2]
cmps = [cmp for (f, _), (_, cmp) in stats.items() if f == "full_rank"][:-1]  # SNR is 0/0 at q = p
j = cmps[0].num_samples.index(NUM_SAMPLES)
for i, est in enumerate(ESTIMATORS):
    ax.semilogy(range(len(cmps)), [c.snr[i, j] for c in cmps],
                "--" if est == "closed_entropy" else "-", marker="o", label=f"{est}, S={NUM_SAMPLES}")
snapshot_axis(ax, "full_rank")
ax.set_xlim(-0.3, len(cmps) - 0.7)
ax.set_ylabel("SNR ||E g|| / sqrt(tr Cov g)")
ax.set_title("full_rank: SNR along the fit")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Reading the tables: at step 0 every pathwise estimator has about the same variance, and
# SNR above 10. By step 4000 (KL 0.02) `reparam` and `closed_entropy` have a variance of
# about 1000 for a signal of norm 1.7, an SNR of 0.03; `stl`'s variance is 8.7 and its SNR
# 0.56. At the posterior, `stl` and the S = 8 score estimator both have zero variance to
# rounding, and the S = 1 score estimator, with no baseline, does not.
#
# ## What we learned
#
# * Where an estimator's variance goes near the optimum decides where a fixed-step fit ends:
#   `reparam`'s noise does not shrink with the KL, so Adam hovers at a noise floor, while
#   `stl`'s shrinks with the KL and the full-rank fit keeps approaching the posterior.
# * STL's variance vanishes only when q *is* the posterior. At the best mean-field q on a
#   correlated posterior it stays at about 2500, the same order as `reparam`'s.
# * The score-function estimator is hopeless far from the optimum (SNR below 1 from the first
#   step) and, with a leave-one-out baseline, surprisingly good near it: at KL 0.02 its
#   variance is 64 against `reparam`'s 1000, and it vanishes at q = p. Without a
#   baseline it never improves. Its fits are the slowest, and the low-rank one was thrown far
#   off (KL back up to hundreds of nats) near the end of this run.
# * The mean-field floor is a property of the family, not of the optimizer or estimator: it
#   is `0.5 (Σ log Λ_ii − log det Λ)`, 5.98 nats here, and every mean-field fit stops there.
