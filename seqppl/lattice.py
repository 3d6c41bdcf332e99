"""Finite-state lattices: the state a local reward may read from a prefix (docs/theory.md#lattices).

A lattice is a deterministic automaton over the actions of a ``SequenceSpace``: ``S`` states, a
transition table ``δ: [S, A] → S`` and an initial state per prompt. Tables of local rewards or
logits on it are ``[S, A]`` (the same at every decision) or ``[T, S, A]``. Four constructions:

- ``prefix_tree``: every prefix is its own state (the exact "function space"; size ~V^T);
- ``markov``: the state is the last ``k`` tokens, padded at the start (an n-gram context);
- ``automaton``: a user DFA;
- ``product``: pairs of states, ``δ((u, v), a) = (δ_1(u, a), δ_2(v, a))``.

The EOS action ends the response, so its transition is never followed: δ(s, EOS) = s here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.checks import check_counts
from seqppl.constraints import (
    accepting_mask,
    compile_regex,
    json_schema_regex,
    product_accepting,
    token_texts,
)
from seqppl.space import SequenceSpace
from seqppl.tables import path_entries

__all__ = ["Lattice", "MAX_PREFIX_TREE_CELLS"]

MAX_PREFIX_TREE_CELLS = 1 << 24
"""Largest ``S·A`` a prefix tree may have (16,777,216 cells per decision)."""


@dataclass(frozen=True, eq=False)
class Lattice:
    """A deterministic finite-state lattice over a sequence space (immutable; hashed by identity).

    Build one with ``prefix_tree``, ``markov``, ``automaton`` or ``a.product(b)``.

    Attributes:
        space: the ``SequenceSpace``.
        delta: int32 ``[S, A]``, the next state after each action (δ(s, EOS) = s).
        initial: the state before the first decision when there is no prompt.
        kind: "prefix_tree", "markov", "automaton" or "product".
        factors: for a product, the two component lattices; else ``()``.
        reads_prompt: whether a prompt moves the initial state (False for a prefix tree, which
            hangs below the prompt).
        order: the context length ``k`` of a Markov lattice (None for the other kinds).
        accepting: bool ``[S]``, the accepting states of an automaton compiled from a
            specification (``regex``, ``json_schema``) or given to ``automaton``; a product
            accepts where every factor that has accepting states accepts; else None.

    Example:
        >>> space = SequenceSpace(vocab_size=2, length=3)
        >>> lat = Lattice.markov(space, order=1)
        >>> lat.num_states, lat.delta.shape, int(lat.initial_state([1, 0]))
        (3, (3, 2), 0)
    """

    space: SequenceSpace
    delta: np.ndarray
    initial: int
    kind: str
    factors: tuple = ()
    reads_prompt: bool = True
    _factor_states: tuple = field(default=(), repr=False)
    order: int | None = None
    accepting: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_states(self) -> int:
        """``S``, the number of states."""
        return self.delta.shape[0]

    @cached_property
    def next_state_ignores_state(self) -> bool:
        """True when δ(s, a) depends on ``a`` only for every token (e.g. Markov order 1)."""
        tokens = self.delta[:, : self.space.vocab_size]
        return bool((tokens == tokens[:1]).all())

    # -- constructors -------------------------------------------------------------------------

    @classmethod
    def prefix_tree(cls, space: SequenceSpace) -> Lattice:
        """Every prefix of length ``0..T-1`` is a state, in breadth-first order (root = 0).

        The prefix ``y_<t`` with base-V value ``n`` is state ``Σ_{j<t} V^j + n``. Children of the
        deepest prefixes do not exist; their δ points to the prefix itself and is never used.

        Raises:
            ValueError: if ``S·A > MAX_PREFIX_TREE_CELLS``.
        """
        V, T, A = space.vocab_size, space.horizon, space.num_actions
        if T > MAX_PREFIX_TREE_CELLS or (V > 1 and (T - 1) * np.log2(V) > 24):
            sizes = [MAX_PREFIX_TREE_CELLS]  # too large: refuse without building big ints
        else:
            sizes = [V**d for d in range(T)]
        if sum(sizes) * A > MAX_PREFIX_TREE_CELLS:
            raise ValueError(
                f"a prefix tree over V={V}, T={T} has {sum(sizes)} states x {A} actions, more "
                f"than MAX_PREFIX_TREE_CELLS={MAX_PREFIX_TREE_CELLS}; use Lattice.markov or "
                "Lattice.automaton"
            )
        offsets = np.cumsum([0] + sizes)
        delta = np.tile(np.arange(offsets[-1], dtype=np.int64)[:, None], (1, A))
        for depth in range(T - 1):
            n = np.arange(sizes[depth])
            children = offsets[depth + 1] + n[:, None] * V + np.arange(V)[None, :]
            delta[offsets[depth] : offsets[depth + 1], :V] = children
        return cls(space, _as_delta(delta), 0, "prefix_tree", reads_prompt=False)

    @classmethod
    def markov(cls, space: SequenceSpace, order: int) -> Lattice:
        """States are the last ``order`` tokens, base ``V+1`` digits with pad ``V`` at the start.

        ``S = (V+1)^k``; state ``Σ_i c_i (V+1)^(k-1-i)`` for context ``(c_0..c_{k-1})``, oldest
        first; ``δ(s, a) = (s·(V+1) mod S) + a``. The empty context (all pads) is the initial state;
        a prompt's last ``k`` tokens set it.
        """
        check_counts(("order", order, 0))
        base, V = space.vocab_size + 1, space.vocab_size
        if order * np.log2(base) + np.log2(space.num_actions) > 30:
            raise ValueError(
                f"markov order {order} over V={V} has {base}^{order} states x "
                f"{space.num_actions} actions: more than 2^30 cells"
            )
        num_states = base**order
        states = np.arange(num_states, dtype=np.int64)[:, None]
        delta = np.tile(states, (1, space.num_actions))
        delta[:, :V] = (states * base) % num_states + np.arange(V)[None, :] if order else 0
        return cls(space, _as_delta(delta), num_states - 1, "markov", order=int(order))

    @classmethod
    def automaton(cls, space: SequenceSpace, delta, initial: int = 0, accepting=None) -> Lattice:
        """A user DFA with transition table ``delta`` int ``[S, V]`` or ``[S, A]``.

        With ``[S, V]`` in a variable-length space the EOS column is added (δ(s, EOS) = s); a
        given EOS column is replaced by that self-loop. ``accepting`` (state ids or bool
        ``[S]``, optional) is kept as ``lattice.accepting``, the default of ``constrain``;
        acceptance is expressed as rewards, see ``accepting_rewards``.
        """
        table = np.asarray(delta)
        if table.dtype == bool or not np.issubdtype(table.dtype, np.integer):
            raise ValueError(f"delta must be an integer array, got dtype {table.dtype}")
        if table.ndim != 2 or table.shape[1] not in (space.vocab_size, space.num_actions):
            raise ValueError(
                f"delta must have shape [S, {space.vocab_size}] or [S, {space.num_actions}], "
                f"got {table.shape}"
            )
        num_states = table.shape[0]
        tokens = table[:, : space.vocab_size]
        bad = (tokens < 0) | (tokens >= num_states)
        if bad.any():
            s, a = (int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"delta[{s}, {a}] = {int(tokens[s, a])} is not in [0, {num_states - 1}]"
            )
        if not isinstance(initial, (int, np.integer)) or not 0 <= initial < num_states:
            raise ValueError(f"initial must be a state in [0, {num_states - 1}], got {initial!r}")
        full = np.tile(np.arange(num_states)[:, None], (1, space.num_actions))
        full[:, : space.vocab_size] = tokens
        accept = None if accepting is None else accepting_mask(accepting, num_states)
        return cls(space, _as_delta(full), int(initial), "automaton", accepting=accept)

    @classmethod
    def regex(cls, space: SequenceSpace, pattern: str, tokens) -> Lattice:
        """The DFA of token sequences whose text (the concatenation of their tokens' texts)
        fullmatches ``pattern`` (Rust ``regex`` syntax), compiled by outlines-core, with its
        ``accepting`` states (``seqppl.constraints``). ``tokens``: ``V`` strings, one per id,
        or a ``tokenizers.Tokenizer``. States that cannot reach acceptance are one dead state."""
        delta, initial, accepting = compile_regex(pattern, token_texts(tokens, space.vocab_size))
        return cls.automaton(space, delta, initial, accepting)

    @classmethod
    def json_schema(cls, space: SequenceSpace, schema, tokens, whitespace=None) -> Lattice:
        """``regex`` of the JSON documents valid under ``schema`` (a dict or a JSON string);
        ``whitespace``: the pattern allowed between JSON tokens (default ``[ ]?``)."""
        return cls.regex(space, json_schema_regex(schema, whitespace), tokens)

    def product(self, other: Lattice) -> Lattice:
        """The product lattice: state ``u·S_2 + v`` for the pair ``(u, v)``."""
        if other.space != self.space:
            raise ValueError(f"other lattice is over {other.space}, not {self.space}")
        s2 = other.num_states
        delta = self.delta[:, None, :].astype(np.int64) * s2 + other.delta[None, :, :]
        first = np.repeat(np.arange(self.num_states), s2)
        second = np.tile(np.arange(s2), self.num_states)
        return Lattice(
            self.space,
            _as_delta(delta.reshape(-1, self.space.num_actions)),
            self.initial * s2 + other.initial,
            "product",
            factors=(self, other),
            _factor_states=(first, second),
            accepting=product_accepting(self.accepting, other.accepting, first, second),
        )

    # -- states of paths ------------------------------------------------------------------------

    def initial_state(self, prompt=None, *, trusted: bool = False) -> jax.Array:
        """The state before the first decision, int32 ``[...]`` for a prompt ``[..., P]``.

        A prefix tree ignores the prompt; the others run δ over its tokens from ``initial``.
        The prompt is validated unless ``trusted`` (already validated at a public door) or
        traced.
        """
        if prompt is None:
            return jnp.asarray(self.initial, jnp.int32)
        if not (trusted or isinstance(prompt, jax.core.Tracer)):
            prompt = self.space.validate_prompt(prompt)
        prompt = jnp.asarray(prompt, jnp.int32)
        if self.kind == "product":
            first, second = (f.initial_state(prompt, trusted=True) for f in self.factors)
            return first * self.factors[1].num_states + second
        start = jnp.full(prompt.shape[:-1], self.initial, jnp.int32)
        if not self.reads_prompt:
            return start
        return _run(jnp.asarray(self.delta), start, prompt)[1]

    def states(
        self, tokens, prompt=None, *, trusted: bool = False, exact_after_eos: bool = True
    ) -> jax.Array:
        """The state before each decision, int32 ``[..., T]``: ``s_0 = initial_state(prompt)``,
        ``s_{t+1} = δ(s_t, y_t)``; after EOS the state stays put (those positions carry no reward).

        A Markov lattice's state is read off the last ``k`` tokens directly (no scan over time),
        as is a product of Markov lattices'; the others run δ along the tokens (``lax.scan``).

        Args:
            tokens: int ``[..., T]``; ids outside ``[0, A)`` are read as 0 here (callers that
                score paths give them −∞).
            prompt: optional int ``[..., P]`` (broadcast against the batch of ``tokens``).
            trusted: the prompt was already validated (internal calls).
            exact_after_eos: False for callers that ignore the positions after the first EOS:
                there the states are then some valid states, not the state at EOS (a Markov
                lattice skips a pass over the tokens).
        """
        tokens = _token_array(tokens, self.space)
        if not (trusted or prompt is None or isinstance(prompt, jax.core.Tracer)):
            prompt = self.space.validate_prompt(prompt)
        if self.reads_context:
            tokens = jnp.where((tokens >= 0) & (tokens < self.space.num_actions), tokens, 0)
            states = self._context_states(tokens, prompt)
            return _stay_after_eos(states, tokens, self.space) if exact_after_eos else states
        start = self.initial_state(prompt, trusted=True)
        batch = jnp.broadcast_shapes(start.shape, tokens.shape[:-1])
        start = jnp.broadcast_to(start, batch)
        tokens = jnp.broadcast_to(tokens, (*batch, tokens.shape[-1]))
        return _run(jnp.asarray(self.delta), start, tokens)[0]

    @cached_property
    def reads_context(self) -> bool:
        """True for a Markov lattice or a product of them: each state is read off the last
        tokens directly (``states`` needs no scan over time)."""
        return self.kind == "markov" or (
            self.kind == "product" and all(f.reads_context for f in self.factors)
        )

    def _context_states(self, tokens, prompt) -> jax.Array:
        """``s_t`` from the ``k`` tokens before decision t (prompt, then pads ``V`` before it):
        ``s_t = Σ_j z[t + j] (V+1)^(k−1−j)`` over ``z`` = pads ⊕ prompt ⊕ tokens (EOS not yet
        special)."""
        if self.kind == "product":
            first, second = (f._context_states(tokens, prompt) for f in self.factors)
            first, second = jnp.broadcast_arrays(first, second)
            return first * self.factors[1].num_states + second
        k, T = self.order, tokens.shape[-1]
        if k == 0:
            return jnp.zeros(tokens.shape, jnp.int32)
        pad = self.space.vocab_size
        context = jnp.full((k,), pad, jnp.int32)
        if prompt is not None:
            prompt = jnp.asarray(prompt, jnp.int32)
            pads = jnp.full((*prompt.shape[:-1], k), pad, jnp.int32)
            context = jnp.concatenate([pads, prompt], -1)[..., -k:]
        batch = jnp.broadcast_shapes(context.shape[:-1], tokens.shape[:-1])
        z = jnp.concatenate(
            [jnp.broadcast_to(context, (*batch, k)), jnp.broadcast_to(tokens, (*batch, T))], -1
        )
        base = pad + 1
        return sum(z[..., j : j + T] * base ** (k - 1 - j) for j in range(k)).astype(jnp.int32)

    # -- tables -------------------------------------------------------------------------------

    def path_scores(self, table, tokens, prompt=None, *, trusted: bool = False) -> jax.Array:
        """``table[t, s_t, y_t]`` along each path, float ``[..., T]``; 0 after the first EOS.

        Summed over t this is ``R_r(y)`` for local rewards, or ``log p_q(y)`` for normalised
        logits. Ids outside ``[0, A)`` score −∞.

        Args:
            table: float ``[S, A]``, ``[T, S, A]``, or a batch of tables ``[*B, T, S, A]``
                (``B`` broadcast against the batch of ``tokens``).
            tokens: int ``[..., T]``.
            prompt: optional int ``[..., P]``.
            trusted: the prompt was already validated (internal calls).
        """
        space = self.space
        T, S, A = space.horizon, self.num_states, space.num_actions
        table = jnp.asarray(table)
        if table.shape[-2:] != (S, A) or (table.ndim > 3 and table.shape[-3] != T):
            raise ValueError(
                f"table must have shape [{S}, {A}], [{T}, {S}, {A}] or [*batch, {T}, {S}, {A}], "
                f"got {table.shape}"
            )
        tokens = _token_array(tokens, space)
        safe = jnp.where((tokens >= 0) & (tokens < A), tokens, 0)
        states = self.states(safe, prompt, trusted=trusted, exact_after_eos=False)
        scores = path_entries(table, states, safe)
        return space.after_eos(jnp.broadcast_to(tokens, scores.shape), scores)

    def lift(self, table, factor: int):
        """A table ``[..., S_i, A]`` on factor ``i`` of a product, as a table on the product."""
        if self.kind != "product":
            raise ValueError("lift applies to a product lattice (built with a.product(b))")
        if factor not in (0, 1):
            raise ValueError(f"factor must be 0 or 1, got {factor!r}")
        table = jnp.asarray(table)
        expected = self.factors[factor].num_states
        if table.ndim < 2 or table.shape[-2:] != (expected, self.space.num_actions):
            raise ValueError(
                f"table must end in [{expected}, {self.space.num_actions}] (factor {factor}), "
                f"got shape {table.shape}"
            )
        return jnp.take(table, jnp.asarray(self._factor_states[factor]), axis=-2)

    def accepting_rewards(self, accepting=None, dtype=jnp.float32) -> jax.Array:
        """Hard acceptance as local rewards, float ``[T, S, A]``: 0 or −∞.

        A path is accepted when the state after its last token is in ``accepting`` (state ids or
        bool ``[S]``; default ``self.accepting``). Fixed length: ``r[T-1, s, a] = 0 if δ(s, a) ∈
        accepting``. Variable length: ``r[t, s, EOS] = 0 if s ∈ accepting``. Every other entry
        is 0.
        """
        if accepting is None:
            if self.accepting is None:
                raise ValueError(
                    "accepting is required: this lattice carries no accepting states (give the "
                    "state ids, or compile it with Lattice.regex / Lattice.json_schema)"
                )
            accepting = self.accepting
        accept = accepting_mask(accepting, self.num_states)
        space = self.space
        r = np.zeros((space.horizon, self.num_states, space.num_actions))
        if space.eos:
            r[:, ~accept, space.eos_id] = -np.inf
        else:
            r[-1][~accept[self.delta]] = -np.inf
        return jnp.asarray(r, dtype)


def _as_delta(delta: np.ndarray) -> np.ndarray:
    if delta.size and delta.max() >= np.iinfo(np.int32).max:
        raise ValueError(f"lattice has {delta.max() + 1} states, more than int32 indexes")
    out = np.ascontiguousarray(delta, dtype=np.int32)
    out.setflags(write=False)
    return out


def _token_array(tokens, space: SequenceSpace) -> jax.Array:
    """Tokens as int32 ``[..., T]``; ValueError for a non-integer dtype or another length."""
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
    if tokens.ndim == 0 or tokens.shape[-1] != space.horizon:
        raise ValueError(f"tokens must have last dimension T={space.horizon}, got {tokens.shape}")
    return tokens.astype(jnp.int32)


def _stay_after_eos(states: jax.Array, tokens: jax.Array, space: SequenceSpace) -> jax.Array:
    """States after the first EOS replaced by the state before it (δ(s, EOS) = s)."""
    if not space.eos:
        return states
    first = space.first_eos(jnp.broadcast_to(tokens, states.shape))[..., None]  # T if none
    at_eos = jnp.take_along_axis(states, jnp.minimum(first, states.shape[-1] - 1), -1)
    positions = jnp.broadcast_to(jnp.arange(states.shape[-1]), states.shape)
    return jnp.where(positions > first, at_eos, states)


def _run(delta: jax.Array, start: jax.Array, tokens: jax.Array):
    """States visited reading ``tokens [..., N]`` from ``start [...]``: (before each, final)."""

    def step(state, token):
        return delta[state, token], state

    final, before = jax.lax.scan(step, start, jnp.moveaxis(tokens, -1, 0))
    return jnp.moveaxis(before, 0, -1), final
