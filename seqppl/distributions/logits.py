"""Where an ARM's logits come from: a table on a lattice, or a causal function.

Each source is a small frozen pytree (arrays and parameters are data; the lattice, the function
and the space are static) that answers, in one body each, what an ARM asks of it: the raw logits
``q(s_t, ·)`` along tokens, ``log p_q(y) = Σ_{t ≤ τ} log softmax(q(s_t, ·))[y_t]`` of well-formed
tokens, a decoder for ancestral sampling and, for tables, the exact entropy:

- ``TableLogits``: logits ``q[t, s, a]`` on a lattice (``[S, A]``, ``[T, S, A]`` or a batch);
- ``FunctionLogits``: ``logits_fn(tokens [..., T]) -> [..., T, A]``, causal; decoded by
  re-evaluating a token buffer (O(T²) work);
- ``CachedFunctionLogits``: a ``logits_fn`` that also follows the ``CachedLogits`` protocol,
  decoded one cached step per decision.

``function_logits`` picks between the last two and checks the protocol when the ARM is built.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.bellman import occupancy
from seqppl.checks import check_logits
from seqppl.distributions.support import SequenceSupport, map_over_batch
from seqppl.lattice import Lattice
from seqppl.logspace import log_softmax
from seqppl.space import SequenceSpace
from seqppl.tables import path_entries, path_rows, per_decision, step_rows, table_batch_shape

__all__ = [
    "CachedLogits",
    "TableLogits",
    "FunctionLogits",
    "CachedFunctionLogits",
    "function_logits",
    "PRECOMPUTED_CDF_MAX",
]

PRECOMPUTED_CDF_MAX = 1 << 24
"""Largest table (entries) whose normalised rows and CDFs are precomputed for sampling."""


@runtime_checkable
class CachedLogits(Protocol):
    """The cached-step protocol of a ``logits_fn`` (``params`` first in each call when the ARM
    has ``params``; ``prompt=`` when it has a prompt):

    - ``__call__(tokens [..., T]) -> logits [..., T, A]``, causal (teacher forcing);
    - ``init(batch_shape) -> (logits [*batch_shape, A], cache)``: the first decision;
    - ``step(cache, token [*batch_shape]) -> (logits [*batch_shape, A], cache)``: the next one.

    ``cache`` is a pytree of arrays whose non-scalar leaves lead with ``batch_shape`` (SMC
    resamples them along those axes; scalar leaves are shared). The ARM checks this once, when it
    is built, with ``jax.eval_shape``, together with ``__call__`` on tokens ``[..., T]`` (so that
    a length ``__call__`` refuses is refused before ``sample`` runs the steps).
    """

    def __call__(self, *args, **kwargs):
        """Logits ``[..., T, A]`` of every decision along tokens ``[..., T]``."""

    def init(self, *args, **kwargs):
        """``(logits [*batch_shape, A], cache)`` of the first decision."""

    def step(self, *args, **kwargs):
        """``(logits [*batch_shape, A], cache)`` of the next decision after ``token``."""


@dataclasses.dataclass(frozen=True, eq=False)
class TableLogits:
    """Logits ``q[t, s, a]`` on a lattice: ``[S, A]``, ``[T, S, A]`` or ``[*B, T, S, A]``."""

    table: jax.Array
    lattice: Lattice

    @property
    def params(self):
        """The table (the ARM's trainable parameters)."""
        return self.table

    def with_params(self, table) -> TableLogits:
        """The same lattice with another table (unchecked)."""
        return dataclasses.replace(self, table=table)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """``B`` of a batch of tables, else ``()``."""
        return table_batch_shape(self.table)

    def logits(self, tokens, prompt) -> jax.Array:
        """Raw logits ``[..., T, A]`` along int32 ``tokens [..., T]``."""
        return path_rows(self.table, self.lattice.states(tokens, prompt, trusted=True))

    def log_policy_table(self) -> jax.Array:
        """``log π[t, s, a]`` ``[*B, T, S, A]`` (the last-decision mask applied)."""
        space = self.lattice.space
        full = per_decision(self.table, space.horizon)
        return log_softmax(space.mask_logits(full, table=True), -1)

    def log_prob(self, tokens, prompt) -> jax.Array:
        """``log p_q(y)`` ``[...]`` of int32 ``tokens [..., T]``; −∞ for arrays outside the
        support, decided entry by entry in the same pass (``space.after_eos``), never NaN.

        An ``[S, A]`` table normalises its ``S`` rows once (no ``[T, S, A]`` copy) and reads one
        entry per token; at the last decision of an EOS space only EOS is allowed, which a
        sequence takes with probability 1 (or 0 where the table forbids it).
        """
        space, q = self.lattice.space, self.table
        safe = jnp.where((tokens >= 0) & (tokens < space.num_actions), tokens, 0)
        states = self.lattice.states(safe, prompt, trusted=True, exact_after_eos=False)
        if q.ndim == 2:
            steps = path_entries(log_softmax(q, -1), states, safe)  # one gather
            if space.eos:
                last = q[states[..., -1], space.eos_id]
                steps = steps.at[..., -1].set(jnp.where(last == -jnp.inf, -jnp.inf, 0.0))
        else:  # normalised once, then one gather (not a normaliser gathered per entry)
            log_pi = jax.lax.optimization_barrier(self.log_policy_table())
            steps = path_entries(log_pi, states, safe)
        return jnp.sum(space.after_eos(jnp.broadcast_to(tokens, steps.shape), steps), -1)

    def decoder(self, shape, prompt):
        """``(lattice states [*shape], next_logits, advance)`` for ``ancestral_sample``; the
        policy rows come normalised and accumulated once (``PRECOMPUTED_CDF_MAX``)."""
        delta = jnp.asarray(self.lattice.delta)
        start = jnp.broadcast_to(self.lattice.initial_state(prompt, trusted=True), shape)
        return start, self._policy(), lambda s, token, t: delta[s, token]

    def _policy(self):
        """``(state, t) -> (cumulative π rows [*shape, A], log_prob_of(token))``, from tables
        normalised and accumulated once; beyond ``PRECOMPUTED_CDF_MAX`` entries the raw rows,
        normalised per step by the sampler."""
        q, space = self.table, self.lattice.space
        horizon = space.horizon
        if q.size * (2 if q.ndim == 2 else 1) > PRECOMPUTED_CDF_MAX:
            return lambda s, t: step_rows(q, s, t)
        if q.ndim == 2:  # homogeneous: one table for t < T − 1, one for the last decision
            time_index = lambda t: jnp.asarray(t == horizon - 1, jnp.int32)  # noqa: E731
            mask = np.stack([np.ones(space.num_actions, bool), space.action_mask()[-1]])
            log_pi = log_softmax(jnp.where(mask[:, None, :], q, -jnp.inf), -1)
        else:
            time_index = lambda t: t  # noqa: E731
            log_pi = self.log_policy_table()
        cumulative = jnp.cumsum(jnp.exp(log_pi), -1)

        def log_prob_of(s, t):
            if log_pi.ndim == 3:  # one scalar gather per sequence
                return lambda a: log_pi[t, s, a]
            rows = step_rows(log_pi, s, t)
            return lambda a: jnp.take_along_axis(rows, a[..., None], -1)[..., 0]

        return lambda s, t: (
            step_rows(cumulative, s, time_index(t)),
            log_prob_of(s, time_index(t)),
        )

    def entropy(self, prompt, batch_shape) -> jax.Array:
        """Exact ``H(p_q) = −Σ_{t,s,a} μ_t(s, a) log π_t(a|s)`` ``[*batch]``, ``μ`` the occupancy
        of the normalised table."""
        lattice = self.lattice

        def one(log_pi, prompt):
            mu = occupancy(lattice, log_pi, prompt, trusted=True)
            return -jnp.sum(jnp.where(mu > 0, mu * jnp.where(mu > 0, log_pi, 0), 0))

        return map_over_batch(one, batch_shape, self.log_policy_table(), prompt)


@dataclasses.dataclass(frozen=True, eq=False)
class FunctionLogits:
    """Logits from a causal ``fn(tokens [..., T]) -> [..., T, A]`` (``fn(params, tokens)`` with
    ``params``; ``prompt=`` with a prompt)."""

    params: Any
    fn: Any
    space: SequenceSpace
    lattice = None
    batch_shape = ()

    def with_params(self, params) -> FunctionLogits:
        """The same function with other parameters."""
        return dataclasses.replace(self, params=params)

    def _call(self, method, prompt, *args):
        args = args if self.params is None else (self.params, *args)
        return method(*args) if prompt is None else method(*args, prompt=prompt)

    def logits(self, tokens, prompt) -> jax.Array:
        """Raw logits ``[..., T, A]`` along int32 ``tokens [..., T]`` (one call of ``fn``).

        Raises:
            ValueError: ``fn``'s output is not ``[..., T, A]`` (static: also under ``jit``), or
                holds NaN/+∞ where concrete (``checks.check_logits``).
        """
        out = self._call(self.fn, prompt, tokens)
        return check_logits(out, tokens, self.space.num_actions)

    def log_policy_table(self):
        """A callable ARM has no table: ``ValueError``."""
        raise ValueError("log_policy_table needs a table ARM (ARM.from_table)")

    def log_prob(self, tokens, prompt) -> jax.Array:
        """``log p_q(y)`` ``[...]`` of int32 ``tokens [..., T]``: one teacher-forced pass, the
        space's last-decision mask applied. Arrays outside the support score −∞; they are
        replaced by a feasible sequence before ``fn`` sees them (it may index with tokens).
        NaN/+∞ logits are refused where concrete; under tracing they make the result NaN."""
        space = self.space
        ok = SequenceSupport(space)(tokens)
        safe = jnp.where(ok[..., None], tokens, SequenceSupport(space).feasible_like(tokens))
        log_pi = log_softmax(space.mask_logits(self.logits(safe, prompt)), -1)
        chosen = jnp.take_along_axis(log_pi, safe[..., None], -1)[..., 0]
        log_p = jnp.sum(jnp.where(space.active(safe), chosen, 0), -1)
        return jnp.where(jnp.broadcast_to(ok, log_p.shape), log_p, -jnp.inf)

    def decoder(self, shape, prompt):
        """``(token buffer [*shape, T], next_logits, advance)``: the whole buffer re-evaluated
        at every decision (use the ``CachedLogits`` protocol to avoid it)."""
        fill = self.space.eos_id if self.space.eos else 0
        buffer = jnp.full((*shape, self.space.horizon), fill, jnp.int32)
        return (
            buffer,
            lambda b, t: jnp.take(self.logits(b, prompt), t, axis=-2),
            lambda b, token, t: b.at[..., t].set(token),
        )

    def entropy(self, prompt, batch_shape):
        """Not exact for a callable ARM: ``ValueError`` naming the Monte Carlo estimate."""
        raise ValueError(
            "entropy() is exact for table ARMs; for a callable ARM use "
            "-arm.log_prob(arm.sample(key, (n,))).mean()"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class CachedFunctionLogits(FunctionLogits):
    """A ``FunctionLogits`` whose ``fn`` follows ``CachedLogits``: decoded by cached steps."""

    def decoder(self, shape, prompt):
        """``((logits [*shape, A], cache), next_logits, advance)`` from ``fn.init``/``fn.step``."""
        first = self._call(self.fn.init, prompt, shape)
        fn, width = self.fn, self.space.num_actions
        step = fn.step if self.params is None else functools.partial(fn.step, self.params)

        def advance(c, token, t):
            logits, cache = step(c[1], token)
            if jnp.shape(logits) != (*jnp.shape(token), width):  # static
                raise ValueError(
                    f"logits_fn.step(cache, token) returned logits of shape {jnp.shape(logits)} "
                    f"for tokens of shape {jnp.shape(token)}; expected {(*jnp.shape(token), width)}"
                )
            return logits, cache

        return first, lambda c, t: c[0], advance


for _cls, _data, _meta in (
    (TableLogits, ["table"], ["lattice"]),
    (FunctionLogits, ["params"], ["fn", "space"]),
    (CachedFunctionLogits, ["params"], ["fn", "space"]),
):
    jax.tree_util.register_dataclass(_cls, data_fields=_data, meta_fields=_meta)


def function_logits(fn, space: SequenceSpace, params, prompt, batch_shape) -> FunctionLogits:
    """The source for a callable ``fn``: cached when it follows ``CachedLogits``.

    Raises:
        TypeError: ``fn`` is not callable, has only one of ``init``/``step``, or its cache has a
            non-scalar leaf that does not lead with the batch of sequences decoded.
    """
    if not callable(fn):
        raise TypeError(f"logits_fn must be callable, got {type(fn).__name__}")
    has = [callable(getattr(fn, name, None)) for name in ("init", "step")]
    if not any(has):
        return FunctionLogits(params, fn, space)
    if not all(has):
        present, missing = ("init", "step") if has[0] else ("step", "init")
        raise TypeError(
            f"logits_fn has {present} but no {missing}: the cached-step protocol "
            "(seqppl.CachedLogits) needs both init(batch_shape) and step(cache, token)"
        )
    source = CachedFunctionLogits(params, fn, space)
    _check_cache_layout(source, prompt, batch_shape)
    return source


def _check_cache_layout(source: CachedFunctionLogits, prompt, batch_shape) -> None:
    """The teacher-forcing call accepts the space's tokens ``[*shape, T]`` and returns
    ``[*shape, T, A]`` (so a length it refuses, e.g. a Transformer's ``max_len``, is refused
    here, before ``sample`` runs the cached steps, which cannot raise), and every non-scalar
    leaf of ``init``'s output leads with the decoded batch: checked abstractly with
    ``jax.eval_shape``, the layout only when parameters and prompt are concrete."""
    shape = (3, *batch_shape)  # an unusual lead, so that a hard-coded batch shows
    tokens = jax.ShapeDtypeStruct((*shape, source.space.horizon), jnp.int32)
    jax.eval_shape(lambda s, y, x: s.logits(y, x), source, tokens, prompt)
    leaves = jax.tree.leaves((source.params, prompt))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return
    state = jax.eval_shape(lambda: source.decoder(shape, prompt)[0])
    logits, cache = state
    if logits.shape != (*shape, source.space.num_actions):
        raise TypeError(
            f"logits_fn.init({shape}) returned logits of shape {logits.shape}, expected "
            f"{(*shape, source.space.num_actions)}"
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
        if leaf.ndim and leaf.shape[: len(shape)] != shape:
            raise TypeError(
                f"logits_fn.init({shape}) returned a cache leaf {jax.tree_util.keystr(path)} of "
                f"shape {leaf.shape}: non-scalar cache leaves must lead with the batch {shape} "
                "(SMC resamples them along it)"
            )
