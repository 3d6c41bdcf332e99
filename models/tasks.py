"""Ready-made tasks: tables on lattices that need lookahead.

``digit_sum_task``: a bigram reference over tokens ``0..V-1`` (read as digits) constrained so that
the digit sum of the response is divisible by ``modulus``. The constraint is a DFA whose state is
the running sum mod ``modulus``; the task lives on ``markov(1) × automaton``. Whether a token is
acceptable depends on what can still follow, which is exactly what M's soft values look ahead to.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import seqppl as sp

__all__ = ["DigitSumTask", "digit_sum_task", "digit_sum_lattice"]


class DigitSumTask(NamedTuple):
    """A constrained bigram target: its lattice, local rewards and parts."""

    lattice: sp.Lattice
    rewards: jax.Array  # float [T, S, A]: bigram log-probs + 0/−∞ acceptance
    bigram_logits: jax.Array  # float [V+1, A] on markov(1): the unconstrained reference
    constraint: sp.Lattice  # the digit-sum DFA
    modulus: int


def digit_sum_lattice(space: sp.SequenceSpace, modulus: int) -> sp.Lattice:
    """DFA with states ``0..modulus-1``: ``δ(s, a) = (s + a) mod modulus``, start 0."""
    if not isinstance(modulus, int) or modulus < 1:
        raise ValueError(f"modulus must be an int >= 1, got {modulus!r}")
    states = np.arange(modulus)[:, None]
    digits = np.arange(space.vocab_size)[None, :]
    return sp.Lattice.automaton(space, (states + digits) % modulus, initial=0)


def digit_sum_task(
    space: sp.SequenceSpace, modulus: int = 3, seed: int = 0, temperature: float = 1.0
) -> DigitSumTask:
    """A random bigram (logits ``N(0, 1)/temperature``, seeded) times "digit sum ≡ 0 mod k".

    Returns:
        a ``DigitSumTask`` whose ``rewards`` are the bigram's normalised log-probabilities plus
        the acceptance rewards, on ``markov(space, 1).product(digit_sum_lattice(space, k))``.
    """
    bigram = sp.Lattice.markov(space, order=1)
    constraint = digit_sum_lattice(space, modulus)
    lattice = bigram.product(constraint)
    key = jax.random.key(seed)
    logits = jax.random.normal(key, (bigram.num_states, space.num_actions)) / temperature
    log_probs = jnp.broadcast_to(sp.log_softmax(logits, -1), (space.horizon, *logits.shape))
    if space.eos:
        last = jnp.full((space.num_actions,), -jnp.inf).at[space.eos_id].set(0.0)
        log_probs = log_probs.at[-1].set(jnp.broadcast_to(last, logits.shape))
    rewards = lattice.lift(log_probs, 0) + lattice.lift(constraint.accepting_rewards([0]), 1)
    return DigitSumTask(lattice, rewards, logits, constraint, modulus)
