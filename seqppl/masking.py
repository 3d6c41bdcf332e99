"""Masking decoders: the constrained decoders people run, as ARMs (docs/distillation.md).

A decoder that enforces a DFA constraint on a base ARM keeps the base logits of the allowed
actions and puts −∞ on the others: ``q_dec[t, (s, d), a] = q[t, s, a] if allowed[t, d, a]``,
``d`` the DFA state before decision t, ``δ`` its transition, ``F`` its accepting states. EOS is
allowed only where ``d ∈ F``; a token ``a`` where the state after it, ``δ(d, a)``, passes:

- ``"myopic"``: it can still reach ``F`` at all (co-reachable on the DFA graph, the horizon
  ignored); at the last decision of a fixed-length space it must be in ``F``;
- ``"feasible"``: it can reach ``F`` within the decisions left, ``ok[t+1]`` of the backward pass
  ``ok[T-1](d) = d ∈ F`` (EOS spaces; fixed length: ``ok[T](d) = d ∈ F``) and ``ok[t](d) =
  [EOS space ∧ d ∈ F] ∨ ∃ a < V: ok[t+1](δ(d, a))``.

Where nothing is left (a dead end myopic masking could not see, a state the base gives no allowed
action, the last decision of an EOS space outside ``F``) the decoder emits EOS, an invalid output;
in a fixed-length space it falls back to the base's own row, unmasked (an invalid output too),
so that the decoder stays a distribution. Neither decoder is the conditional ``p ∝ p_arm ·
1[accepted]``, which is ``to_arm(arm.constrain(dfa))``: renormalising after the mask does not
weigh a token by how probable its accepted completions are (the soft value of M).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.checks import check_choice, check_same_space
from seqppl.constraints import accepting_mask, co_reachable
from seqppl.distributions import ARM
from seqppl.lattice import Lattice
from seqppl.tables import per_decision

__all__ = [
    "masked_arm",
    "allowed_actions",
    "accepting_states",
    "component_states",
    "MASKING_MODES",
]

MASKING_MODES = ("myopic", "feasible")
"""``masked_arm``'s rules for which actions stay allowed."""


def masked_arm(arm: ARM, dfa: Lattice, mode: str = "myopic", accepting=None) -> ARM:
    """The decoder that runs ``arm`` under the constraint ``dfa``: an ARM whose logits are the
    base logits on the allowed actions and −∞ elsewhere (rules: the module docstring).

    Args:
        arm: the base ARM over the space of ``dfa``. A table ARM gives a table ARM on
            ``arm.lattice.product(dfa)`` (on ``arm.lattice`` itself when ``dfa`` is one of its
            factors), so exact reports and ``to_ebm`` apply; a callable ARM gives a callable
            ARM that runs the DFA along the prefix.
        dfa: the constraint, a ``Lattice`` (``automaton``, ``regex``, a product, ...).
        mode: ``"myopic"`` (mask tokens whose DFA state is dead now) or ``"feasible"`` (mask
            tokens with no accepted completion within the remaining decisions).
        accepting: the accepting states (ids or bool ``[S]``); default ``dfa.accepting``.

    Returns:
        an ``ARM`` with the base's prompt and batch shape. Where no action is left it emits EOS
        (EOS spaces) or the base's unmasked row (fixed length): an output the DFA rejects.
        Feasible masking reads the DFA, not the base's support, so it never emits one only when
        the base gives every action some probability (and the constraint fits the horizon).

    Example:
        >>> from seqppl import SequenceSpace, Lattice, ARM
        >>> space = SequenceSpace(vocab_size=2, length=2, eos=True)
        >>> base = ARM.from_table(Lattice.markov(space, 0), jnp.zeros((1, 3)))
        >>> dfa = Lattice.automaton(space, [[1, 0], [1, 1]], accepting=[1])  # "has a 0"
        >>> y = jnp.array([[1, 1, 2], [1, 0, 2]])  # "11" is rejected, "10" accepted
        >>> for mode in MASKING_MODES:
        ...     print(mode, [round(float(v), 3) for v in masked_arm(base, dfa, mode).log_prob(y)])
        myopic [-1.386, -1.386]
        feasible [-inf, -0.693]
    """
    if not isinstance(arm, ARM):
        raise TypeError(f"arm must be an ARM, got {type(arm).__name__}")
    if not isinstance(dfa, Lattice):
        raise TypeError(f"dfa must be a Lattice, got {type(dfa).__name__}")
    check_same_space("dfa", dfa.space, arm.space)
    mode = check_choice("mode", mode, MASKING_MODES)
    allowed = allowed_actions(dfa, mode, accepting)
    if arm.lattice is None:
        return _masked_function(arm, dfa, allowed)
    lat = arm.lattice
    states = component_states(lat, dfa)
    q = per_decision(arm.params, arm.space.horizon)
    if states is None:  # the decoder's state pairs the base's state with the DFA's
        lat = lat.product(dfa)
        q = lat.lift(q, 0)
        states = np.tile(np.arange(dfa.num_states), arm.lattice.num_states)  # u·S_dfa + d
    keep = jnp.asarray(allowed[:, states, :])  # [T, S, A] on the decoder's lattice
    q = _masked(arm.space, q, jnp.broadcast_to(keep, q.shape), table=True)
    return ARM.from_table(lat, q, arm.prompt, validate_args=arm._validate_args, trusted=True)


def allowed_actions(dfa: Lattice, mode: str = "myopic", accepting=None) -> np.ndarray:
    """bool ``[T, S_dfa, A]``: may a decoder in DFA state ``d`` take action ``a`` at decision t
    (``masked_arm``'s rules; the space's own last-decision mask not applied)."""
    mode = check_choice("mode", mode, MASKING_MODES)
    accept = accepting_states(dfa, accepting)
    space = dfa.space
    T, V = space.horizon, space.vocab_size
    tokens = dfa.delta[:, :V]  # [S, V]
    after = np.zeros((T, dfa.num_states), dtype=bool)  # the test on the state after a token
    if mode == "myopic":
        after[:] = co_reachable(tokens, accept)
        after[-1] = False if space.eos else accept
    else:
        ok = accept.copy()  # ok[T-1] (EOS) or ok[T] (fixed length)
        for t in range(T - 1 if space.eos else T, 0, -1):
            after[t - 1] = ok
            ok = ok[tokens].any(axis=1) | (accept & space.eos)
    allowed = np.zeros((T, dfa.num_states, space.num_actions), dtype=bool)
    allowed[:, :, :V] = after[:, tokens]
    if space.eos:
        allowed[:, :, space.eos_id] = accept[None, :]
    return allowed


def accepting_states(dfa: Lattice, accepting=None) -> np.ndarray:
    """bool ``[S_dfa]``: ``accepting`` (state ids or a mask), by default ``dfa.accepting``."""
    if accepting is None and dfa.accepting is None:
        raise ValueError(
            "accepting is required: the dfa carries no accepting states (give the state ids, or "
            "build it with Lattice.automaton(..., accepting=...) / Lattice.regex)"
        )
    return accepting_mask(dfa.accepting if accepting is None else accepting, dfa.num_states)


def component_states(lat: Lattice, component: Lattice) -> np.ndarray | None:
    """int ``[S]``: the state of ``component`` within each state of ``lat`` (``lat`` itself, or a
    product with ``component`` among its factors, by identity); None when it is not there."""
    if lat is component:
        return np.arange(lat.num_states)
    if lat.kind != "product":
        return None
    for i, factor in enumerate(lat.factors):
        inner = component_states(factor, component)
        if inner is not None:
            table = np.broadcast_to(inner[:, None], (factor.num_states, lat.space.num_actions))
            return np.asarray(lat.lift(jnp.asarray(table), i))[:, 0]
    return None


@functools.partial(jax.jit, static_argnames=("space", "table"))
def _masked(space, logits, keep, table: bool) -> jax.Array:
    """``logits`` where ``keep``, else −∞; rows with nothing left become EOS (EOS spaces) or
    stay the unmasked ``logits`` (fixed length). ``[..., T, S, A]`` (``table``) or
    ``[..., T, A]``."""
    masked = jnp.where(keep, logits, -jnp.inf)
    visible = space.mask_logits(masked, table=table)
    empty = jnp.all(visible == -jnp.inf, axis=-1, keepdims=True)
    if space.eos:
        fallback = jnp.where(jnp.arange(space.num_actions) == space.eos_id, 0.0, -jnp.inf)
        fallback = jnp.broadcast_to(fallback, masked.shape).astype(masked.dtype)
    else:
        fallback = logits
    return jnp.where(jnp.broadcast_to(empty, masked.shape), fallback, masked)


def _masked_function(arm: ARM, dfa: Lattice, allowed: np.ndarray) -> ARM:
    """A callable ARM: the base logits masked by ``allowed[t, d_t]``, ``d_t`` the DFA state along
    the prefix (δ scanned over the prompt and the tokens)."""
    space, keep_table = arm.space, jnp.asarray(allowed)

    def masked(params, tokens, prompt=None):
        logits = arm.with_params(params).logits(tokens)
        states = dfa.states(tokens, prompt, trusted=True)  # [..., T]
        keep = keep_table[jnp.arange(space.horizon), states]  # [..., T, A]
        return _masked(space, logits, jnp.broadcast_to(keep, logits.shape), table=False)

    if arm.params is None:
        return ARM(lambda tokens, **kw: masked(None, tokens, **kw), space, arm.prompt)
    return ARM(masked, space, arm.prompt, params=arm.params)
