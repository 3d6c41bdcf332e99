"""Ready-made tasks: tables on lattices that need lookahead.

``digit_sum_task``: a bigram reference over tokens ``0..V-1`` (read as digits) constrained so that
the digit sum of the response is divisible by ``modulus``. The constraint is a DFA whose state is
the running sum mod ``modulus``; the task lives on ``markov(1) × automaton``. Whether a token is
acceptable depends on what can still follow, which is exactly what M's soft values look ahead to.

``locally_masked_arm``: what a constrained decoder does: the reference's next-token probabilities
renormalised over the tokens after which the constraint can still be met within the horizon. It
never dead-ends and samples only valid sequences, yet it is not the conditional distribution: it
does not weigh each token by the probability mass of its completions (the soft value).
``lookahead_student``: a causal Transformer's logits added to such a base ARM, so distillation
starts from the masked decoder and only has to learn the lookahead correction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from seqppl.models.transformer import TransformerARM

import seqppl as sp
from seqppl import checks
from seqppl.distributions.nnx import NNXFunction, module_params

__all__ = [
    "DigitSumTask",
    "digit_sum_task",
    "digit_sum_lattice",
    "locally_masked_arm",
    "lookahead_student",
    "repetition_penalty",
]


class DigitSumTask(NamedTuple):
    """A constrained bigram target: its lattice, local rewards and parts."""

    lattice: sp.Lattice
    rewards: jax.Array  # float [T, S, A]: bigram log-probs + 0/−∞ acceptance
    bigram_logits: jax.Array  # float [V+1, A] on markov(1): the unconstrained reference
    constraint: sp.Lattice  # the digit-sum DFA
    modulus: int


def digit_sum_lattice(space: sp.SequenceSpace, modulus: int) -> sp.Lattice:
    """DFA with states ``0..modulus-1``: ``δ(s, a) = (s + a) mod modulus``, start 0."""
    checks.check_counts(("modulus", modulus, 1))
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


def locally_masked_arm(task: DigitSumTask) -> sp.ARM:
    """The constrained decoder: ``π(a | s) ∝ π_ref(a | s) · [a keeps the constraint satisfiable]``.

    ``sp.masked_arm(reference, constraint, "feasible")``: ``a`` is allowed at decision t when
    some completion within the horizon is accepted (digit sum ≡ 0). A table ARM on the task's
    lattice.
    """
    log_probs = task.lattice.lift(sp.log_softmax(task.bigram_logits, -1), 0)
    reference = sp.ARM.from_table(task.lattice, log_probs)
    return sp.masked_arm(reference, task.constraint, "feasible", accepting=[0])


def lookahead_student(
    base: sp.ARM, *, layers=2, heads=2, dim=32, mlp_dim=64, seed=0, dtype=jnp.float32
) -> sp.ARM:
    """``base.log_policies(tokens) + transformer(tokens)``: a trainable ARM (the Transformer's
    parameters) that starts as ``base`` (zero output head) and keeps its −∞ masks."""
    space = base.space
    module = TransformerARM(
        space.num_actions,
        space.horizon,
        layers,
        heads,
        dim,
        mlp_dim,
        rngs=nnx.Rngs(seed),
        dtype=dtype,
    )
    module.head.kernel[...] = jnp.zeros_like(module.head.kernel[...])
    network = NNXFunction(module)

    def logits_fn(params, tokens):
        return base.log_policies(tokens) + network(params, tokens)

    return sp.ARM(logits_fn, space, params=module_params(module))


def repetition_penalty(space: sp.SequenceSpace, penalty: float = 0.7):
    """A ``reward_fn`` over ``space``: ``−penalty`` per adjacent repeated token, EOS padding
    excluded (``tokens [..., T] -> [...]``).

    A reward with no finite-state structure as written (a Python function), so an EBM that
    includes it has no exact log Z beyond enumerable spaces.
    """
    if not isinstance(space, sp.SequenceSpace):
        raise TypeError(f"space must be a SequenceSpace, got {type(space).__name__}")
    vocab_size = space.vocab_size

    def reward_fn(tokens):
        same = (tokens[..., 1:] == tokens[..., :-1]) & (tokens[..., 1:] < vocab_size)
        return -penalty * jnp.sum(same, -1)

    return reward_fn
