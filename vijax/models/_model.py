"""The :class:`Model` record every vijax model returns."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax

from vijax._gaussian import Gaussian

ArrayTree = Any


class Model(NamedTuple):
    """A probabilistic model as pure functions and, when conjugate, its exact answers.

    Close over a model (or build it inside the function you transform) rather
    than passing it as a ``jit`` argument: it holds functions.

    Attributes:
      log_joint: ``log_joint(z) -> scalar``, the unnormalised ``log p(x, z)``
        as a pure, differentiable, vmappable function of one latent pytree.
      latent: an example latent pytree (pass it to a family's ``init``).
      posterior: the exact posterior ``p(z | x)`` as a :class:`vijax.Gaussian`
        over the flat latent (``ravel_pytree(latent)`` order), or ``None``.
      log_evidence: the exact ``log p(x)``, or ``None``.
      expected_log_joint: ``expected_log_joint(q) -> scalar``, the closed form
        of ``E_q[log p(x, z)]`` for a :class:`vijax.Gaussian` ``q``, or
        ``None``. Computed from the log joint's quadratic form, not from the
        posterior, so ``exact_elbo + exact_kl == log_evidence`` is a real check.
      name: a short name for tables.
    """

    log_joint: Callable[[ArrayTree], jax.Array]
    latent: ArrayTree
    posterior: Optional[Gaussian] = None
    log_evidence: Optional[jax.Array] = None
    expected_log_joint: Optional[Callable[[Gaussian], jax.Array]] = None
    name: str = "model"

    @property
    def is_conjugate(self) -> bool:
        """Whether the exact posterior, evidence and expected log joint exist."""
        return (
            self.posterior is not None
            and self.log_evidence is not None
            and self.expected_log_joint is not None
        )
