"""The soft Bellman transforms: M (EBM rewards → ARM logits) and M⁻¹ (THEORY.md §2).

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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.lattice import Lattice
from seqppl.logspace import NEG_INF, first_nan_or_pos_inf, log_softmax, logsumexp
from seqppl.space import SequenceSpace

METHODS = ("sequential", "parallel")
"""Schedules of the backward pass: a ``lax.scan`` over time, or an associative scan."""

__all__ = [
    "soft_bellman",
    "soft_values",
    "inverse_soft_bellman",
    "path_rewards",
    "occupancy",
]


def soft_values(lat: Lattice, r, reference=None, *, method: str = "sequential") -> jax.Array:
    """The soft values ``V[t, s]`` of local rewards ``r`` (the backward pass of M, no q written).

    ``V[t, s] = logsumexp_a (r[t, s, a] + [a ≠ EOS] · V[t+1, δ(s, a)])``; ``log Z(x) =
    V[0, lat.initial_state(x)]``. With ``reference`` (logits of ``π_ref``), the target is
    ``p ∝ p_ref · exp(R)`` and ``V`` is that of ``q' = log π_ref + q`` (THEORY §2).

    Args:
        lat: the lattice.
        r: float ``[S, A]`` or ``[T, S, A]``; −∞ marks forbidden actions.
        reference: optional float ``[S, A]`` or ``[T, S, A]`` reference logits (normalised here).
        method: ``"sequential"`` (a ``lax.scan`` over time, O(T·S·A)) or ``"parallel"`` (an
            associative scan over ``[S+1, S+1]`` transfer matrices: depth O(log T), work
            O(T·S³); for few states and long horizons on parallel hardware).

    Returns:
        float ``[T, S]``; −∞ for states with no complete continuation.

    Example:
        >>> from seqppl import SequenceSpace, Lattice
        >>> lat = Lattice.markov(SequenceSpace(vocab_size=2, length=3), order=1)
        >>> V = soft_values(lat, jnp.zeros((3, 2)))
        >>> V.shape, round(float(V[0, lat.initial]), 4)  # log 2^3
        ((3, 3), 2.0794)
    """
    r, reference = _prepare(lat, r, reference)
    return _backward(lat, _with_reference(lat, r, reference), write_q=False, method=method)


def soft_bellman(
    lat: Lattice, r, reference=None, *, method: str = "sequential"
) -> tuple[jax.Array, jax.Array]:
    """M: the logits ``q = M(r)`` and soft values of local rewards ``r``.

    ``q[t, s, a] = r[t, s, a] + [a ≠ EOS] · V[t+1, δ(s, a)]``. With ``reference``, ``q`` is the
    residual: ``q[t, s, a] = r + [a ≠ EOS] · log E_{b ~ π_ref(·|δ(s,a))} exp q[t+1, δ(s,a), b]``.

    Args:
        lat: the lattice.
        r: float ``[S, A]`` or ``[T, S, A]``; −∞ marks forbidden actions.
        reference: optional reference logits, as in ``soft_values``.
        method: ``"sequential"`` or ``"parallel"`` in time, as in ``soft_values``.

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
    r, reference = _prepare(lat, r, reference)
    q, values = _backward(lat, _with_reference(lat, r, reference), write_q=True, method=method)
    return _residual(q, _normalised(lat, reference)), values


def inverse_soft_bellman(lat: Lattice, q, reference=None, prompt=None) -> jax.Array:
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

    Returns:
        float ``[T, S, A]``.

    Raises:
        ValueError: bad shape, NaN or +∞, or a reachable state (from ``prompt``) with no finite
            allowed logit: such a table is not a distribution (THEORY §2, dead ends).

    Example:
        >>> from seqppl import SequenceSpace, Lattice
        >>> lat = Lattice.markov(SequenceSpace(vocab_size=2, length=2), order=0)
        >>> print(inverse_soft_bellman(lat, jnp.zeros((1, 2)))[:, 0].round(4))
        [[-0.6931 -0.6931]
         [ 0.      0.    ]]
    """
    q, reference = _prepare(lat, q, reference, name="q")
    full = _with_reference(lat, q, reference)
    _check_no_reachable_dead_end(lat, full, prompt)
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
    is_eos = tokens == (space.eos_id if space.eos else -1)
    rewards = _minus_continuation(chosen, jnp.where(is_eos, 0, next_values))
    return space.after_eos(tokens, rewards)


def occupancy(lat: Lattice, r, prompt=None) -> jax.Array:
    """``∂ log Z(x) / ∂ r[t, s, a]``: the probability that the state before decision t is s and
    ``y_t = a`` (THEORY §2). On a prefix tree this is the prefix marginal ``p(y_≤t | x)``.

    Computed as the gradient of the backward pass (forward–backward). A homogeneous ``[S, A]``
    table is broadcast to ``[T, S, A]`` first, so the result is always per decision.

    Args:
        lat: the lattice.
        r: float ``[S, A]`` or ``[T, S, A]``.
        prompt: optional int ``[P]``, a single prompt.

    Returns:
        float ``[T, S, A]``; at decision t it sums to ``P(τ ≥ t)``, the probability that the
        response has not ended before t (1 in a fixed-length space; 0 if ``log Z = −∞``).
    """
    r, _ = _prepare(lat, r, None)
    r = jnp.broadcast_to(r, (lat.space.horizon, *r.shape[-2:]))
    start = lat.initial_state(prompt)
    if start.ndim:
        raise ValueError(f"occupancy takes a single prompt [P], got shape {jnp.shape(prompt)}")
    return jax.grad(lambda table: _backward(lat, table, write_q=False)[0, start])(r)


# -- the dynamic program ---------------------------------------------------------------------


def _backward(lat: Lattice, r: jax.Array, write_q: bool, method: str = "sequential"):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    next_index = np.where(_eos_column(lat.space), lat.num_states, lat.delta)
    if method == "parallel":
        return _backward_parallel(
            jnp.asarray(next_index),
            r,
            horizon=lat.space.horizon,
            eos=lat.space.eos,
            write_q=write_q,
        )
    if lat.next_state_ignores_state:
        next_index = next_index[:1]
    return _backward_scan(
        jnp.asarray(next_index), r, horizon=lat.space.horizon, eos=lat.space.eos, write_q=write_q
    )


@functools.partial(jax.jit, static_argnames=("horizon", "eos", "write_q"))
def _backward_scan(next_index, r, *, horizon, eos, write_q):
    """Backward scan; ``next_index [S or 1, A]`` sends EOS to a sentinel state valued 0."""
    num_states = r.shape[-2]
    end = jnp.full((num_states,), NEG_INF if eos else 0, r.dtype)
    zero = jnp.zeros((1,), r.dtype)

    def step(v_next, r_t):
        continuation = jnp.concatenate([v_next, zero])[next_index]
        q_t = r_t + continuation
        v_t = logsumexp(q_t, -1)
        return v_t, ((q_t, v_t) if write_q else v_t)

    if r.ndim == 2:
        _, out = jax.lax.scan(lambda v, _: step(v, r), end, None, length=horizon, reverse=True)
    else:
        _, out = jax.lax.scan(step, end, r, reverse=True)
    return out


@functools.partial(jax.jit, static_argnames=("horizon", "eos", "write_q"))
def _backward_parallel(next_index, r, *, horizon, eos, write_q):
    """The same values by an associative scan over log-semiring transfer matrices (parallel in
    time: depth O(log T), work O(T·S³)).

    ``K_t[s, s'] = logsumexp_{a: next(s, a) = s'} r[t, s, a]`` on ``S + 1`` states (the last, a
    sentinel reached by EOS, keeps value 0: ``K_t[S, S] = 0``), so ``V[t] = K_t ⊗ V[t+1]`` and
    ``V[t] = (K_t ⊗ K_{t+1} ⊗ … ⊗ K_{T−1}) ⊗ V[T]``, the suffix products from
    ``lax.associative_scan`` (``⊗``: max-plus-style ``logsumexp`` matrix product).
    """
    num_states, num_actions = r.shape[-2:]
    r = jnp.broadcast_to(r, (horizon, num_states, num_actions))
    lands = next_index[:, :, None] == jnp.arange(num_states + 1)[None, None, :]  # [S, A, S+1]
    kernels = logsumexp(jnp.where(lands[None], r[..., None], NEG_INF), -2)  # [T, S, S + 1]
    sentinel = jnp.where(jnp.arange(num_states + 1) == num_states, 0.0, NEG_INF).astype(r.dtype)
    kernels = jnp.concatenate(
        [kernels, jnp.broadcast_to(sentinel, (horizon, 1, num_states + 1))], axis=-2
    )
    # reverse scan: combine(later suffix, earlier kernel) = earlier ⊗ later
    suffix = jax.lax.associative_scan(
        lambda later, earlier: _log_matmul(earlier, later), kernels, reverse=True
    )
    end = jnp.full((num_states + 1,), NEG_INF if eos else 0, r.dtype).at[-1].set(0)
    values = logsumexp(suffix + end[None, None, :], -1)  # [T, S + 1]
    if not write_q:
        return values[:, :num_states]
    following = jnp.concatenate([values[1:], end[None]], axis=0)  # V[t + 1], sentinel last
    q = r + following[:, next_index]
    return q, values[:, :num_states]


def _log_matmul(a, b):
    """``(a ⊗ b)[..., i, j] = logsumexp_k a[..., i, k] + b[..., k, j]``."""
    return logsumexp(a[..., :, :, None] + b[..., None, :, :], -2)


@jax.jit
def _inverse_core(next_index, q):
    values = logsumexp(q, -1)
    zero = jnp.zeros((1, 1), q.dtype)
    padded = jnp.concatenate([values[1:], jnp.zeros_like(values[:1])], axis=0)
    padded = jnp.concatenate([padded, jnp.broadcast_to(zero, (padded.shape[0], 1))], axis=1)
    continuation = padded[:, next_index]
    return _minus_continuation(q, continuation)


def _inverse(lat: Lattice, q: jax.Array) -> jax.Array:
    next_index = np.where(_eos_column(lat.space), lat.num_states, lat.delta)
    q = jnp.broadcast_to(q, (lat.space.horizon, *q.shape[-2:]))
    q = lat.space.mask_logits(q, table=True)
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
    full = jnp.broadcast_to(reference, (lat.space.horizon, *reference.shape[-2:]))
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


def _eos_column(space: SequenceSpace) -> np.ndarray:
    return (np.arange(space.num_actions) == (space.eos_id if space.eos else -1))[None, :]


def _prepare(lat: Lattice, table, reference, name: str = "r"):
    return _check_table(lat, table, name), (
        None if reference is None else _check_table(lat, reference, "reference")
    )


def _check_table(lat: Lattice, table, name: str, batched: bool = False) -> jax.Array:
    """A float table ``[S, A]`` or ``[T, S, A]`` on ``lat`` (with ``batched``, also a batch
    ``[*B, T, S, A]``); NaN and +∞ refused when concrete."""
    table = jnp.asarray(table)
    if not jnp.issubdtype(table.dtype, jnp.floating):
        table = table.astype(jnp.result_type(float))
    S, A, T = lat.num_states, lat.space.num_actions, lat.space.horizon
    if table.shape not in ((S, A), (T, S, A)) and not (
        batched and table.ndim > 3 and table.shape[-3:] == (T, S, A)
    ):
        shapes = f"[{S}, {A}] or [{T}, {S}, {A}]"
        shapes += f" or [*batch, {T}, {S}, {A}]" if batched else ""
        raise ValueError(f"{name} must have shape {shapes}, got {table.shape}")
    idx = first_nan_or_pos_inf(table)
    if idx is not None:
        raise ValueError(
            f"{name}{list(idx)} = {float(table[idx])}: tables may hold finite values or −∞ "
            "(a hard constraint), never NaN or +∞"
        )
    return table


def _check_no_reachable_dead_end(lat: Lattice, q: jax.Array, prompt) -> None:
    """Refuses logits where a state reachable from ``prompt`` has no finite allowed action."""
    if isinstance(q, jax.core.Tracer) or isinstance(prompt, jax.core.Tracer):
        return
    if q.ndim > 3:  # a batch of tables: each entry from its own prompt(s)
        prompt_batch = () if prompt is None else jnp.shape(prompt)[:-1]
        batch = jnp.broadcast_shapes(q.shape[:-3], prompt_batch)
        q = jnp.broadcast_to(q, (*batch, *q.shape[-3:]))
        if prompt is not None:
            prompt = jnp.broadcast_to(prompt, (*batch, jnp.shape(prompt)[-1]))
        for index in np.ndindex(*batch):
            _check_no_reachable_dead_end(lat, q[index], None if prompt is None else prompt[index])
        return
    space = lat.space
    full = jnp.broadcast_to(q, (space.horizon, *q.shape[-2:]))
    full = np.asarray(space.mask_logits(full, table=True))
    reach = np.zeros(lat.num_states, dtype=bool)
    reach[np.asarray(lat.initial_state(prompt)).ravel()] = True
    continues = ~_eos_column(space)[0]
    for t in range(space.horizon):
        finite = np.isfinite(full[t])
        dead = reach & ~finite.any(axis=1)
        if dead.any():
            s = int(np.argmax(dead))
            raise ValueError(
                f"q[{t}, {s}, :] has no finite logit, but state {s} is reachable at decision {t}: "
                "such a table is not a distribution (THEORY §2, dead ends)"
            )
        moves = finite & reach[:, None] & continues[None, :]
        reach = np.zeros_like(reach)
        reach[lat.delta[moves]] = True
