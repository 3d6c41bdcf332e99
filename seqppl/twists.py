"""SMC's twists: what each intermediate target adds to a particle's prefix, carried step by step.

A twist gives ``Φ_t(y_{≤t})``, an estimate of ``log Σ_{y' ⊒ y_{≤t}} exp R(y')``, for ``P``
particles through its initial ``state`` and ``update(state, tokens, token, done, log_π, t) ->
(state, Φ_t)``
(``log_π``: the proposal's log-probability of ``token``). The kinds (``check_twist`` reads the
``twist=`` argument of ``sp.log_partition``):

- ``None``: ``Φ_t = log q(y_{≤t})``, the proposal's own running log-probability (no lookahead);
- ``"lattice"``: a lattice EBM's exact twist ``Φ_t = Σ_{k≤t} r_k + V[t+1, s_{t+1}]``, one table
  lookup per step along the particle's lattice state (the target itself for ``"exact"``, or an
  approximation such as an n-gram × the constraint's DFA);
- ``"table"``: a ``TableTwist``, ``Φ_t = log p_base(y_{≤t}) + h[t', s_{t+1}]``, the base's
  running log-probability (its decoder carried along, or the proposal's ``log π`` when the
  proposal is the base) plus the table at the state of its lattice (a DFA learned by
  ``fit_twist``, or a lattice approximation's soft values: ``TableTwist.from_lattice``);
- a callable ``twist_fn(tokens [P, T]) -> [P, T]``, causal, entry t for ``y[:t+1]``.
"""

from __future__ import annotations

import jax.numpy as jnp

from seqppl.bellman import soft_values
from seqppl.checks import check_model, check_same_space
from seqppl.distributions import EBM, ExactRoute
from seqppl.distributions.ancestral import step_log_prob
from seqppl.table_twist import TableTwist, next_rows
from seqppl.tables import per_decision

__all__ = ["Twist", "check_twist", "build_twist"]


class Twist:
    """``state`` (the twist's state for P particles) and ``update(state, tokens, token, done,
    log_pi, t) -> (state, Φ_t)``."""

    def __init__(self, state, update):
        self.state, self.update = state, update


def check_twist(ebm, twist, proposal):
    """``(spec, payload)`` of a ``twist=`` argument: spec None, ``"lattice"`` (payload: the
    lattice EBM), ``"table"`` or ``"table by the proposal"`` (payload: the
    ``TableTwist``; the second when the proposal is its base), or a callable (payload None).

    Raises:
        ValueError / TypeError: a twist of another kind, over another space, or a twist EBM or
            ``"exact"`` without a dynamic program.
    """
    if isinstance(twist, TableTwist):
        check_same_space("twist", twist.base.space, ebm.space)
        check_same_space("twist.lattice", twist.lattice.space, ebm.space)
        expected = (ebm.space.horizon + 1, twist.lattice.num_states)
        if tuple(twist.values.shape) != expected:
            raise ValueError(
                f"twist.values has shape {tuple(twist.values.shape)}; a TableTwist over "
                f"{expected[1]} lattice states needs [T+1, S] = {list(expected)}"
            )
        return ("table by the proposal" if twist.base is proposal else "table"), twist
    if isinstance(twist, EBM):
        check_model(twist, EBM, ebm, "twist")
        if twist.exact_route is not ExactRoute.DYNAMIC_PROGRAM or twist.batch_shape:
            raise ValueError(
                "a twist EBM must have all its parts on lattices (a dynamic program) and batch "
                "shape (), e.g. an n-gram fit to the proposal, constrained: base.constrain(dfa)"
            )
        return "lattice", twist
    if isinstance(twist, str):
        if twist != "exact":
            raise ValueError(
                f"twist must be None, 'exact', an EBM, a TableTwist or a callable, got {twist!r}"
            )
        if ebm.exact_route is not ExactRoute.DYNAMIC_PROGRAM:
            raise ValueError(
                "twist='exact' needs an EBM whose parts are all lattice tables; pass a lattice "
                "EBM that approximates it (twist=approx_ebm), a TableTwist (sp.fit_twist) or "
                "a twist_fn(tokens) -> [P, T]"
            )
        return "lattice", ebm
    if twist is not None and not callable(twist):
        raise TypeError(
            "twist must be None, 'exact', an EBM, a TableTwist or a callable, got "
            f"{type(twist).__name__}"
        )
    return twist, None


def build_twist(spec, payload, p: int) -> Twist:
    """The ``Twist`` of a ``check_twist`` result for ``p`` particles, built inside the trace."""
    if spec is None:  # Φ_t = log q(y_{≤t}): the running proposal log-probability
        return Twist(
            jnp.zeros((p,)),
            lambda acc, tokens, token, done, log_pi, t: (acc + log_pi,) * 2,
        )
    if spec == "lattice":
        return _lattice_twist(payload, p)
    if isinstance(spec, str):
        return _table_twist(payload, p, reuse_proposal=spec == "table by the proposal")
    return Twist(
        jnp.zeros(()),
        lambda state, tokens, token, done, log_pi, t: (state, jnp.take(spec(tokens), t, -1)),
    )


def _lattice_twist(ebm, p: int) -> Twist:
    """``Φ_t = Σ_{k≤t} r_k + V[t+1, s_{t+1}]`` of a lattice EBM (0 ahead once a particle ends)."""
    joint, table = ebm.joint, per_decision(ebm.reward_table(), ebm.space.horizon)
    values, delta = soft_values(joint, table, trusted=True), jnp.asarray(joint.delta)
    start = joint.initial_state(ebm.prompt, trusted=True)
    eos, horizon = ebm.space.eos_sentinel, ebm.space.horizon

    def update(state, tokens, token, done, log_pi, t):
        s, acc = state
        acc = acc + jnp.where(done, 0.0, table[t, s, token])
        s = delta[s, token]
        ahead = values[jnp.minimum(t + 1, horizon - 1), s]
        ended = done | (token == eos) | (t + 1 >= horizon)
        return (s, acc), acc + jnp.where(ended, 0.0, ahead)

    return Twist((jnp.full((p,), start), jnp.zeros((p,), table.dtype)), update)


def _table_twist(twist: TableTwist, p: int, reuse_proposal: bool) -> Twist:
    """``Φ_t = log p_base(y_{≤t}) + h[next_rows[t, y_t], δ(d_t, y_t)]``; the base's
    ``log π`` from its own decoder, or the proposal's when the proposal is the base."""
    base, lattice = twist.base, twist.lattice
    space, delta, rows = base.space, jnp.asarray(lattice.delta), jnp.asarray(next_rows(base.space))
    decoder, next_logits, advance = base.decoder((p,))
    if reuse_proposal:
        decoder = jnp.zeros(())

    def update(state, tokens, token, done, log_pi, t):
        decoder, d, acc = state
        if not reuse_proposal:
            log_pi = step_log_prob(next_logits(decoder, t), token, t, done, space)
            decoder = advance(decoder, token, t)
        d = delta[d, token]
        acc = acc + log_pi
        ahead = twist.values[jnp.where(done, space.horizon, rows[t, token]), d]
        return (decoder, d, acc), acc + ahead

    start = jnp.full((p,), lattice.initial_state(base.prompt))
    return Twist((decoder, start, jnp.zeros((p,), twist.values.dtype)), update)
