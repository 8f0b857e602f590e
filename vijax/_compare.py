"""Gradient-estimator diagnostics: bias, variance, SNR and cosine against an exact gradient.

:func:`compare_gradients` draws many independent replicates of each estimator
(one ``jax.jit``-compiled computation, ``vmap``-ped over replicates, that
computes every estimator from shared draws) and summarises them against a
reference gradient: ``-grad KL(q || p(z | x))`` in closed form for a
Gaussian-conjugate model, or a gradient you supply.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from vijax import _checks
from vijax._exact import exact_elbo, exact_kl
from vijax.families._protocol import VariationalFamily, check_family, entropy_fn
from vijax._format import markdown_table
from vijax._objectives import (
    ELBO_ESTIMATORS,
    GRADIENT_ESTIMATORS,
    check_estimator_names,
    estimator_gradients,
)
from vijax.models._model import Model

ArrayTree = Any

METRICS = ("bias_norm", "bias_stderr", "variance", "snr", "cosine", "relative_error")


class GradientComparison(NamedTuple):
    """Summary statistics of gradient estimators, indexed ``[estimator, num_samples]``.

    With ``g_r`` the flattened estimate of replicate ``r = 1..R``, ``m`` their
    mean and ``g*`` the reference gradient:

    Attributes:
      estimators: the estimator names (rows of every array).
      num_samples: the sample counts S (columns of every array).
      num_replicates: R, the number of independent replicates.
      bias_norm: ``||m - g*||``. It includes Monte Carlo error: an unbiased
        estimator gives about ``bias_stderr``.
      bias_stderr: ``sqrt(variance / R)``, the noise floor of ``bias_norm``
        (its root-mean-square value for an unbiased estimator).
      variance: the total variance, the trace of the covariance of ``g_r``
        over replicates (``ddof=1``).
      snr: the signal-to-noise ratio ``||m|| / sqrt(variance)`` (``inf`` for
        an estimator with zero variance and a non-zero mean).
      cosine: the mean over replicates of ``cos(g_r, g*)``, how well a single
        estimate points along the reference (a zero estimate counts as 0).
      relative_error: the root-mean-square relative error
        ``sqrt(mean_r ||g_r - g*||^2) / ||g*||``.
      reference_norm: ``||g*||``.
      reference_name: what ``g*`` is, e.g. ``"-grad KL"``.
    """

    estimators: tuple[str, ...]
    num_samples: tuple[int, ...]
    num_replicates: int
    bias_norm: np.ndarray
    bias_stderr: np.ndarray
    variance: np.ndarray
    snr: np.ndarray
    cosine: np.ndarray
    relative_error: np.ndarray
    reference_norm: float
    reference_name: str

    def at(self, estimator: str, num_samples: int) -> dict[str, float]:
        """Returns ``{metric: value}`` for one estimator and sample count."""
        if estimator not in self.estimators:
            raise ValueError(
                f"`estimator` must be one of {self.estimators}; got {estimator!r}."
            )
        if num_samples not in self.num_samples:
            raise ValueError(
                f"`num_samples` must be one of {self.num_samples}; got {num_samples!r}."
            )
        i = self.estimators.index(estimator)
        j = self.num_samples.index(num_samples)
        return {m: float(getattr(self, m)[i, j]) for m in METRICS}

    def headers(self, metrics: Sequence[str] = METRICS) -> list[str]:
        """Returns the column headers :meth:`to_markdown` uses for ``metrics``."""
        ref = self.reference_name
        names = {
            "bias_norm": "bias norm",
            "bias_stderr": "noise floor",
            "variance": "variance (tr Cov)",
            "snr": "SNR",
            "cosine": f"cos(g, {ref})",
            "relative_error": "rel. RMS error",
        }
        return [names[m] for m in metrics]

    def to_markdown(self, metrics: Sequence[str] = METRICS) -> str:
        """Returns a markdown table: one row per (estimator, S), one column per metric.

        Args:
          metrics: names from ``("bias_norm", "bias_stderr", "variance",
            "snr", "cosine", "relative_error")``, in column order.

        Raises:
          ValueError: an unknown metric name.
        """
        metrics = tuple(metrics)
        for m in metrics:
            if m not in METRICS:
                raise ValueError(f"`metrics` must be names from {METRICS}; got {m!r}.")
        rows = []
        for i, name in enumerate(self.estimators):
            for j, s in enumerate(self.num_samples):
                rows.append([name, str(s), *(getattr(self, m)[i, j] for m in metrics)])
        return markdown_table(["estimator", "S", *self.headers(metrics)], rows)

    def __str__(self) -> str:
        return self.to_markdown()


def _check_sample_counts(num_samples) -> tuple[int, ...]:
    if isinstance(num_samples, (int, np.integer)) and not isinstance(num_samples, bool):
        num_samples = (num_samples,)
    try:
        counts = tuple(num_samples)
    except TypeError:
        raise TypeError(
            f"`num_samples` must be an int or a sequence of ints >= 1; got {num_samples!r}."
        ) from None
    if not counts:
        raise ValueError("`num_samples` must hold at least one sample count; got ().")
    counts = tuple(_checks.check_positive_int("num_samples", s) for s in counts)
    if len(set(counts)) != len(counts):
        raise ValueError(f"`num_samples` must not repeat a count; got {counts}.")
    return counts


def _flat_reference(reference: ArrayTree, params: Any) -> jax.Array:
    ref_def = jax.tree_util.tree_structure(reference)
    params_def = jax.tree_util.tree_structure(params)
    if ref_def != params_def:
        raise ValueError(
            f"`reference` must have the structure of `params` {params_def}; got {ref_def}."
        )
    for path, r, p in zip(
        (kp for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]),
        jax.tree_util.tree_leaves(reference),
        jax.tree_util.tree_leaves(params),
    ):
        r = _checks.as_float_array(f"reference{jax.tree_util.keystr(path)}", r)
        if r.shape != jnp.shape(p):
            raise ValueError(
                f"`reference{jax.tree_util.keystr(path)}` must have shape "
                f"{tuple(jnp.shape(p))}; got {tuple(r.shape)}."
            )
    flat_ref, _ = ravel_pytree(reference)
    flat_params, _ = ravel_pytree(params)
    return flat_ref.astype(flat_params.dtype)


def _statistics(grads: jax.Array, ref: jax.Array) -> jax.Array:
    """Metrics of ``grads`` (R, P) against ``ref`` (P,), in the order of METRICS."""
    r = grads.shape[0]
    mean = jnp.mean(grads, axis=0)
    variance = jnp.sum(jnp.square(grads - mean[None, :])) / (r - 1)
    bias_norm = jnp.linalg.norm(mean - ref)
    bias_stderr = jnp.sqrt(variance / r)
    snr = jnp.linalg.norm(mean) / jnp.sqrt(variance)
    norms = jnp.linalg.norm(grads, axis=1) * jnp.linalg.norm(ref)
    # A zero estimate (or reference) has cosine 0 rather than 0 / 0.
    safe = jnp.where(norms > 0, norms, 1.0)
    cosine = jnp.mean(jnp.where(norms > 0, (grads @ ref) / safe, 0.0))
    rms = jnp.sqrt(jnp.mean(jnp.sum(jnp.square(grads - ref[None, :]), axis=1)))
    relative_error = rms / jnp.linalg.norm(ref)
    return jnp.stack([bias_norm, bias_stderr, variance, snr, cosine, relative_error])


def compare_gradients(
    key: jax.Array,
    params: Any,
    family: VariationalFamily,
    model: Union[Model, Callable[[ArrayTree], jax.Array]],
    *,
    estimators: Sequence[str] = ELBO_ESTIMATORS,
    num_samples: Union[int, Sequence[int]] = (1, 4, 16, 64, 256),
    num_replicates: int = 1000,
    reference: Optional[ArrayTree] = None,
    batch_size: Optional[int] = None,
) -> GradientComparison:
    """Returns bias, variance, SNR, cosine and relative error of gradient estimators.

    For each estimator and each sample count S, ``num_replicates`` independent
    gradient estimates ``g_r`` (each from S draws) are compared with a
    reference gradient ``g*`` of the ELBO with respect to ``params``:

    * if ``reference`` is ``None``, ``g* = -grad exact_kl(params, family,
      model)`` (which equals ``grad exact_elbo``) for a Gaussian-conjugate
      :class:`vijax.models.Model`, and ``g* = grad exact_elbo`` for a model
      with an ``expected_log_joint`` but no posterior (logistic regression,
      by quadrature; it equals ``-grad KL`` too, since ``log p(x)`` does not
      depend on ``params``);
    * otherwise ``g* = reference`` (a pytree shaped like ``params``), and
      ``model`` may be any :class:`~vijax.models.Model` or a bare
      ``log_joint`` callable: use this for models with no closed form (e.g.
      with a reference from a long run of a low-variance estimator).

    Estimator names are those of :func:`vijax.elbo` (``"reparam"``,
    ``"closed_entropy"``, ``"stl"``, ``"score"``), plus ``"iwae"`` and
    ``"dreg"`` (the reparameterized and doubly reparameterized gradients of
    :func:`vijax.iwae_bound` with K = S). The IWAE gradients estimate the
    gradient of the IWAE bound, not of the ELBO: against ``-grad KL`` their
    ``bias_norm`` measures how far the two objectives' gradients differ (it is
    zero at S = 1), not an estimator's bias. Pass ``reference=`` to compare
    them with something else.

    Replicate ``r`` of every estimator and every S uses the key
    ``jax.random.split(key, num_replicates)[r]``, and all estimators of one
    replicate are computed together from one set of draws and one batched
    ``log_joint`` call (:func:`vijax.estimator_gradients`): common random
    numbers, so differences between rows are not sampling noise. The whole
    computation for one S (every estimator, every replicate) is one
    ``jax.jit``-compiled function ``vmap``-ped over the replicate keys, with
    no Python loop over replicates or estimators; it is compiled once per S,
    since S changes shapes. (Sharing the program across estimators, rather
    than compiling one per estimator, also divides the compile time, which
    dominates on CPU, by about the number of estimators.) Pass ``batch_size``
    to map over replicates in chunks of that size (``jax.lax.map``) when
    ``R x S`` draws do not fit in memory at once.

    See :class:`GradientComparison` for the exact definitions; in short:
    ``variance`` is the trace of the covariance over replicates, ``snr =
    ||mean|| / sqrt(variance)``, ``cosine`` the mean over replicates of the
    cosine between one estimate and ``g*``, ``relative_error = sqrt(mean
    ||g_r - g*||^2) / ||g*||``.

    Args:
      key: a PRNG key (typed ``jax.random.key`` or legacy uint32).
      params: the family's parameters.
      family: a :class:`vijax.VariationalFamily`.
      model: a :class:`vijax.models.Model` (with an ``expected_log_joint``
        unless ``reference`` is given) or a ``log_joint(z) -> scalar``
        callable (with ``reference``).
      estimators: distinct names from ``("reparam", "closed_entropy", "stl",
        "adaptive_stl", "score", "iwae", "dreg")``; by default the four
        textbook ELBO estimators.
      num_samples: a sample count S or a sequence of distinct counts (>= 1).
      num_replicates: the number of independent replicates R (>= 2).
      reference: ``None`` or the reference gradient, a pytree like ``params``
        (cast to the dtype of ``params``).
      batch_size: ``None`` (vmap over all replicates at once) or the number of
        replicates per chunk (>= 1).

    Returns:
      A :class:`GradientComparison`; ``print`` it or call ``to_markdown()``.

    Raises:
      ValueError: an unknown or repeated estimator, a bad sample count or
        replicate count, a model with no ``expected_log_joint`` and no
        ``reference``, or a
        ``reference`` whose structure or shapes differ from ``params``.
      TypeError: ``model`` is neither a Model nor callable, or a count is not
        an int.

    Example:
      >>> import jax, vijax
      >>> model = vijax.models.normal_mean(
      ...     jax.numpy.ones(5), noise_scale=1.0, prior_loc=0.0, prior_scale=1.0)
      >>> family = vijax.mean_field()
      >>> params = family.init(model.latent)
      >>> result = vijax.compare_gradients(
      ...     jax.random.key(0), params, family, model,
      ...     estimators=("reparam", "stl"), num_samples=(1, 8),
      ...     num_replicates=100)
      >>> result.variance.shape
      (2, 2)
      >>> table = result.to_markdown()
    """
    names = check_estimator_names(estimators, GRADIENT_ESTIMATORS)
    counts = _check_sample_counts(num_samples)
    num_replicates = _checks.check_positive_int("num_replicates", num_replicates, minimum=2)
    if batch_size is not None:
        batch_size = _checks.check_positive_int("batch_size", batch_size)
    check_family(family)
    if "closed_entropy" in names:
        entropy_fn(family, "estimator 'closed_entropy'")

    if isinstance(model, Model):
        log_joint = model.log_joint
    elif callable(model):
        log_joint = model
    else:
        raise TypeError(
            "`model` must be a vijax.models.Model or a log_joint callable; got "
            f"{type(model).__name__}."
        )

    if reference is None:
        if not isinstance(model, Model) or model.expected_log_joint is None:
            what = model.name if isinstance(model, Model) else "a log_joint callable"
            raise ValueError(
                f"`model` ({what}) has no exact KL(q || p(z | x)) or ELBO to compare "
                "against; pass `reference=` (a gradient pytree shaped like `params`)."
            )
        if model.is_conjugate:
            ref = -ravel_pytree(jax.grad(exact_kl)(params, family, model))[0]
            reference_name = "-grad KL"
        else:
            ref = ravel_pytree(jax.grad(exact_elbo)(params, family, model))[0]
            reference_name = "grad exact ELBO"
    else:
        ref = _flat_reference(reference, params)
        reference_name = "reference"

    keys = jax.random.split(key, num_replicates)
    table = np.empty((len(METRICS), len(names), len(counts)))
    run = _compiled_statistics(family, log_joint, names, batch_size)
    for j, s in enumerate(counts):
        table[:, :, j] = np.asarray(run(keys, params, ref, s), dtype=np.float64)

    return GradientComparison(
        estimators=names,
        num_samples=counts,
        num_replicates=num_replicates,
        **{m: table[k] for k, m in enumerate(METRICS)},
        reference_norm=float(jnp.linalg.norm(ref)),
        reference_name=reference_name,
    )


@functools.lru_cache(maxsize=8)
def _compiled_statistics(family, log_joint, names, batch_size):
    """One jitted computation: replicate keys -> metrics of every estimator in ``names``.

    Cached, so later calls with the same family, log joint and estimators (at
    other params, keys or references) reuse the compiled program.
    """

    def one(key, params, num_samples):
        grads = estimator_gradients(
            key, params, family, log_joint, num_samples=num_samples, estimators=names
        )
        return jnp.stack([ravel_pytree(grads[name])[0] for name in names])

    def run(keys, params, ref, num_samples):
        if batch_size is None:
            grads = jax.vmap(one, in_axes=(0, None, None))(keys, params, num_samples)
        else:
            grads = jax.lax.map(
                lambda k: one(k, params, num_samples), keys, batch_size=batch_size
            )
        # grads: (R, E, P) -> metrics (len(METRICS), E)
        return jax.vmap(_statistics, in_axes=(1, None), out_axes=1)(grads, ref)

    return jax.jit(run, static_argnums=3)
