"""Table twists for SMC on a constrained base: ``Φ_t = log p_base(y_{≤t}) + h[t+1, s_{t+1}]``,
a value table ``h`` over the states of an automaton lattice, learned (``fit_twist``) or read off
a lattice approximation (``TableTwist.from_lattice``).

For the target ``p(y) ∝ p_base(y) · 1[y accepted]`` the exact twist is
``Φ_t(y_{≤t}) = log p_base(y_{≤t}) + log P_base(accepted | y_{≤t})``
(docs/theory.md#sequential-monte-carlo). A ``TableTwist`` keeps the first term exact, the base's
own prefix log-probability, and replaces the second by ``h[t+1, s_{t+1}]``, ``s_{t+1}`` the
lattice state after the prefix (a DFA's state, or a bigram × DFA state):

- ``fit_twist`` learns ``h`` over the DFA's states. ``h[t, d] = −∞`` where no accepted
  completion fits in the decisions left (read off the DFA: such prefixes have weight 0 under the
  target, so the twist drops them at once); ``h[T, d] = log 1[d accepting]`` (and ``h[T−1] =
  h[T]`` with EOS, whose last decision is the forced EOS); the other entries are parameters,
  fitted to the soft Bellman equation of the base along sequences ``y`` of a behaviour ARM (by
  default the base under feasible masking)::

      h[t, d_t] = log Σ_a π_base(a | y_{<t}) · exp h[t', δ(d_t, a)],   t' = T for EOS, else t+1

  by the semi-gradient squared residual (the right side held fixed at each step), with
  ``sp.fit``'s loop (Adam on the trapezoid schedule, checkpoints, progress bar). A table cannot
  tell apart two prefixes in the same DFA state: ``h`` is the fit of ``log P_base(accepted | ·)``
  that is best on average over the behaviour's prefixes in each state. ``h = 0`` on every
  feasible entry (the start of the fit) is the constraint's own twist: it only removes prefixes
  that can no longer be accepted.
- ``from_lattice(base, approx)`` takes ``h = V_approx``, the exact soft values of a lattice
  approximation such as ``bigram.constrain(dfa)`` (``log P_bigram(accepted | state)``). Unlike
  ``twist=approx``, whose ``Φ_t`` is the *approximation's* prefix log-probability plus the same
  values (so a neural particle carries the ratio ``p_approx / p_base`` of its prefix as
  weight), it keeps the base's own prefix probability.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqppl.bellman import soft_values
from seqppl.checks import check_counts, check_key, check_number, check_same_space
from seqppl.distributions import ARM, EBM, ExactRoute
from seqppl.lattice import Lattice
from seqppl.logspace import logsumexp
from seqppl.loop import digest, optimise, run_fingerprint, trapezoid_schedule
from seqppl.masking import accepting_states, allowed_actions, masked_arm
from seqppl.tables import per_decision

__all__ = ["TableTwist", "fit_twist", "next_rows"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class TableTwist:
    """``h [T+1, S]`` over the states of ``lattice`` (−∞ where no accepted completion is
    possible), and the ``base`` ARM whose prefix log-probability it adds to. Pass it as
    ``twist=`` to ``sp.log_partition(base.constrain(dfa), "smc", ...)``; build it with
    ``sp.fit_twist`` or ``TableTwist.from_lattice``."""

    values: jax.Array
    base: ARM
    lattice: Lattice = dataclasses.field(metadata={"static": True})

    @classmethod
    def from_lattice(cls, base: ARM, approx) -> TableTwist:
        """The twist ``Φ_t = log p_base(y_{≤t}) + V_approx[t+1, s_{t+1}]`` of a lattice EBM
        ``approx`` over the base's space (e.g. an n-gram fit to the base, constrained:
        ``ngram.constrain(dfa)``), ``s`` its joint lattice's state; ``h[T]`` is 0 on that
        lattice's accepting states (all of them without a constraint) and −∞ elsewhere.

        Raises:
            TypeError / ValueError: ``base`` not an ARM, ``approx`` not a lattice EBM (batch
                shape ``()``) over the base's space.
        """
        if not isinstance(base, ARM):
            raise TypeError(f"base must be an ARM, got {type(base).__name__}")
        if not isinstance(approx, EBM) or approx.exact_route is not ExactRoute.DYNAMIC_PROGRAM:
            raise TypeError("approx must be an EBM on lattices (a dynamic program), e.g. "
                            "ngram.constrain(dfa)")  # fmt: skip
        check_same_space("approx", approx.space, base.space)
        if approx.batch_shape:
            raise ValueError(f"approx must have batch shape (), got {approx.batch_shape}")
        lattice = approx.joint
        table = per_decision(approx.reward_table(), base.space.horizon)
        values = soft_values(lattice, table, trusted=True)
        accept = np.ones(lattice.num_states, bool)  # no constraint: every state ends well
        if lattice.accepting is not None:
            accept = accepting_states(lattice)
        final = jnp.where(accept, 0.0, -jnp.inf).astype(values.dtype)
        return cls(jnp.concatenate([values, final[None]]), base, lattice)

    def log_phi(self, tokens) -> jax.Array:
        """The twist in total form ``Φ_t`` ``[..., T]`` along ``tokens [..., T]``: entry t is
        ``log p_base(y_{≤t}) + h[t', δ(d_t, y_t)]`` (``t' = T`` from EOS on, else ``t+1``)."""
        space = self.base.space
        log_p = jnp.take_along_axis(self.base.log_policies(tokens), tokens[..., None], -1)[..., 0]
        log_p = jnp.cumsum(jnp.where(space.active(tokens), log_p, 0.0), -1)
        states = self.lattice.states(tokens, self.base.prompt)
        after = jnp.asarray(self.lattice.delta)[states, tokens]
        rows = jnp.asarray(next_rows(space))[jnp.arange(space.horizon), tokens]
        return log_p + self.values[rows, after]


def next_rows(space) -> np.ndarray:
    """int ``[T, A]``: the row of ``h`` after action a at decision t (``T`` for EOS, else t+1)."""
    rows = np.broadcast_to(
        np.arange(1, space.horizon + 1)[:, None], (space.horizon, space.num_actions)
    )
    return np.where(np.arange(space.num_actions) == space.eos_sentinel, space.horizon, rows)


def _fixed_values(dfa: Lattice, accepting) -> tuple[np.ndarray, np.ndarray]:
    """``(h with the fixed entries set and 0 elsewhere, bool learned [T+1, S])``."""
    space = dfa.space
    T = space.horizon
    accept = accepting_states(dfa, accepting)
    feasible = np.concatenate([allowed_actions(dfa, "feasible", accepting).any(-1), accept[None]])
    learned = feasible.copy()
    learned[T - 1 if space.eos else T :] = False
    return np.where(feasible, 0.0, -np.inf), learned


def fit_twist(
    base: ARM,
    dfa: Lattice,
    key,
    *,
    accepting=None,
    behaviour: ARM | None = None,
    num_sequences: int = 4096,
    steps: int = 500,
    batch_size: int = 512,
    learning_rate: float = 0.1,
    optimizer=None,
    log_every: int = 10,
    checkpoint_dir=None,
    checkpoint_every: int = 500,
    progress: bool = True,
) -> tuple[TableTwist, dict]:
    """Fit a ``TableTwist`` for SMC on ``base.constrain(dfa)`` (module docstring).

    Args:
        base: the base ARM (a callable or neural ARM; a table ARM works too).
        dfa: the constraint (``Lattice.regex``, ``json_schema``, ``automaton``, products).
        key: a PRNG key (``jax.random.key(n)`` or ``PRNGKey(n)``): the behaviour's sequences
            and the minibatches (step k from ``fold_in``).
        accepting: the accepting states; default ``dfa.accepting``.
        behaviour: the ARM whose sequences the residual is measured along; default
            ``sp.masked_arm(base, dfa, "feasible")``.
        num_sequences: behaviour sequences drawn once; the base's log-policies along them are
            computed once (``[N, T, A]`` floats) and the fit reads only those.
        steps, batch_size, learning_rate, optimizer: Adam at ``learning_rate`` on the
            trapezoid schedule unless ``optimizer`` is given; minibatches of ``batch_size``.
        log_every, checkpoint_dir, checkpoint_every, progress: as in ``sp.fit`` (a checkpoint
            of this run, same base, DFA, data and optimiser, is resumed).

    Returns:
        ``(twist, history)``; ``history`` has ``step``, ``loss`` (mean squared residual over
        the minibatch's decisions) and ``seconds``.

    Raises:
        TypeError: ``base`` or ``behaviour`` not an ARM, ``dfa`` not a Lattice, a bad key.
        ValueError: a ``dfa`` over another space, bad counts or rate, no accepting state that
            fits in the horizon (every ``h`` would be −∞).
    """
    for name, value in (("base", base), ("behaviour", behaviour)):
        if value is not None and not isinstance(value, ARM):
            raise TypeError(f"{name} must be an ARM, got {type(value).__name__}")
    if not isinstance(dfa, Lattice):
        raise TypeError(f"dfa must be a Lattice, got {type(dfa).__name__}")
    check_same_space("dfa", dfa.space, base.space)
    check_counts(
        ("num_sequences", num_sequences, 1),
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("log_every", log_every, 1),
        ("checkpoint_every", checkpoint_every, 1),
    )
    check_number("learning_rate", learning_rate, 0, float("inf"))
    key = check_key(key)
    fixed, learned = _fixed_values(dfa, accepting)
    start = dfa.initial_state(base.prompt)
    if fixed[0, start] == -np.inf:
        raise ValueError(
            f"no sequence of the space ({base.space.horizon} decisions) is accepted by dfa from "
            f"its start state {start}: the constrained target has Z = 0"
        )
    if behaviour is None:
        behaviour = masked_arm(base, dfa, "feasible", accepting)
    check_same_space("behaviour", behaviour.space, base.space)
    data_key, batch_key = jax.random.split(key)
    tokens = behaviour.sample(data_key, (num_sequences,))
    log_pi, states, made = _decisions(base, dfa, tokens)
    dtype = jnp.result_type(float)
    fixed, learned = jnp.asarray(fixed, dtype), jnp.asarray(learned)
    delta = jnp.asarray(dfa.delta)
    space = base.space

    def table(theta):
        return jnp.where(learned, theta, fixed)

    rows_after, times = jnp.asarray(next_rows(space)), jnp.arange(space.horizon)

    def loss_fn(theta, step, carry):
        batch = jax.random.randint(jax.random.fold_in(batch_key, step), (batch_size,), 0, len(made))
        h, d = table(theta), states[batch]  # d: [B, T]
        target = logsumexp(log_pi[batch] + h[rows_after, delta[d]], -1)  # [B, T]
        use = made[batch] & learned[times, d] & jnp.isfinite(target)
        residual = jnp.where(use, h[times, d] - jax.lax.stop_gradient(target), 0.0)
        return jnp.sum(residual**2) / jnp.maximum(jnp.sum(use), 1), {}

    theta = jnp.zeros(fixed.shape, dtype)
    optimizer = optimizer or optax.adam(trapezoid_schedule(learning_rate, steps))
    fingerprint = None
    if checkpoint_dir is not None:
        fingerprint = run_fingerprint(
            f"TableTwist on {dfa.num_states} DFA states",
            theta,
            optimizer,
            steps=str(steps),
            key=key,
            data=tokens,
            base=digest(base),
            dfa=jnp.asarray(dfa.delta),
            batch_size=str(batch_size),
        )
    theta, history, stopped = optimise(
        loss_fn,
        theta,
        steps=steps,
        optimizer=optimizer,
        fingerprint=fingerprint,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        progress=progress,
        desc="fit_twist",
    )
    if stopped is not None:
        raise FloatingPointError(stopped)
    return TableTwist(table(theta), base, dfa), history


def _decisions(base: ARM, dfa: Lattice, tokens):
    """``(log π_base [N, T, A], DFA state before each decision [N, T], bool made [N, T])``:
    ``made`` marks the decisions up to the first EOS (the forced last one excluded)."""
    space = base.space
    log_pi = jnp.concatenate(
        [base.log_policies(chunk) for chunk in jnp.array_split(tokens, -(-len(tokens) // 1024))]
    )
    states = dfa.states(tokens, base.prompt, trusted=True)
    made = space.active(tokens)
    if space.eos:
        made = made.at[:, -1].set(False)
    return log_pi, states, made
