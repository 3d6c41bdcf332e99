"""ARM: an autoregressive model as a NumPyro distribution over token sequences (THEORY.md §1).

``p_q(y | x) = Π_{t ≤ τ} softmax(q(s_t, ·))[y_t]`` with logits from a lattice table or from any
causal function ``tokens [..., T] -> logits [..., T, A]``. ``log_prob`` is one teacher-forced
pass; ``sample`` is one ``lax.scan``.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import Distribution

from seqppl.bellman import _check_no_reachable_dead_end, _check_table, occupancy
from seqppl.distributions.ancestral import ancestral_sample
from seqppl.distributions.nnx import NNXFunction, module_params
from seqppl.distributions.support import (
    SequenceSupport,
    batch_shape_of,
    checked_prompt,
    enumerate_sequences,
    map_over_batch,
)
from seqppl.lattice import Lattice
from seqppl.logspace import log_softmax, logsumexp
from seqppl.space import SequenceSpace

__all__ = ["ARM", "PRECOMPUTED_CDF_MAX"]

PRECOMPUTED_CDF_MAX = 1 << 24
"""Largest table (entries) whose normalised rows and CDFs are precomputed for sampling."""


class ARM(Distribution):
    """Autoregressive sequence distribution; ``event_shape = (T,)``, batch shape from the prompt.

    Args:
        logits_fn: causal ``logits_fn(tokens [..., T]) -> [..., T, A]`` (entry t may read only
            ``tokens[..., :t]`` and the prompt), called as ``logits_fn(params, tokens)`` when
            ``params`` is given, with ``prompt=`` when the ARM has a prompt. If it also has
            ``init(batch_shape, prompt) -> (logits [*batch, A], state)`` and
            ``step(state, token) -> (logits, state)`` (``params`` first when given), sampling
            uses that cached step instead of re-evaluating the growing buffer (O(T²)).
        space: the ``SequenceSpace``.
        prompt: optional int ``[*batch, P]``.
        params: optional pytree of parameters (data: differentiable, traceable).
        validate_args: NumPyro's flag; adds its out-of-support warning to ``log_prob``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from seqppl import SequenceSpace, Lattice
        >>> space = SequenceSpace(vocab_size=2, length=2, eos=True)
        >>> arm = ARM.from_table(Lattice.markov(space, 0), jnp.zeros((1, 3)))
        >>> y = arm.sample(jax.random.key(0), (4,))
        >>> y.shape, arm.log_prob(jnp.array([2, 2, 2])).round(4).item()
        ((4, 3), -1.0986)
    """

    arg_constraints = {}
    has_enumerate_support = False
    pytree_data_fields = ("params", "prompt")
    pytree_aux_fields = ("space", "lattice", "logits_fn")

    def __init__(
        self, logits_fn, space: SequenceSpace, prompt=None, *, params=None, validate_args=None
    ):
        if not callable(logits_fn):
            raise TypeError(f"logits_fn must be callable, got {type(logits_fn).__name__}")
        self._setup(space, None, logits_fn, params, prompt, validate_args)

    @classmethod
    def from_table(cls, lat: Lattice, q, prompt=None, *, validate_args=None) -> ARM:
        """An ARM whose logits are a lattice table ``q`` (its params): ``[S, A]``, ``[T, S, A]``,
        or a batch of tables ``[*B, T, S, A]`` (batch shape: ``B`` broadcast with the prompt's).

        Raises:
            ValueError: bad shape, NaN/+∞, or a state reachable from ``prompt`` with no finite
                allowed logit (not a distribution).
        """
        q = _check_table(lat, q, "q", batched=True)
        _check_no_reachable_dead_end(lat, q, prompt)
        self = cls.__new__(cls)
        self._setup(lat.space, lat, None, q, prompt, validate_args)
        return self

    @classmethod
    def from_nnx(
        cls, module, space: SequenceSpace, prompt=None, *, params=None, validate_args=None
    ) -> ARM:
        """An ARM whose logits are a Flax NNX module's output; ``params`` its ``nnx.Param`` state.

        ``params`` (a pure nested dict, default: the module's own) is the ARM's data, so ``jit``,
        ``grad`` and ``with_params`` work on it; ``nnx_arm`` registers it as NumPyro sites. A
        module with pure ``init`` / ``step`` methods (see ``seqppl.distributions.nnx``) is
        sampled by cached steps.
        """
        logits_fn = NNXFunction(module)
        params = module_params(module) if params is None else params
        return cls(logits_fn, space, prompt, params=params, validate_args=validate_args)

    def _setup(self, space, lattice, logits_fn, params, prompt, validate_args):
        prompt = checked_prompt(space, prompt)
        self.space, self.lattice, self.logits_fn = space, lattice, logits_fn
        self.params, self.prompt = params, prompt
        batch = batch_shape_of(params if lattice is not None else None, prompt)
        super().__init__(batch, (space.horizon,), validate_args=validate_args)

    @property
    def support(self):
        return SequenceSupport(self.space)

    def with_params(self, params) -> ARM:
        """The same ARM with new ``params`` (for a table ARM: a new table, unchecked)."""
        new = copy.copy(self)
        new.params = params
        return new

    # -- logits -----------------------------------------------------------------------------

    def logits(self, tokens) -> jax.Array:
        """Raw logits ``[..., T, A]`` of each decision along ``tokens [..., T]`` (no mask)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if self.lattice is None:
            return self._call(self.logits_fn, tokens)
        table = self._full_table()  # [*B, T, S, A]
        states = self.lattice.states(tokens, self.prompt)
        T, S, A = table.shape[-3:]
        batch = table.shape[:-3]
        lead = jnp.broadcast_shapes(states.shape[:-1], batch)
        positions = jnp.broadcast_to(jnp.arange(T), (*lead, T))
        rows = positions * S + jnp.broadcast_to(states, (*lead, T))  # row of (t, s_t)
        flat = table.reshape((1,) * (len(lead) - len(batch)) + (*batch, T * S, A))
        return jnp.take_along_axis(flat, rows[..., None], axis=-2)

    def log_policies(self, tokens) -> jax.Array:
        """Normalised next-token log-probabilities ``log π(· | s_t)`` ``[..., T, A]`` at every
        decision along ``tokens [..., T]`` (space mask applied; rows after EOS are not used)."""
        return log_softmax(self.space.mask_logits(self.logits(tokens)), -1)

    def log_policy_table(self) -> jax.Array:
        """Table ARMs: ``log π[t, s, a]`` ``[*B, T, S, A]`` (last-decision mask applied)."""
        if self.lattice is None:
            raise ValueError("log_policy_table needs a table ARM (ARM.from_table)")
        return log_softmax(self.space.mask_logits(self._full_table(), table=True), -1)

    def _full_table(self):
        q = jnp.asarray(self.params)
        return q if q.ndim > 2 else jnp.broadcast_to(q, (self.space.horizon, *q.shape))

    def _call(self, fn, *args):
        args = args if self.params is None else (self.params, *args)
        return fn(*args) if self.prompt is None else fn(*args, prompt=self.prompt)

    # -- Distribution API -------------------------------------------------------------------

    def log_prob(self, value, intermediates=None):
        """``log p_q(y)`` ``[...]``; −∞ outside the support (never NaN, never raises).

        With ``intermediates`` (the step log-probs from ``sample_with_intermediates``) it is
        their sum, with no second pass.
        """
        if intermediates:
            return jnp.sum(intermediates[0], -1)
        value = jnp.asarray(value)
        if self._validate_args:
            self._validate_sample(value)
        if value.ndim == 0 or value.shape[-1] != self.space.horizon:
            return jnp.full(value.shape[:-1], -jnp.inf)
        ok = self.support(value)
        safe = jnp.where(ok[..., None], value, self.support.feasible_like(value)).astype(jnp.int32)
        if self.lattice is not None and jnp.ndim(self.params) == 2:
            log_p = self._homogeneous_log_prob(safe)
        elif self.lattice is not None:
            log_p = self.lattice.path_scores(self.log_policy_table(), safe, self.prompt).sum(-1)
        else:
            chosen = jnp.take_along_axis(self.log_policies(safe), safe[..., None], -1)[..., 0]
            log_p = jnp.sum(jnp.where(self.space.active(safe), chosen, 0), -1)
        return jnp.where(jnp.broadcast_to(ok, log_p.shape), log_p, -jnp.inf)

    def _homogeneous_log_prob(self, tokens):
        """``Σ_t q[s_t, y_t] − logsumexp q[s_t, ·]`` for an ``[S, A]`` table, normalising the
        ``S`` rows once instead of a ``[T, S, A]`` copy. At the last decision of an EOS space
        only EOS is allowed: a well-formed sequence (``tokens`` is) takes it with probability 1.
        """
        q = jnp.asarray(self.params)
        states = self.lattice.states(tokens, self.prompt)
        steps = q[states, tokens] - logsumexp(q, -1)[states]
        if self.space.eos:  # EOS forced: log 1, or −∞ if the table forbids it there
            last = q[states[..., -1], self.space.eos_id]
            steps = steps.at[..., -1].set(jnp.where(last == -jnp.inf, -jnp.inf, 0.0))
        active = jnp.broadcast_to(self.space.active(tokens), steps.shape)
        return jnp.sum(jnp.where(active, steps, 0), -1)

    def sample_with_intermediates(self, key, sample_shape=()):
        """``(tokens [*sample, *batch, T], [step log-probs [*sample, *batch, T]])``."""
        shape = tuple(sample_shape) + self.batch_shape
        tokens, log_ps = ancestral_sample(key, shape, self.space, *self.decoder(shape))
        return tokens, [log_ps]

    def decoder(self, shape):
        """``(state, next_logits(state, t) -> [*shape, A], advance(state, token, t) -> state)``
        for decoding ``shape`` sequences (``shape`` ends with ``batch_shape``).

        Raw (unmasked) logits; the state is the lattice state for table ARMs, the cached-step
        state when ``logits_fn`` has ``init``/``step``, else a token buffer ``[*shape, T]``
        re-evaluated each step. Non-scalar state leaves lead with ``shape`` (resamplers gather
        them along those axes)."""
        if self.lattice is not None:
            delta = jnp.asarray(self.lattice.delta)
            start = jnp.broadcast_to(self.lattice.initial_state(self.prompt), shape)
            return start, self._table_policy(), lambda s, token, t: delta[s, token]
        if hasattr(self.logits_fn, "init") and hasattr(self.logits_fn, "step"):
            first = self._call(self.logits_fn.init, shape)
            return first, lambda c, t: c[0], lambda c, token, t: self._call_step(c[1], token)
        buffer = jnp.full((*shape, self.space.horizon), self.support.feasible_like(0))
        return (
            buffer,
            lambda b, t: jnp.take(self.logits(b), t, axis=-2),
            lambda b, token, t: b.at[..., t].set(token),
        )

    def _table_policy(self):
        """``(state, t) -> (cumulative π rows [*shape, A], log_prob_of(token))`` from tables
        normalised and accumulated once (``PRECOMPUTED_CDF_MAX`` entries at most; beyond that
        the raw rows, normalised per step by the sampler)."""
        q = jnp.asarray(self.params)
        horizon = self.space.horizon
        if q.size * (2 if q.ndim == 2 else 1) > PRECOMPUTED_CDF_MAX:
            return _table_rows(q)
        if q.ndim == 2:  # homogeneous: one table for t < T − 1, one for the last decision
            time_index = lambda t: jnp.asarray(t == horizon - 1, jnp.int32)  # noqa: E731
            mask = np.stack([np.ones(self.space.num_actions, bool), self.space.action_mask()[-1]])
            log_pi = log_softmax(jnp.where(mask[:, None, :], q, -jnp.inf), -1)
        else:
            time_index = lambda t: t  # noqa: E731
            log_pi = self.log_policy_table()
        cdf_rows = _table_rows(jnp.cumsum(jnp.exp(log_pi), -1))
        if log_pi.ndim == 3:  # one scalar gather per sequence for log π(token)

            def log_prob_of(s, t):
                return lambda a: log_pi[t, s, a]
        else:
            log_rows = _table_rows(log_pi)

            def log_prob_of(s, t):
                rows = log_rows(s, t)
                return lambda a: jnp.take_along_axis(rows, a[..., None], -1)[..., 0]

        return lambda s, t: (cdf_rows(s, time_index(t)), log_prob_of(s, time_index(t)))

    def _call_step(self, state, token):
        step = self.logits_fn.step
        return step(state, token) if self.params is None else step(self.params, state, token)

    def sample(self, key, sample_shape=()):
        """Ancestral samples ``[*sample_shape, *batch_shape, T]`` (EOS-padded)."""
        return self.sample_with_intermediates(key, sample_shape)[0]

    def enumerate_support(self, expand=True):
        """Every sequence ``[N, *batch, T]`` (``[N, 1.., T]`` unexpanded); small spaces only."""
        return enumerate_sequences(self.space, self.batch_shape, expand)

    def entropy(self):
        """Exact ``H(p_q) = −Σ_{t,s,a} μ_t(s, a) log π_t(a|s)`` for table ARMs, ``[*batch]``.

        ``μ`` is the occupancy (THEORY §2) of the normalised table. Callable ARMs: estimate it
        as ``−mean(log_prob(samples))``.
        """
        if self.lattice is None:
            raise ValueError(
                "entropy() is exact for table ARMs; for a callable ARM use "
                "-arm.log_prob(arm.sample(key, (n,))).mean()"
            )

        def one(table, prompt):
            mu = occupancy(self.lattice, table, prompt)
            return -jnp.sum(jnp.where(mu > 0, mu * jnp.where(mu > 0, table, 0), 0))

        return map_over_batch(one, self.batch_shape, self.log_policy_table(), self.prompt)

    def tilt(self, reward, scale=1.0):
        """The EBM ``p ∝ p_arm · exp(scale · R)``; ``reward`` an EBM or ``reward_fn(tokens)``."""
        from seqppl.distributions.ebm import EBM

        return EBM._tilt(self, reward, scale)


def _table_rows(q):
    """``(states [*shape], t) -> q[..., t, s, :]`` rows ``[*shape, A]`` of a table ARM's
    ``[S, A]``, ``[T, S, A]`` or ``[*B, T, S, A]`` logits (``B`` trailing in ``shape``)."""
    if q.ndim == 2:
        return lambda s, t: q[s]
    if q.ndim == 3:
        return lambda s, t: q[t][s]

    def rows(s, t):
        at_t = jnp.take(q, t, axis=-3)  # [*B, S, A]
        at_t = at_t.reshape((1,) * (s.ndim - at_t.ndim + 2) + at_t.shape)
        return jnp.take_along_axis(at_t, s[..., None, None], axis=-2)[..., 0, :]

    return rows
