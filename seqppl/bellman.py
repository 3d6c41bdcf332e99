"""The soft Bellman transforms: M (EBM rewards → ARM logits) and M⁻¹
(docs/theory.md#the-soft-bellman-bijection).

On a lattice with transition δ and local rewards ``r`` (``[S, A]`` or ``[T, S, A]``):

    V[T, s] = 0                                (−∞ in a variable-length space: only EOS is left)
    q[t, s, a] = r[t, s, a] + [a ≠ EOS] · V[t+1, δ(s, a)]
    V[t, s] = logsumexp_a q[t, s, a]

so that ``p_q = p_R`` and ``V[0, initial_state(x)] = log Z(x)``. M⁻¹ needs no recursion:
``r[t, s, a] = q[t, s, a] − [a ≠ EOS] · logsumexp_b q[t+1, δ(s, a), b]``. −∞ rewards are hard
constraints; a state with no allowed continuation has ``V = −∞`` and actions into it get −∞.
Setting ``V[T] = −∞`` for variable-length spaces is what applies the "only EOS at the last
decision" rule: every non-EOS action at ``t = T−1`` then scores −∞.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqppl.backward import SCHEDULES, backward, next_state_index
from seqppl.lattice import Lattice
from seqppl.logspace import NEG_INF, log_softmax, logsumexp
from seqppl.space import SequenceSpace
from seqppl.tables import check_reachable, check_table, per_decision

__all__ = [
    "SCHEDULES",
    "soft_bellman",
    "soft_values",
    "root_values",
    "inverse_soft_bellman",
    "path_rewards",
    "occupancy",
]


def soft_values(
    lat: Lattice, r, reference=None, *, method: str = "sequential", trusted: bool = False
) -> jax.Array:
    """The soft values ``V[t, s]`` of local rewards ``r`` (the backward pass of M, no q written).

    ``V[t, s] = logsumexp_a (r[t, s, a] + [a ≠ EOS] · V[t+1, δ(s, a)])``; ``log Z(x) =
    V[0, lat.initial_state(x)]``. With ``reference`` (logits of ``π_ref``), the target is
    ``p ∝ p_ref · exp(R)`` and ``V`` is that of ``q' = log π_ref + q``
    (docs/theory.md#reference-measures).

    Args:
        lat: the lattice.
        r: float ``[S, A]`` or ``[T, S, A]``; −∞ marks forbidden actions.
        reference: optional float ``[S, A]`` or ``[T, S, A]`` reference logits (normalised here).
        method: ``"sequential"`` (a ``lax.scan`` over time, O(T·S·A)) or ``"parallel"`` (an
            associative scan over ``[S+1, S+1]`` transfer matrices: depth O(log T), work
            O(T·S³); for few states and long horizons on parallel hardware).
        trusted: ``r`` and ``reference`` were already validated (internal calls: no host scan).

    Returns:
        float ``[T, S]``; −∞ for states with no complete continuation.

    Example:
        >>> from seqppl import SequenceSpace, Lattice
        >>> lat = Lattice.markov(SequenceSpace(vocab_size=2, length=3), order=1)
        >>> V = soft_values(lat, jnp.zeros((3, 2)))
        >>> V.shape, round(float(V[0, lat.initial]), 4)  # log 2^3
        ((3, 3), 2.0794)
    """
    r, reference = _prepare(lat, r, reference, trusted=trusted)
    return backward(lat, _with_reference(lat, r, reference), "values", method=method)


def root_values(
    lat: Lattice, r, reference=None, *, method: str = "sequential", trusted: bool = False
) -> jax.Array:
    """``V[0]`` float ``[S]``: the soft values before the first decision, ``log Z`` from every
    start state (``log Z(x) = V[0, lat.initial_state(x)]``), without keeping ``V[1:]``.

    Arguments as in ``soft_values``.

    Example:
        >>> from seqppl import SequenceSpace, Lattice
        >>> lat = Lattice.markov(SequenceSpace(vocab_size=2, length=3), order=1)
        >>> round(float(root_values(lat, jnp.zeros((3, 2)))[lat.initial]), 4)  # log 2^3
        2.0794
    """
    r, reference = _prepare(lat, r, reference, trusted=trusted)
    return backward(lat, _with_reference(lat, r, reference), "root", method=method)


def soft_bellman(
    lat: Lattice, r, reference=None, *, method: str = "sequential", trusted: bool = False
) -> tuple[jax.Array, jax.Array]:
    """M: the logits ``q = M(r)`` and soft values of local rewards ``r``.

    ``q[t, s, a] = r[t, s, a] + [a ≠ EOS] · V[t+1, δ(s, a)]``. With ``reference``, ``q`` is the
    residual: ``q[t, s, a] = r + [a ≠ EOS] · log E_{b ~ π_ref(·|δ(s,a))} exp q[t+1, δ(s,a), b]``.

    Args:
        lat: the lattice.
        r: float ``[S, A]`` or ``[T, S, A]``; −∞ marks forbidden actions.
        reference: optional reference logits, as in ``soft_values``.
        method: ``"sequential"`` or ``"parallel"`` in time, as in ``soft_values``.
        trusted: ``r`` and ``reference`` were already validated (internal calls: no host scan).

    Returns:
        ``(q, V)``: float ``[T, S, A]`` (−∞ for forbidden actions and actions into dead ends,
        and for non-EOS actions at a variable-length space's last decision) and float ``[T, S]``.

    Example:
        >>> from seqppl import SequenceSpace, Lattice
        >>> lat = Lattice.markov(SequenceSpace(vocab_size=2, length=2, eos=True), order=0)
        >>> q, V = soft_bellman(lat, jnp.zeros((1, 3)))
        >>> print(q[0, 0].round(4))  # log of the number of completions after 0, 1, EOS
        [1.0986 1.0986 0.    ]
    """
    r, reference = _prepare(lat, r, reference, trusted=trusted)
    q, values = backward(lat, _with_reference(lat, r, reference), "q", method=method)
    return _residual(q, _normalised(lat, reference)), values


def inverse_soft_bellman(
    lat: Lattice, q, reference=None, prompt=None, *, trusted: bool = False
) -> jax.Array:
    """M⁻¹: local rewards ``r`` with ``p_{R_r} = p_q`` from logits ``q`` on a lattice.

    ``r[t, s, a] = q[t, s, a] − [a ≠ EOS] · V_q[t+1, δ(s, a)]``, ``V_q[t] = logsumexp_a q[t]``
    (``V_q[T] = 0``). Non-EOS logits at a variable-length space's last decision are masked to
    −∞ first. An action into a state whose logits are all −∞ (unreachable under ``q``) gets −∞.
    With ``reference``, ``q`` is residual: ``r = M⁻¹(log π_ref + q) − log π_ref``.

    Args:
        lat: the lattice.
        q: float ``[S, A]`` or ``[T, S, A]`` logits.
        reference: optional reference logits, as in ``soft_values``.
        prompt: optional int ``[..., P]``: the prompts whose reachable states are checked.
        trusted: ``q`` (a valid ARM table) and ``prompt`` were already validated: no checks.

    Returns:
        float ``[T, S, A]``.

    Raises:
        ValueError: bad shape, NaN or +∞, or a reachable state (from ``prompt``) with no finite
            allowed logit: such a table is not a distribution (docs/theory.md#dead-ends).

    Example:
        >>> from seqppl import SequenceSpace, Lattice
        >>> lat = Lattice.markov(SequenceSpace(vocab_size=2, length=2), order=0)
        >>> print(inverse_soft_bellman(lat, jnp.zeros((1, 2)))[:, 0].round(4))
        [[-0.6931 -0.6931]
         [ 0.      0.    ]]
    """
    q, reference = _prepare(lat, q, reference, name="q", trusted=trusted)
    full = _with_reference(lat, q, reference)
    if not trusted:
        if prompt is not None and not isinstance(prompt, jax.core.Tracer):
            prompt = lat.space.validate_prompt(prompt)
        check_reachable(lat, full, prompt)
    return _residual(_inverse(lat, full), _normalised(lat, reference))


def path_rewards(logits, tokens, space: SequenceSpace | None = None) -> jax.Array:
    """Path-wise M⁻¹: per-step rewards ``r_t = q_t(y_t) − [y_t ≠ EOS] · logsumexp q_{t+1}``.

    Works for any logits, tabular or neural, in O(T·A): ``Σ_t r_t = log p_q(y) + V_q(x)`` with
    ``V_q(x) = logsumexp q_0``. With ``space``, its EOS rules apply: only EOS at the last decision
    of a variable-length space, and positions after the first EOS contribute 0. Without it the
    space is fixed-length with ``A = logits.shape[-1]``. Ids outside ``[0, A)``, and non-EOS
    tokens after EOS, score −∞.

    Args:
        logits: float ``[..., T, A]``, causal (entry t scores the action after ``y[:t]``).
        tokens: int ``[..., T]`` (batch dims broadcast against those of ``logits``).
        space: optional ``SequenceSpace``.

    Returns:
        float ``[..., T]``.

    Example:
        >>> logits = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
        >>> r = path_rewards(logits, jnp.array([0, 1]))
        >>> float(r.sum()).__round__(4), float(jnp.log(0.5 * 0.1)).__round__(4)
        (-2.9957, -2.9957)
    """
    logits = jnp.asarray(logits)
    tokens = jnp.asarray(tokens)
    if logits.ndim < 2 or tokens.shape[-1:] != logits.shape[-2:-1]:
        raise ValueError(
            f"logits [..., T, A] and tokens [..., T] must share T, got {logits.shape} and "
            f"{tokens.shape}"
        )
    num_actions = logits.shape[-1]
    if space is not None:
        if num_actions != space.num_actions or logits.shape[-2] != space.horizon:
            raise ValueError(
                f"logits must end in [T={space.horizon}, A={space.num_actions}], got {logits.shape}"
            )
        logits = space.mask_logits(logits)
    batch = jnp.broadcast_shapes(logits.shape[:-2], tokens.shape[:-1])
    logits = jnp.broadcast_to(logits, (*batch, *logits.shape[-2:]))
    tokens = jnp.broadcast_to(tokens, (*batch, tokens.shape[-1]))
    values = logsumexp(logits, -1)
    next_values = jnp.concatenate([values[..., 1:], jnp.zeros_like(values[..., :1])], axis=-1)
    in_range = (tokens >= 0) & (tokens < num_actions)
    safe = jnp.where(in_range, tokens, 0)
    chosen = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    chosen = jnp.where(in_range, chosen, NEG_INF)
    if space is None:
        return _minus_continuation(chosen, next_values)
    is_eos = tokens == space.eos_sentinel
    rewards = _minus_continuation(chosen, jnp.where(is_eos, 0, next_values))
    return space.after_eos(tokens, rewards)


def occupancy(lat: Lattice, r, prompt=None, *, trusted: bool = False) -> jax.Array:
    """``∂ log Z(x) / ∂ r[t, s, a]``: the probability that the state before decision t is s and
    ``y_t = a`` (docs/theory.md#occupancy-and-gradients). On a prefix tree this is the prefix
    marginal ``p(y_≤t | x)``.

    Computed as the gradient of the backward pass (forward–backward). A homogeneous ``[S, A]``
    table is broadcast to ``[T, S, A]`` first, so the result is always per decision.

    Args:
        lat: the lattice.
        r: float ``[S, A]`` or ``[T, S, A]``.
        prompt: optional int ``[P]``, a single prompt.
        trusted: ``r`` and ``prompt`` were already validated (internal calls).

    Returns:
        float ``[T, S, A]``; at decision t it sums to ``P(τ ≥ t)``, the probability that the
        response has not ended before t (1 in a fixed-length space; 0 if ``log Z = −∞``).
    """
    r, _ = _prepare(lat, r, None, trusted=trusted)
    r = per_decision(r, lat.space.horizon)
    start = lat.initial_state(prompt, trusted=trusted)
    if start.ndim:
        raise ValueError(f"occupancy takes a single prompt [P], got shape {jnp.shape(prompt)}")
    return jax.grad(lambda table: backward(lat, table, "root")[start])(r)


@jax.jit
def _inverse_core(next_index, q):
    values = logsumexp(q, -1)
    zero = jnp.zeros((1, 1), q.dtype)
    padded = jnp.concatenate([values[1:], jnp.zeros_like(values[:1])], axis=0)
    padded = jnp.concatenate([padded, jnp.broadcast_to(zero, (padded.shape[0], 1))], axis=1)
    continuation = padded[:, next_index]
    return _minus_continuation(q, continuation)


def _inverse(lat: Lattice, q: jax.Array) -> jax.Array:
    next_index = next_state_index(lat)
    q = lat.space.mask_logits(per_decision(q, lat.space.horizon), table=True)
    return _inverse_core(jnp.asarray(next_index), q)


def _minus_continuation(q, continuation):
    """``q − continuation``, −∞ where either is −∞ (an action into a dead end)."""
    dead = (q == NEG_INF) | (continuation == NEG_INF)
    return jnp.where(dead, NEG_INF, q - jnp.where(dead, 0, continuation))


# -- reference measure -----------------------------------------------------------------------


def _normalised(lat: Lattice, reference):
    """``log π_ref`` ``[T, S, A]`` from reference logits (last-decision mask applied), or None."""
    if reference is None:
        return None
    full = per_decision(reference, lat.space.horizon)
    return log_softmax(lat.space.mask_logits(full, table=True), -1)


def _with_reference(lat: Lattice, table, reference):
    log_ref = _normalised(lat, reference)
    if log_ref is None:
        return table
    return jnp.broadcast_to(table, log_ref.shape) + log_ref


def _residual(q, log_ref):
    if log_ref is None:
        return q
    impossible = log_ref == NEG_INF
    return jnp.where(impossible, NEG_INF, q - jnp.where(impossible, 0, log_ref))


# -- validation and masks --------------------------------------------------------------------


def _prepare(lat: Lattice, table, reference, name: str = "r", trusted: bool = False):
    if trusted:
        return jnp.asarray(table), None if reference is None else jnp.asarray(reference)
    return check_table(lat, table, name), (
        None if reference is None else check_table(lat, reference, "reference")
    )
