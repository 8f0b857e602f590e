"""Minibatch indices drawn inside the compiled loop: O(B) work and memory per step.

Two schemes (``fit(..., batching=...)``), both functions of ``(key, step)``
only, so a resumed fit draws the same batches as an uninterrupted one:

* ``"epoch"`` (the default): without replacement within an epoch of
  ``n // B`` steps. Epoch ``e`` visits the data in the order of a
  pseudo-random permutation of ``range(n)``, a keyed Feistel network on the
  smallest power-of-4 domain covering ``n`` with cycle walking (indices
  ``>= n`` are mapped again until they land in range): no ``n``-sized array
  is ever built or sorted, so the cost is flat in ``n``. Each epoch has its
  own permutation; the ``n mod B`` rows at its end are left out of that
  epoch (different rows each epoch). The permutation's output is shifted by
  a keyed offset drawn uniformly from ``range(n)`` per epoch (``(pi(p) + c)
  mod n``, still a permutation): a Feistel network with a few rounds is not
  exactly uniform over keys on a small domain (n = 7, B = 3: inclusion
  frequencies 0.422 to 0.435 against 3/7 = 0.4286 over 200,000 keys), and
  with the shift every position holds each row with probability exactly
  ``1 / n``. So every row is in a step's batch with probability exactly
  ``B / n``, and ``n / B`` times the batch sum is unbiased.
* ``"with_replacement"``: ``B`` indices drawn uniformly and independently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BATCHING = ("epoch", "with_replacement")

_ROUNDS = 6


def check_batching(batching, batch_size) -> str:
    """``batching``, checked; ``"with_replacement"`` needs a ``batch_size`` (it was ignored)."""
    if not isinstance(batching, str) or batching not in BATCHING:
        raise ValueError(
            f"`batching` must be one of {', '.join(map(repr, BATCHING))}; got {batching!r}."
        )
    if batch_size is None and batching != "epoch":
        raise ValueError(
            f"`batching={batching!r}` draws minibatches, which need `batch_size`; got "
            "batch_size=None (every step uses the full data)."
        )
    return batching


def check_batch_size(batch_size, num_data: int):
    """``None`` (full batch) or an int in ``[1, n]``; the error names n."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"`batch_size` must be None or an int; got {batch_size!r}.")
    if batch_size < 1 or batch_size > num_data:
        raise ValueError(
            f"`batch_size` must be between 1 and the number of data n = {num_data}; "
            f"got {batch_size}."
        )
    return batch_size


def _mix(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (``lowbias32``, C. Wellons) on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def permute(key: jax.Array, positions: jax.Array, n: int) -> jax.Array:
    """Position ``p`` of a keyed pseudo-random permutation of ``range(n)``, for each ``p``.

    A balanced Feistel network on ``2 * h`` bits (``4**h >= n``) is a
    bijection of ``range(4**h)``; cycle walking restricts it to
    ``range(n)`` (a bijection too), in under 4 passes on average since
    ``4**h < 4 n``.
    """
    if n < 2:
        return jnp.zeros_like(positions, dtype=jnp.int32)
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = jnp.uint32((1 << half) - 1)
    round_keys = jax.random.bits(key, (_ROUNDS,), jnp.uint32)

    def network(x):
        left, right = x >> half, x & mask
        for r in range(_ROUNDS):
            left, right = right, left ^ (_mix(right ^ round_keys[r]) & mask)
        return (left << half) | right

    def cond(x):
        return jnp.any(x >= n)

    def body(x):
        return jnp.where(x >= n, network(x), x)

    x = network(positions.astype(jnp.uint32))
    return jax.lax.while_loop(cond, body, x).astype(jnp.int32)


def batch_indices(key: jax.Array, step: jax.Array, n: int, batch_size: int,
                  batching: str) -> jax.Array:
    """The int32 indices of step ``step``'s minibatch (shape ``(batch_size,)``)."""
    if batching == "with_replacement":
        return jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, n)
    per_epoch = n // batch_size
    epoch, slot = step // per_epoch, step % per_epoch
    positions = slot * batch_size + jnp.arange(batch_size)
    permutation_key, shift_key = jax.random.split(jax.random.fold_in(key, epoch))
    # A uniform offset makes each position's row exactly uniform (see the module docstring).
    shift = jax.random.randint(shift_key, (), 0, n, jnp.int32)
    return (permute(permutation_key, positions, n) + shift) % n
